-- Small helpers shared by the plugin's modules: the client's request API across Neovim 0.10 (dot
-- calls) and 0.11+ (method calls), and LSP positions to byte columns.
local M = {}

M.name = 'stablelm'
M.has_011 = vim.fn.has('nvim-0.11') == 1

--- Sends `method` to `client`; returns the request id or nil.
---@param client vim.lsp.Client
---@param method string
---@param params table
---@param handler? fun(err: lsp.ResponseError?, result: any, ctx: lsp.HandlerContext)
---@param bufnr? integer
---@return integer?
function M.request(client, method, params, handler, bufnr)
  local ok, id
  if M.has_011 then
    ok, id = client:request(method, params, handler, bufnr)
  else
    ok, id = client.request(method, params, handler, bufnr)
  end
  return ok and id or nil
end

--- Blocking request: returns { err, result } or nil and an error message (timeout).
---@param client vim.lsp.Client
---@param method string
---@param params table
---@param timeout_ms integer
function M.request_sync(client, method, params, timeout_ms)
  if M.has_011 then
    return client:request_sync(method, params, timeout_ms)
  end
  return client.request_sync(method, params, timeout_ms)
end

---@param client vim.lsp.Client
---@param id integer
function M.cancel(client, id)
  if M.has_011 then
    client:cancel_request(id)
  else
    client.cancel_request(id)
  end
end

---@param client vim.lsp.Client
---@param method string
---@param params table
function M.notify(client, method, params)
  if M.has_011 then
    client:notify(method, params)
  else
    client.notify(method, params)
  end
end

---@param client vim.lsp.Client
function M.stop(client)
  if M.has_011 then
    client:stop()
  else
    client.stop()
  end
end

--- Runs a server command; the server answers `stablelm.accepted` and the like itself.
---@param client vim.lsp.Client
---@param command lsp.Command
---@param bufnr? integer
function M.forward_command(client, command, bufnr)
  M.request(client, 'workspace/executeCommand', {
    command = command.command,
    arguments = command.arguments,
  }, function() end, bufnr)
end

--- The running stablelm client: the one attached to `bufnr` when given, else any.
---@param bufnr? integer
---@return vim.lsp.Client?
function M.client(bufnr)
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  local clients = get({ name = M.name, bufnr = bufnr })
  return clients[1]
end

--- Byte column of an LSP `character` offset in `line` (clamped to the line's end).
---@param line string
---@param character integer
---@param encoding string 'utf-8'|'utf-16'|'utf-32'
---@return integer
function M.byte_col(line, character, encoding)
  if encoding == 'utf-8' then
    return math.min(character, #line)
  end
  if M.has_011 then
    return vim.str_byteindex(line, encoding, character, false)
  end
  local ok, col = pcall(vim.str_byteindex, line, character, encoding == 'utf-16')
  return ok and col or #line
end

--- (row, col) 0-based with a byte column, for an LSP position in `bufnr`.
---@param bufnr integer
---@param position lsp.Position
---@param encoding string
---@return integer, integer
function M.buf_position(bufnr, position, encoding)
  local line = vim.api.nvim_buf_get_lines(bufnr, position.line, position.line + 1, false)[1] or ''
  return position.line, M.byte_col(line, position.character, encoding)
end

--- The first word of `text` (with the spaces or line break before it), or its first run of
--- other characters: what accept-word inserts.
---@param text string
---@return string
function M.next_word(text)
  return text:match('^%s*[%w_]+') or text:match('^%s*[^%w_%s]+') or text
end

--- `text` up to and including its first line break (all of it when there is none): what
--- accept-line inserts.
---@param text string
---@return string
function M.next_line(text)
  return text:match('^[^\n]*\n') or text
end

return M
