-- stablelm.nvim: ghost-text completions and chat from the stablelm-lsp language server.
--
--   require('stablelm').setup({ settings = { model = 'bigcode/starcoder2-3b' } })
--
-- Neovim 0.11+ registers the server with vim.lsp.config / vim.lsp.enable (0.10: vim.lsp.start on
-- FileType). Neovim 0.12+ shows completions with vim.lsp.inline_completion; 0.10 and 0.11 get the
-- plugin's own ghost text (stablelm.ghost). Both cycle through the server's choices and accept a
-- word or a line of the suggestion; the server is told where the cursor rests (stablelm.focus).
-- See :help stablelm.
local util = require('stablelm.util')

local api = vim.api
local M = {}

---@class stablelm.Options
local defaults = {
  --- Command that starts the server over stdio.
  cmd = { 'stablelm-lsp', '--stdio' },
  --- Or a Python interpreter with stablelm-lsp installed: runs `python -m stablelm_lsp.lsp --stdio`.
  python = nil,
  --- Server settings (initializationOptions and workspace/didChangeConfiguration). Unset keys
  --- keep the server's defaults: model, endpoint, endpointKind, device, dtype, speculation,
  --- attention, linear, decodeStep, kvDtype, maxNewTokens, temperature,
  --- contextTokens, debounceMs, chatModel, chatMaxNewTokens, enabled.
  settings = {},
  --- Filetypes to attach to; nil: every file.
  filetypes = nil,
  --- 'auto': vim.lsp.inline_completion on 0.12+, else the plugin's ghost text; or 'native',
  --- 'plugin'.
  inline = 'auto',
  --- Plugin ghost text only: milliseconds without typing before asking.
  debounce_ms = 150,
  --- Milliseconds the cursor rests before the server is told (it prepares the completion there).
  focus_ms = 500,
  --- Insert-mode keys; false: no mapping. Each types itself when it has nothing to do.
  keymaps = {
    --- Accepts the ghost text.
    accept = '<Tab>',
    --- Accepts its next word, its line.
    accept_word = '<M-Right>',
    accept_line = '<M-C-Right>',
    --- The next / previous of the server's choices (asked for explicitly when one is shown).
    next = '<M-]>',
    prev = '<M-[>',
  },
  chat = { split = 'vertical' },
  --- Called after the plugin's own on_attach.
  on_attach = nil,
}

---@type stablelm.Options
M.options = vim.deepcopy(defaults)

--- Last stablelm/status per client id.
---@type table<integer, table>
M.statuses = {}

local paused = false

local function native_inline()
  if M.options.inline == 'plugin' then
    return false
  end
  local available = vim.lsp.inline_completion ~= nil and vim.fn.has('nvim-0.12') == 1
  if M.options.inline == 'native' and not available then
    vim.notify_once('stablelm: vim.lsp.inline_completion needs Neovim 0.12; using the plugin ghost text', vim.log.levels.WARN)
  end
  return available
end

