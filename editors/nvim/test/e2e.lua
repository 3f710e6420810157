-- End-to-end test of the Neovim plugin with the real server and a real checkpoint.
--
--   STABLELM_TEST_MODEL=/path/to/checkpoint nvim --headless --clean -l editors/nvim/test/e2e.lua
--
-- This script drives a child Neovim (--embed) over RPC the way a user would: keys typed with
-- nvim_input, so InsertEnter, CursorMovedI and the <Tab> mapping run as they do in an editor.
-- Checked, once with 0.12's vim.lsp.inline_completion and once with the plugin's own ghost text:
-- ghost text appears, <Tab> inserts exactly what was shown and the server counts the acceptance;
-- the plugin tells the server where the cursor rests (stablelm/didFocus) and the server has the
-- completion there ready before it is asked for; <M-]> shows the server's other choices and
-- <Tab> inserts the one shown; <M-Right> and <M-C-Right> accept a word and a line of it.
-- Then :StablelmChat streams a reply into its buffer, :StablelmChatStop stops one, and
-- :checkhealth stablelm reports the model. Exit status 0 on success, 1 on failure.
-- STABLELM_TEST_SERVER overrides the server command (default: the repository's
-- .venv/bin/stablelm-lsp --stdio).

local uv = vim.uv
local script_dir = vim.fs.dirname(vim.fs.abspath(arg[0] or debug.getinfo(1, 'S').source:sub(2)))
local plugin_dir = vim.fs.dirname(script_dir)
local repo = vim.fs.dirname(vim.fs.dirname(plugin_dir))

local model = os.getenv('STABLELM_TEST_MODEL')
if not model or model == '' then
  io.stdout:write('SKIP nvim e2e: STABLELM_TEST_MODEL is not set (editors/test.sh builds a tiny checkpoint)\n')
  os.exit(0)
end
local server_cmd = os.getenv('STABLELM_TEST_SERVER') and vim.split(os.getenv('STABLELM_TEST_SERVER'), ' ', { trimempty = true })
  or { repo .. '/.venv/bin/stablelm-lsp', '--stdio' }

local LOAD_TIMEOUT_MS = 180000
local REPLY_TIMEOUT_MS = 60000

local failures = 0
local function log(message)
  io.stdout:write(message .. '\n')
  io.stdout:flush()
end

--- A child Neovim driven over RPC.
local Child = {}
Child.__index = Child

function Child.start()
  local self = setmetatable({}, Child)
  self.chan = vim.fn.jobstart({ vim.v.progpath, '--embed', '--headless', '--clean', '-n' }, { rpc = true })
  assert(self.chan > 0, 'could not start a child nvim')
  return self
end

--- Runs `code` (a Lua chunk taking `...`) in the child and returns its result.
function Child:lua(code, ...)
  return vim.rpcrequest(self.chan, 'nvim_exec_lua', code, { ... })
end

function Child:input(keys)
  vim.rpcrequest(self.chan, 'nvim_input', keys)
end

function Child:stop()
  pcall(vim.rpcrequest, self.chan, 'nvim_command', 'qa!')
  vim.fn.jobwait({ self.chan }, 10000)
  pcall(vim.fn.jobstop, self.chan)
end

--- Polls `check` (a Lua chunk run in the child) until it returns a truthy value.
function Child:wait(what, timeout_ms, code, ...)
  local args = { ... }
  local deadline = uv.now() + timeout_ms
  while true do
    local value = self:lua(code, unpack(args))
    if value and value ~= vim.NIL then
      return value
    end
    if uv.now() > deadline then
      error(('timed out after %d ms waiting for %s'):format(timeout_ms, what), 0)
    end
    vim.wait(50)
  end
end

local function expect(condition, message)
  if not condition then
    error(message, 2)
  end
end

