-- :checkhealth stablelm: the Neovim version and completion mode, the server command, and what the
-- running server reports (stablelm.status: model, state, device, counters).
local util = require('stablelm.util')

local M = {}

local health = vim.health

local function check_neovim(stablelm)
  if vim.fn.has('nvim-0.10') == 0 then
    health.error('Neovim 0.10 or newer is needed')
    return
  end
  local v = vim.version()
  local native = vim.lsp.inline_completion ~= nil and vim.fn.has('nvim-0.12') == 1 and stablelm.options.inline ~= 'plugin'
  health.ok(('Neovim %d.%d.%d: %s'):format(v.major, v.minor, v.patch,
    native and 'native inline completion (vim.lsp.inline_completion)' or 'the plugin draws the ghost text'))
end

local function check_command(stablelm)
  local cmd = stablelm.server_cmd()
  local line = table.concat(cmd, ' ')
  if vim.fn.executable(cmd[1]) == 1 then
    health.ok('server command: ' .. line)
  else
    health.error('server command not found: ' .. line, {
      'Install the server (scripts/setup.sh in the stablelm-lsp checkout)',
      "and pass its path: require('stablelm').setup({ cmd = { '/path/to/.venv/bin/stablelm-lsp', '--stdio' } })",
    })
  end
  local settings = vim.inspect(stablelm.options.settings, { newline = ' ', indent = '' })
  health.info('settings: ' .. settings)
end

local function check_server()
  local client = util.client()
  if not client then
    health.warn('the server is not running', { 'Open a file: the server starts when a buffer with a filetype is loaded' })
    return
  end
  health.ok(('server running (client id %d, position encoding %s)'):format(client.id, client.offset_encoding))
  local response, err = util.request_sync(client, 'workspace/executeCommand', { command = 'stablelm.status' }, 3000)
  if not response then
    health.error('stablelm.status did not answer: ' .. tostring(err))
    return
  end
  if response.err then
    health.error('stablelm.status failed: ' .. (response.err.message or vim.inspect(response.err)))
    return
  end
  local status = response.result
  local model = ('%s%s on %s (%s)'):format(status.model, status.builtin and ' (built-in)' or '', status.device, status.dtype)
  if status.state == 'ready' then
    health.ok('model ready: ' .. model)
  elseif status.state == 'loading' or status.state == 'paused' then
    health.info(('model %s: %s'):format(status.state, model))
  else
    health.error(('model %s: %s%s'):format(status.state, model, status.message and (': ' .. status.message) or ''))
  end
  health.info(('completions shown: %d, accepted: %d'):format(status.completionsShown or 0, status.completionsAccepted or 0))
end

function M.check()
  local stablelm = require('stablelm')
  health.start('stablelm')
  check_neovim(stablelm)
  check_command(stablelm)
  check_server()
  if stablelm.is_paused() then
    health.info('completions are paused (:StablelmToggle)')
  end
end

return M