local function buffer(bufnr)
  return (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
end

--- Whether ghost text is shown in `bufnr` and, if so, accepts it.
---@param bufnr? integer
---@return boolean
function M.accept(bufnr)
  bufnr = buffer(bufnr)
  if native_inline() then
    return vim.lsp.inline_completion.get({ bufnr = bufnr })
  end
  local ghost = require('stablelm.ghost')
  if not ghost.visible(bufnr) then
    return false
  end
  -- Expression mappings may not change the text: accept right after.
  vim.schedule(function()
    ghost.accept(bufnr)
  end)
  return true
end

--- vim.lsp.inline_completion's state for `bufnr` (0.12; internal, so looked up with care).
local function native_completor(bufnr)
  local ok, capability = pcall(require, 'vim.lsp._capability')
  local class = ok and type(capability.all) == 'table' and capability.all.inline_completion
  return type(class) == 'table' and type(class.active) == 'table' and class.active[bufnr] or nil
end

--- Accepts `piece(text)` of the native suggestion shown: a part is inserted at the cursor (the
--- server then answers the rest from memory); all of it is an ordinary accept.
local function native_accept_part(bufnr, piece)
  return vim.lsp.inline_completion.get({
    bufnr = bufnr,
    on_accept = function(item)
      local completor = native_completor(bufnr)
      local text = type(item.insert_text) == 'string' and item.insert_text or tostring(item.insert_text.value)
      local win = vim.fn.bufwinid(bufnr)
      local pos = api.nvim_win_get_cursor(win)
      local row, col = pos[1] - 1, pos[2]
      local start_row, start_col = row, col
      if item.range then
        start_row, start_col = item.range.start.row, item.range.start.col
      end
      local typed = (start_row == row and start_col <= col) and api.nvim_buf_get_text(bufnr, row, start_col, row, col, {})[1] or nil
      if not typed or text:sub(1, #typed) ~= typed then
        return
      end
      local rest = text:sub(#typed + 1)
      local part = piece(rest)
      if part == rest and completor then
        completor:accept(item)
        return
      end
      local lines = vim.split(part, '\n', { plain = true })
      api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
      api.nvim_win_set_cursor(win, { row + #lines, (#lines == 1 and col or 0) + #lines[#lines] })
    end,
  })
end

local function accept_part(bufnr, piece)
  bufnr = buffer(bufnr)
  if native_inline() then
    return native_accept_part(bufnr, piece)
  end
  local ghost = require('stablelm.ghost')
  if not ghost.visible(bufnr) then
    return false
  end
  vim.schedule(function()
    ghost.accept_part(bufnr, piece, M.options.debounce_ms)
  end)
  return true
end

--- Accepts the next word of the ghost text shown; false if none.
---@param bufnr? integer
---@return boolean
function M.accept_word(bufnr)
  return accept_part(bufnr, util.next_word)
end

--- Accepts the ghost text up to its first line break; false if none.
---@param bufnr? integer
---@return boolean
function M.accept_line(bufnr)
  return accept_part(bufnr, util.next_line)
end

--- Native: the server's choices for the cursor (an explicit request), showing the one `step`
--- places after the first.
local function native_choices(bufnr, step)
  local client = util.client(bufnr)
  local win = vim.fn.bufwinid(bufnr)
  if not client or win == -1 then
    return false
  end
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = 1 } -- Invoked
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local at = api.nvim_win_get_cursor(win)
  util.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    local completor = native_completor(bufnr)
    local now = vim.fn.bufwinid(bufnr) ~= -1 and api.nvim_win_get_cursor(vim.fn.bufwinid(bufnr)) or {}
    if err or not result or not completor or not completor.client_state[client.id]
        or api.nvim_buf_get_changedtick(bufnr) ~= tick or now[1] ~= at[1] or now[2] ~= at[2] then
      return
    end
    local items = result.items or result
    if #items == 0 then
      return
    end
    completor.client_state[client.id].items = items
    completor:select((step % #items) + 1, #items > 1)
  end, bufnr)
  return true
end

--- Shows the next (`step` 1) or previous (-1) of the server's choices; with one suggestion shown
--- (or none), asks for the choices first. False when there is no server to ask.
---@param step integer
---@param bufnr? integer
---@return boolean
function M.cycle(step, bufnr)
  bufnr = buffer(bufnr)
  if not native_inline() then
    return require('stablelm.ghost').cycle(bufnr, step)
  end
  local completor = native_completor(bufnr)
  if completor and completor.current and completor:count_items() > 1 then
    vim.lsp.inline_completion.select({ bufnr = bufnr, count = step })
    return true
  end
  if completor then
    return native_choices(bufnr, step)
  end
  vim.lsp.inline_completion.select({ bufnr = bufnr, count = step })
  return true
end

local function enable_inline(bufnr, enable)
  if native_inline() then
    vim.lsp.inline_completion.enable(enable, { bufnr = bufnr })
  else
    local ghost = require('stablelm.ghost')
    if enable then
      ghost.attach(bufnr, M.options.debounce_ms)
    else
      ghost.detach(bufnr)
    end
  end
end

local function completions_on()
  return not paused and M.options.settings.enabled ~= false
end

--- Whether completions are on (not paused by the user, nor turned off by the settings).
---@return boolean
function M.completions_on()
  return completions_on()
end

---@param client vim.lsp.Client
---@param bufnr integer
local function on_attach(client, bufnr)
  if completions_on() then
    enable_inline(bufnr, true)
  end
  local focus = require('stablelm.focus')
  focus.idle_ms = M.options.focus_ms
  focus.attach(bufnr)
  local keymaps = M.options.keymaps
  --- Maps `keymaps[name]` in insert mode to `action(bufnr)`; the key types itself when the
  --- action has nothing to do (returns false). Expression mappings may not change the text:
  --- actions that do, do it right after.
  local function map(name, action, desc)
    local key = keymaps[name]
    if not key then
      return
    end
    vim.keymap.set('i', key, function()
      if action(bufnr) then
        return ''
      end
      return key
    end, { buffer = bufnr, expr = true, replace_keycodes = true, desc = desc })
  end
  map('accept', M.accept, 'Accept the StableLM completion')
  map('accept_word', M.accept_word, 'Accept the next word of the StableLM completion')
  map('accept_line', M.accept_line, 'Accept the StableLM completion up to its line break')
  map('next', function(b)
    vim.schedule(function()
      M.cycle(1, b)
    end)
    return util.client(b) ~= nil
  end, 'Next StableLM completion')
  map('prev', function(b)
    vim.schedule(function()
      M.cycle(-1, b)
    end)
    return util.client(b) ~= nil
  end, 'Previous StableLM completion')
  if M.options.on_attach then
    M.options.on_attach(client, bufnr)
  end
end

local function attached_buffers()
  local buffers = {}
  local client = util.client()
  if client then
    for bufnr in pairs(client.attached_buffers) do
      buffers[#buffers + 1] = bufnr
    end
  end
  return buffers
end

--- Pauses or resumes completions in every attached buffer (the server is not asked meanwhile).
function M.toggle()
  paused = not paused
  for _, bufnr in ipairs(attached_buffers()) do
    enable_inline(bufnr, completions_on())
  end
  vim.notify(paused and 'StableLM: completions paused' or 'StableLM: completions resumed')
  api.nvim_exec_autocmds('User', { pattern = 'StablelmStatus', modeline = false })
end

---@return boolean
function M.is_paused()
  return paused
end

--- The server's last stablelm/status, with `paused` set when the user paused completions.
---@return table? { state, model, builtin, device, dtype, message? }
function M.status()
  local client = util.client()
  local status = client and M.statuses[client.id]
  if not status then
    return nil
  end
  status = vim.deepcopy(status)
  if status.state == 'ready' and not completions_on() then
    status.state = 'paused'
  end
  return status
end

--- A short text for 'statusline': "StableLM: loading", the model name, "paused", "error".
---@return string
function M.statusline()
  local status = M.status()
  if not status then
    return ''
  end
  local model = status.model ~= '' and vim.fn.fnamemodify(status.model, ':t') or 'model'
  if status.state == 'ready' then
    return 'StableLM: ' .. model
  end
  return ('StableLM: %s (%s)'):format(status.state, model)
end

--- The settings as they are sent: an empty table must reach the server as {}, not [].
local function server_settings()
  return next(M.options.settings) and M.options.settings or vim.empty_dict()
end

--- The command line that starts the server.
---@return string[]
function M.server_cmd()
  local opts = M.options
  return opts.python and { vim.fn.expand(opts.python), '-m', 'stablelm_lsp.lsp', '--stdio' } or opts.cmd
end

--- The client configuration (vim.lsp.Config).
local function client_config()
  return {
    name = util.name,
    cmd = M.server_cmd(),
    filetypes = M.options.filetypes,
    -- One server (one model in memory) for every project.
    reuse_client = function(client, config)
      return client.name == config.name
    end,
    init_options = server_settings(),
    settings = { stablelm = server_settings() },
    handlers = {
      ['stablelm/status'] = function(_, params, ctx)
        M.statuses[ctx.client_id] = params
        api.nvim_exec_autocmds('User', { pattern = 'StablelmStatus', modeline = false, data = params })
      end,
      ['stablelm/chatDelta'] = function(_, params)
        require('stablelm.chat').on_delta(params)
      end,
    },
    commands = {
      -- Run by inline completion items when they are accepted: the server counts acceptances.
      ['stablelm.accepted'] = function(command, ctx)
        local client = vim.lsp.get_client_by_id(ctx.client_id)
        if client then
          util.forward_command(client, command, ctx.bufnr)
        end
      end,
    },
    on_attach = on_attach,
    on_exit = function(_, _, client_id)
      M.statuses[client_id] = nil
    end,
  }
end

local function start_legacy(bufnr)
  if vim.bo[bufnr].buftype ~= '' then
    return
  end
  local config = client_config()
  if config.filetypes and not vim.tbl_contains(config.filetypes, vim.bo[bufnr].filetype) then
    return
  end
  vim.lsp.start(config, { bufnr = bufnr, reuse_client = config.reuse_client })
end

local function enable_server()
  if util.has_011 then
    vim.lsp.config(util.name, client_config())
    vim.lsp.enable(util.name)
    return
  end
  api.nvim_create_autocmd('FileType', {
    group = api.nvim_create_augroup('stablelm.start', { clear = true }),
    callback = function(args)
      start_legacy(args.buf)
    end,
  })
  for _, bufnr in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(bufnr) and vim.bo[bufnr].filetype ~= '' then
      start_legacy(bufnr)
    end
  end
end

--- Stops the server and starts it again for the open buffers (after changing `cmd`, say).
function M.restart()
  local client = util.client()
  if client then
    util.stop(client)
    -- The new client must not reuse the one that is shutting down.
    vim.wait(5000, function()
      return util.client() == nil
    end, 50)
  end
  if util.has_011 then
    vim.lsp.enable(util.name, false)
  end
  enable_server()
end

--- Changes server settings at run time (workspace/didChangeConfiguration).
---@param settings table
function M.configure(settings)
  M.options.settings = vim.tbl_extend('force', M.options.settings, settings)
  if util.has_011 then
    vim.lsp.config(util.name, { init_options = server_settings(), settings = { stablelm = server_settings() } })
  end
  local client = util.client()
  if client then
    client.settings = { stablelm = server_settings() }
    util.notify(client, 'workspace/didChangeConfiguration', { settings = client.settings })
  end
  for _, bufnr in ipairs(attached_buffers()) do
    enable_inline(bufnr, completions_on())
  end
end

local function create_commands()
  local command = api.nvim_create_user_command
  command('StablelmChat', function(args)
    require('stablelm.chat').command(args)
  end, { nargs = '*', range = true, bang = true, desc = 'Ask StableLM about the file or the selected lines (! starts a new chat)' })
  command('StablelmChatStop', function()
    require('stablelm.chat').stop()
  end, { desc = 'Stop the StableLM reply' })
  command('StablelmToggle', M.toggle, { desc = 'Pause or resume StableLM completions' })
  command('StablelmRestart', M.restart, { desc = 'Restart the StableLM server' })
  command('StablelmStatus', function()
    local status = M.status()
    vim.notify(status and M.statusline() .. (' on %s (%s)'):format(status.device, status.dtype) or 'StableLM: not running')
  end, { desc = 'Show the StableLM model and its state' })
end

---@param opts? stablelm.Options
function M.setup(opts)
  M.options = vim.tbl_deep_extend('force', vim.deepcopy(defaults), opts or {})
  if opts and opts.settings then
    M.options.settings = vim.deepcopy(opts.settings) -- taken as given, not merged with defaults
  end
  require('stablelm.chat').options = M.options.chat
  api.nvim_set_hl(0, 'StablelmGhost', { link = 'Comment', default = true })
  api.nvim_set_hl(0, 'StablelmGhostHint', { link = 'NonText', default = true })
  create_commands()
  enable_server()
end

return M