local function case(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if ok then
    log('ok - ' .. name)
  else
    failures = failures + 1
    log('not ok - ' .. name .. '\n  ' .. tostring(err):gsub('\n', '\n  '))
  end
end

local source = table.concat({
  'import math',
  '',
  '',
  'def area(radius):',
  '    return math.pi * radius * radius',
  '',
  '',
  'def perimeter(radius):',
  '    return ',
}, '\n')

--- A child with the plugin set up in `mode`, editing a Python file, the model loaded.
local function start_child(mode, workdir)
  local child = Child.start()
  local file = workdir .. '/shapes_' .. mode .. '.py'
  local f = assert(io.open(file, 'w'))
  f:write(source)
  f:close()
  child:lua([[
    local plugin_dir, cmd, model, mode, file = ...
    vim.opt.rtp:prepend(plugin_dir)
    vim.o.swapfile = false
    require('stablelm').setup({
      cmd = cmd,
      inline = mode,
      debounce_ms = 50,
      focus_ms = 100,
      settings = { model = model, device = 'cpu', dtype = 'float32', maxNewTokens = 12, temperature = 0, debounceMs = 0 },
    })
    vim.cmd.edit(file)
  ]], plugin_dir, server_cmd, model, mode, file)
  local state = child:wait('the model to load', LOAD_TIMEOUT_MS, [[
    local status = require('stablelm').status()
    return status and status.state ~= 'loading' and status.state or nil
  ]])
  expect(state == 'ready', 'server state after loading: ' .. tostring(state))
  return child
end

--- Ghost text shown in the current buffer: its extmarks in `namespace`, as text.
local ghost_text = [[
  local namespace = ...
  local ns = vim.api.nvim_get_namespaces()[namespace]
  if not ns then return nil end
  local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  if #marks == 0 then return nil end
  local details = marks[1][4]
  local lines = { '' }
  for _, chunk in ipairs(details.virt_text or {}) do lines[1] = lines[1] .. chunk[1] end
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local line = ''
    for _, chunk in ipairs(virt_line) do line = line .. chunk[1] end
    lines[#lines + 1] = line
  end
  return { row = marks[1][2], col = marks[1][3], text = table.concat(lines, '\n') }
]]

--- The ghost text without the "(2/3)" hint shown with several choices, and that hint.
local function without_hint(text)
  local shown, hint = text:match('^(.-) %((%d+/%d+)%)$')
  return shown or text, hint
end

local status_counts = [[
  local client = vim.lsp.get_clients({ name = 'stablelm' })[1]
  local response = client:request_sync('workspace/executeCommand', { command = 'stablelm.status' }, 5000)
  return response and response.result
]]

local function check_completion(mode, namespace, workdir)
  local child = start_child(mode, workdir)
  local ok, err = pcall(function()
    local before = child:lua(status_counts)
    child:input('GA')
    local ghost = child:wait('ghost text (' .. namespace .. ')', REPLY_TIMEOUT_MS, ghost_text, namespace)
    expect(ghost.text ~= '', 'the ghost text is empty')
    expect(ghost.row == 8, 'ghost text on row ' .. ghost.row)
    log(('  ghost text: %q'):format(ghost.text))
    if mode == 'plugin' then
      -- Moving the cursor clears it at once (and cancels a request in flight); back at the end
      -- of the line it comes again.
      child:input('<Left>')
      child:wait('the ghost text to leave the old position', 2000, ([[
        local ghost = (loadstring or load)(%q)(...)
        return ghost == nil or ghost.col ~= %d
      ]]):format(ghost_text, ghost.col), namespace)
      child:input('<End>')
      local again = child:wait('the ghost text again', REPLY_TIMEOUT_MS, ghost_text, namespace)
      expect(again.text == ghost.text and again.col == ghost.col, 'a different ghost text after moving back')
    end
    child:input('<Tab>')
    local lines = child:wait('the accepted text in the buffer', 5000, [[
      local lines = vim.api.nvim_buf_get_lines(0, 8, -1, false)
      return lines[1] ~= '    return ' and lines or nil
    ]])
    local inserted = table.concat(lines, '\n')
    expect(inserted == '    return ' .. ghost.text,
      ('inserted %q, but the ghost text was %q'):format(inserted, ghost.text))
    local mode_now = child:lua('return vim.api.nvim_get_mode().mode')
    expect(mode_now == 'i', 'mode after accepting: ' .. mode_now)
    local counted = ([[
      local client = vim.lsp.get_clients({ name = 'stablelm' })[1]
      local response = client:request_sync('workspace/executeCommand', { command = 'stablelm.status' }, 5000)
      local status = response and response.result
      return status and status.completionsAccepted > %d and status or nil
    ]]):format(before.completionsAccepted)
    local after = child:wait('the acceptance counted by the server', 5000, counted)
    expect(after.completionsShown >= 1, 'completionsShown ' .. after.completionsShown)
    -- Paused: no ghost text, and <Tab> types a tab.
    child:input('<Esc>')
    child:lua('vim.cmd("StablelmToggle")')
    -- A literal tab, whatever the Python ftplugin's indent settings would make of it.
    child:lua('vim.cmd("setlocal noexpandtab softtabstop=0 indentexpr= noautoindent")')
    child:input('o<Tab>x<Esc>')
    local line = child:wait('the typed line', 2000, [[
      local line = vim.api.nvim_get_current_line()
      return line:find('x') and line or nil
    ]])
    expect(line == '\tx', ('<Tab> without ghost text typed %q'):format(line))
    local marks = child:lua([[
      local ns = vim.api.nvim_get_namespaces()[...]
      return ns and #vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {}) or 0
    ]], namespace)
    expect(marks == 0, 'ghost text while paused')
    expect(child:lua("return require('stablelm').status().state") == 'paused', 'status not paused')
    child:lua('vim.cmd("StablelmToggle")')
  end)
  return child, ok, err
end

local function counters(child)
  return child:lua(status_counts).counters
end

--- The server's counters once no background work runs.
local function idle_counters(child)
  return child:wait('the server to be idle', REPLY_TIMEOUT_MS, [[
    local client = vim.lsp.get_clients({ name = 'stablelm' })[1]
    local response = client:request_sync('workspace/executeCommand', { command = 'stablelm.status' }, 5000)
    local counters = response and response.result and response.result.counters
    return counters and counters.backgroundRunning == 0 and counters or nil
  ]])
end

--- Runs `fn(child)` on a child set up in `mode`; the child is stopped whatever happens.
local function with_child(mode, workdir, fn)
  local child = start_child(mode, workdir)
  local ok, err = pcall(fn, child)
  child:stop()
  if not ok then
    error(err, 0)
  end
end

local function check_focus(mode, workdir)
  with_child(mode, workdir, function(child)
    local before = idle_counters(child)
    -- The cursor rests on the end of line 5 (normal mode): the plugin tells the server, which
    -- computes the completion there in the background.
    child:lua('vim.api.nvim_win_set_cursor(0, { 5, 35 })')
    local after = child:wait('a completion prepared where the cursor rests', REPLY_TIMEOUT_MS, ([[
      local client = vim.lsp.get_clients({ name = 'stablelm' })[1]
      local response = client:request_sync('workspace/executeCommand', { command = 'stablelm.status' }, 5000)
      local c = response and response.result and response.result.counters
      return c and c.backgroundRunning == 0 and c.backgroundDone > %d and c or nil
    ]]):format(before.backgroundDone))
    -- Asked there now, the server answers with it: the model does not run again.
    child:lua([[
      local client = vim.lsp.get_clients({ name = 'stablelm' })[1]
      local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
      params.context = { triggerKind = 2 }
      client:request_sync('textDocument/inlineCompletion', params, 5000)
    ]])
    local answered = counters(child)
    expect(answered.prepared == after.prepared + 1, 'not answered with the prepared completion: ' .. vim.inspect(answered))
    expect(answered.modelRuns == after.modelRuns, 'the model ran again')
  end)
end

local function check_choices_and_parts(mode, namespace, workdir)
  with_child(mode, workdir, function(child)
    child:input('GA')
    local first = child:wait('ghost text', REPLY_TIMEOUT_MS, ghost_text, namespace)
    -- <M-]>: the server's choices, the second one shown with its place among them.
    --- The ghost text once it shows choice `n` (its "(n/N)" hint).
    local function choice(n, timeout_ms)
      return child:wait(('choice %d'):format(n), timeout_ms, ([[
        local ghost = (loadstring or load)(%q)(...)
        return ghost and ghost.text:match(' %%(%d/%%d%%)$') and ghost or nil
      ]]):format(ghost_text, n), namespace)
    end
    child:input('<M-]>')
    local second = choice(2, REPLY_TIMEOUT_MS)
    local shown, hint = without_hint(second.text)
    log(('  choices: %q, then %q (%s)'):format(first.text, shown, hint))
    expect(shown ~= without_hint(first.text), 'the second choice is the first one again')
    child:input('<M-[>')
    choice(1, 5000)
    child:input('<M-]>')
    choice(2, 5000)
    child:input('<Tab>')
    local inserted = child:wait('the chosen text in the buffer', 5000, [[
      local lines = vim.api.nvim_buf_get_lines(0, 8, -1, false)
      return lines[1] ~= '    return ' and table.concat(lines, '\n') or nil
    ]])
    expect(inserted == '    return ' .. shown, ('inserted %q, but the choice shown was %q'):format(inserted, shown))

    -- A word, then a line, of a new suggestion on a new line.
    child:input('<CR>')
    local ghost = child:wait('ghost text on the new line', REPLY_TIMEOUT_MS, ghost_text, namespace)
    local text = without_hint(ghost.text)
    local row, col = unpack(child:lua('local p = vim.api.nvim_win_get_cursor(0); return { p[1] - 1, p[2] }'))
    local line_before = child:lua('return vim.api.nvim_get_current_line()')
    local word = text:match('^%s*[%w_]+') or text:match('^%s*[^%w_%s]+') or text
    log(('  accepting a word (%q), then a line, of %q'):format(word, text))
    child:input('<M-Right>')
    child:wait('a word accepted', 5000, ([[
      return vim.api.nvim_buf_get_lines(0, %d, %d, false)[1] ~= %q or nil
    ]]):format(row, row + 1, line_before))
    local after_word = child:lua(('return table.concat(vim.api.nvim_buf_get_lines(0, %d, -1, false), "\\n")'):format(row))
    expect(after_word:sub(1, #line_before + #word) == line_before .. word,
      ('accepting a word of %q made %q'):format(text, after_word))
    if #word < #text then
      -- The rest comes back at once (the server answers it from memory) and a line of it goes in.
      local rest = child:wait('the rest as ghost text', REPLY_TIMEOUT_MS, ghost_text, namespace)
      expect(without_hint(rest.text) == text:sub(#word + 1), ('the rest shown is %q, not %q'):format(rest.text, text:sub(#word + 1)))
      child:input('<M-C-Right>')
      local line = text:sub(#word + 1):match('^[^\n]*\n') or text:sub(#word + 1)
      local expected = line_before .. word .. line
      child:wait('a line accepted', 5000, ([[
        local text = table.concat(vim.api.nvim_buf_get_lines(0, %d, -1, false), '\n')
        return text:sub(1, %d) == %q or nil
      ]]):format(row, #expected, expected))
    end
    expect(child:lua('return vim.api.nvim_get_mode().mode') == 'i', 'left insert mode')
  end)
end

local workdir = vim.fn.tempname()
vim.fn.mkdir(workdir, 'p')

local native_child
case('native inline completion (0.12): ghost text appears and <Tab> inserts it', function()
  local child, ok, err = check_completion('native', 'nvim.lsp.inline_completion', workdir)
  native_child = child
  if not ok then
    error(err, 0)
  end
end)

case("the plugin's own ghost text (0.10/0.11 path): appears, <Tab> inserts it", function()
  local child, ok, err = check_completion('plugin', 'stablelm.ghost', workdir)
  child:stop()
  if not ok then
    error(err, 0)
  end
end)

for _, mode in ipairs({ { 'native', 'nvim.lsp.inline_completion' }, { 'plugin', 'stablelm.ghost' } }) do
  case(('%s: where the cursor rests is sent (stablelm/didFocus) and its completion is ready before it is asked for'):format(mode[1]), function()
    check_focus(mode[1], workdir)
  end)
  case(('%s: <M-]>/<M-[> cycle through the server\'s choices, <Tab> inserts the one shown, <M-Right>/<M-C-Right> accept a word/a line'):format(mode[1]), function()
    check_choices_and_parts(mode[1], mode[2], workdir)
  end)
end

if native_child then
  case(':StablelmChat streams a reply into the chat buffer', function()
    native_child:input('<Esc>')
    native_child:lua([[
      _G.chat_result = nil
      _G.deltas = 0
      local chat = require('stablelm.chat')
      local on_delta = chat.on_delta
      chat.on_delta = function(params) _G.deltas = _G.deltas + 1; on_delta(params) end
      vim.api.nvim_create_autocmd('User', { pattern = 'StablelmChatDone', callback = function(args) _G.chat_result = args.data end })
      vim.cmd('4,5StablelmChat What does area compute?')
    ]])
    local result = native_child:wait('the chat reply', REPLY_TIMEOUT_MS, 'return _G.chat_result')
    expect(result.note == nil, 'reply note: ' .. tostring(result.note))
    expect(result.text ~= '', 'the reply is empty')
    local chat = native_child:lua([[
      local buf = vim.fn.bufnr('stablelm://chat')
      return { lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false), visible = vim.fn.bufwinid(buf) ~= -1, deltas = _G.deltas }
    ]])
    expect(chat.visible, 'the chat buffer is not shown in a window')
    expect(chat.deltas > 0, 'no stablelm/chatDelta arrived')
    local text = table.concat(chat.lines, '\n')
    expect(text:find('## You\n\nWhat does area compute?\n\n_(context: shapes_native.py:4-5)_', 1, true), 'question missing:\n' .. text)
    local reply_start = text:find('## StableLM\n\n', 1, true)
    expect(reply_start, 'no reply header:\n' .. text)
    local reply = text:sub(reply_start + #'## StableLM\n\n')
    expect(vim.trim(reply) == vim.trim(result.text), ('buffer reply %q differs from the result %q'):format(reply, result.text))
  end)

  case(':StablelmChatStop stops a reply mid-stream; the server stays usable', function()
    -- Stopped from the child's own event loop at the first delta: the tiny model writes 400
    -- tokens in well under 100 ms, faster than this process could poll for the delta and answer.
    native_child:lua([[
      _G.chat_result = nil
      _G.deltas = 0
      local chat = require('stablelm.chat')
      local on_delta = chat.on_delta
      local stop = true
      chat.on_delta = function(params)
        on_delta(params)
        if stop then
          stop = false
          vim.schedule(function() vim.cmd('StablelmChatStop') end)
        end
      end
      require('stablelm').configure({ maxNewTokens = 400 })
      vim.cmd('StablelmChat Write a long story.')
    ]])
    native_child:wait('the first delta', REPLY_TIMEOUT_MS, 'return _G.deltas > 0 or _G.chat_result ~= nil')
    local result = native_child:wait('the stopped reply', 5000, 'return _G.chat_result')
    expect(result.note == 'stopped', 'reply note: ' .. tostring(result.note))
    local text = table.concat(native_child:lua([[return vim.api.nvim_buf_get_lines(vim.fn.bufnr('stablelm://chat'), 0, -1, false)]]), '\n')
    expect(text:find('_(stopped)_', 1, true), 'no "(stopped)" in the chat buffer')
    native_child:lua([[require('stablelm').configure({ maxNewTokens = 12 })]])
    local status = native_child:lua(status_counts)
    expect(status.state == 'ready', 'state after stop: ' .. tostring(status.state))
  end)

  case(':checkhealth stablelm reports the server command, the model and its state', function()
    local report = native_child:lua([[
      vim.cmd('checkhealth stablelm')
      return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n')
    ]])
    expect(report:find('server command: ', 1, true), 'no server command in:\n' .. report)
    expect(report:find('model ready: ', 1, true), 'no model state in:\n' .. report)
    expect(report:find('completions shown: ', 1, true), 'no counters in:\n' .. report)
    expect(not report:find('ERROR', 1, true), 'errors in:\n' .. report)
  end)
  native_child:stop()
end

vim.fn.delete(workdir, 'rf')
log(failures == 0 and 'nvim e2e: all passed' or ('nvim e2e: %d failed'):format(failures))
os.exit(failures == 0 and 0 or 1)
