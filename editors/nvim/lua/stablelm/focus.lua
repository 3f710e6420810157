-- Where the cursor rests, told to the server (stablelm/didFocus) so that it prepares the
-- completion there before it is asked for: at once when a buffer is entered (switching
-- documents), and once the cursor has stayed put for a moment (the user reads, or pauses before
-- typing on).
local util = require('stablelm.util')

local api = vim.api
local M = {}

--- Milliseconds the cursor stays put before its position is reported.
M.idle_ms = 500

---@type table<integer, uv.uv_timer_t>
local timers = {}

local function stop_timer(bufnr)
  local timer = timers[bufnr]
  if timer then
    timers[bufnr] = nil
    timer:stop()
    timer:close()
  end
end

--- Sends the cursor's position in `bufnr` (its window's) to the server.
---@param bufnr integer
function M.report(bufnr)
  local client = util.client(bufnr)
  local win = vim.fn.bufwinid(bufnr)
  if not client or win == -1 or not require('stablelm').completions_on() then
    return
  end
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  util.notify(client, 'stablelm/didFocus', { uri = params.textDocument.uri, position = params.position })
end

---@param bufnr integer
function M.attach(bufnr)
  local group = api.nvim_create_augroup('stablelm.focus.' .. bufnr, { clear = true })
  api.nvim_create_autocmd('BufEnter', {
    group = group,
    buffer = bufnr,
    callback = function()
      stop_timer(bufnr)
      M.report(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'CursorMoved', 'CursorMovedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      stop_timer(bufnr)
      local timer = assert(vim.uv.new_timer())
      timers[bufnr] = timer
      timer:start(M.idle_ms, 0, vim.schedule_wrap(function()
        if timers[bufnr] == timer then
          stop_timer(bufnr)
          if api.nvim_buf_is_valid(bufnr) and api.nvim_get_current_buf() == bufnr then
            M.report(bufnr)
          end
        end
      end))
    end,
  })
  api.nvim_create_autocmd('BufLeave', {
    group = group,
    buffer = bufnr,
    callback = function()
      stop_timer(bufnr)
    end,
  })
  api.nvim_create_autocmd({ 'BufWipeout', 'LspDetach' }, {
    group = group,
    buffer = bufnr,
    callback = function(args)
      local client = args.data and vim.lsp.get_client_by_id(args.data.client_id)
      if args.event == 'BufWipeout' or (client and client.name == util.name) then
        M.detach(bufnr)
      end
    end,
  })
  if api.nvim_get_current_buf() == bufnr then
    M.report(bufnr) -- attached to the buffer in view: it has the focus now
  end
end

---@param bufnr integer
function M.detach(bufnr)
  stop_timer(bufnr)
  pcall(api.nvim_del_augroup_by_name, 'stablelm.focus.' .. bufnr)
end

return M
