-- Ghost text drawn by the plugin, for Neovim 0.10 and 0.11 (0.12 has vim.lsp.inline_completion):
-- textDocument/inlineCompletion after a pause in typing, shown with extmarks, the request
-- cancelled and the text cleared as soon as the cursor moves or the text changes.
local util = require('stablelm.util')

local api = vim.api
local M = {}

M.namespace = api.nvim_create_namespace('stablelm.ghost')

---@class stablelm.GhostItem
---@field client_id integer
---@field lines string[]      the text to insert, split at newlines
---@field start [integer, integer]  0-based row, byte column where it goes
---@field end_ [integer, integer]   end of the text it replaces (auto-closed brackets)
---@field at [integer, integer]     the cursor, where the ghost text is drawn
---@field shown string[]      what is drawn: the text minus what is already typed
---@field command? lsp.Command

---@class stablelm.GhostState
---@field timer? uv.uv_timer_t
---@field request? { client_id: integer, id: integer }
---@field item? stablelm.GhostItem

---@type table<integer, stablelm.GhostState>
local buffers = {}

local function cursor(bufnr)
  local win = vim.fn.bufwinid(bufnr)
  if win == -1 then
    return nil
  end
  local pos = api.nvim_win_get_cursor(win)
  return pos[1] - 1, pos[2]
end

local function stop_timer(state)
  if state.timer then
    state.timer:stop()
    state.timer:close()
    state.timer = nil
  end
end

--- Cancels the request in flight and removes the ghost text.
---@param bufnr integer
function M.clear(bufnr)
  local state = buffers[bufnr]
  if not state then
    return
  end
  stop_timer(state)
  if state.request then
    local client = vim.lsp.get_client_by_id(state.request.client_id)
    if client then
      util.cancel(client, state.request.id)
    end
    state.request = nil
  end
  state.item = nil
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, M.namespace, 0, -1)
  end
end

local function draw(bufnr, item)
  local shown = item.shown
  local hl = 'StablelmGhost'
  local virt_lines = {}
  for i = 2, #shown do
    virt_lines[#virt_lines + 1] = { { shown[i], hl } }
  end
  api.nvim_buf_set_extmark(bufnr, M.namespace, item.at[1], item.at[2], {
    virt_text = { { shown[1], hl } },
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = 'combine',
  })
end

--- The first usable item of a response, placed in the buffer; nil when there is none or the
--- item does not continue what is typed.
---@return stablelm.GhostItem?
local function place(bufnr, client, result, row, col)
  local items = result and (result.items or result) or {}
  for _, item in ipairs(items) do
    local text = type(item.insertText) == 'string' and item.insertText or (item.insertText or {}).value
    if text and text ~= '' then
      local start, end_ = { row, col }, { row, col }
      if item.range then
        start = { util.buf_position(bufnr, item.range.start, client.offset_encoding) }
        end_ = { util.buf_position(bufnr, item.range['end'], client.offset_encoding) }
      end
      -- The item's range may start before the cursor: the typed part must match the text.
      if start[1] == row and start[2] <= col then
        local typed = api.nvim_buf_get_text(bufnr, row, start[2], row, col, {})[1]
        if text:sub(1, #typed) == typed then
          local lines = vim.split(text, '\n', { plain = true })
          local shown = vim.split(text:sub(#typed + 1), '\n', { plain = true })
          if table.concat(shown, '\n') ~= '' then
            return {
              client_id = client.id,
              lines = lines,
              start = start,
              end_ = end_,
              at = { row, col },
              shown = shown,
              command = item.command,
            }
          end
        end
      end
    end
  end
end

---@param bufnr integer
local function request(bufnr)
  local state = buffers[bufnr]
  local client = util.client(bufnr)
  local row, col = cursor(bufnr)
  if not state or not client or not row or not api.nvim_get_mode().mode:match('^i') then
    return
  end
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local win = vim.fn.bufwinid(bufnr)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = 2 } -- Automatic
  local id
  id = util.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    if not state.request or state.request.id ~= id then
      return -- superseded or cancelled
    end
    state.request = nil
    local r, c = cursor(bufnr)
    if err or api.nvim_buf_get_changedtick(bufnr) ~= tick or r ~= row or c ~= col then
      return
    end
    state.item = place(bufnr, client, result, row, col)
    if state.item then
      draw(bufnr, state.item)
    end
  end, bufnr)
  if id then
    state.request = { client_id = client.id, id = id }
  end
end

--- Clears what is shown and asks again after `delay_ms` without typing.
---@param bufnr integer
---@param delay_ms integer
function M.schedule(bufnr, delay_ms)
  local state = buffers[bufnr]
  if not state then
    return
  end
  M.clear(bufnr)
  state.timer = vim.uv.new_timer()
  state.timer:start(delay_ms, 0, vim.schedule_wrap(function()
    stop_timer(state)
    if api.nvim_buf_is_valid(bufnr) and api.nvim_get_current_buf() == bufnr then
      request(bufnr)
    end
  end))
end

---@param bufnr integer
---@return boolean
function M.visible(bufnr)
  return buffers[bufnr] ~= nil and buffers[bufnr].item ~= nil
end

--- Inserts the ghost text shown in `bufnr`; false when there is none.
---@param bufnr integer
---@return boolean
function M.accept(bufnr)
  local state = buffers[bufnr]
  local item = state and state.item
  if not item then
    return false
  end
  M.clear(bufnr)
  api.nvim_buf_set_text(bufnr, item.start[1], item.start[2], item.end_[1], item.end_[2], item.lines)
  local last = item.lines[#item.lines]
  local row = item.start[1] + #item.lines - 1
  local col = (#item.lines == 1 and item.start[2] or 0) + #last
  api.nvim_win_set_cursor(vim.fn.bufwinid(bufnr), { row + 1, col })
  local client = vim.lsp.get_client_by_id(item.client_id)
  if client and item.command then
    util.forward_command(client, item.command, bufnr)
  end
  return true
end

--- Starts ghost text in `bufnr`: typing asks for a completion after `delay_ms`.
---@param bufnr integer
---@param delay_ms integer
function M.attach(bufnr, delay_ms)
  if buffers[bufnr] then
    return
  end
  buffers[bufnr] = {}
  local group = api.nvim_create_augroup('stablelm.ghost.' .. bufnr, { clear = true })
  api.nvim_create_autocmd({ 'InsertEnter', 'TextChangedI', 'CursorMovedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      M.schedule(bufnr, delay_ms)
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      M.clear(bufnr)
    end,
  })
  api.nvim_create_autocmd('BufWipeout', {
    group = group,
    buffer = bufnr,
    callback = function()
      M.detach(bufnr)
    end,
  })
  api.nvim_create_autocmd('LspDetach', {
    group = group,
    buffer = bufnr,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == util.name then
        M.detach(bufnr)
      end
    end,
  })
end

---@param bufnr integer
function M.detach(bufnr)
  if not buffers[bufnr] then
    return
  end
  M.clear(bufnr)
  buffers[bufnr] = nil
  pcall(api.nvim_del_augroup_by_name, 'stablelm.ghost.' .. bufnr)
end

return M
