-- Ghost text drawn by the plugin, for Neovim 0.10 and 0.11 (0.12 has vim.lsp.inline_completion):
-- textDocument/inlineCompletion after a pause in typing, shown with extmarks, the request
-- cancelled and the text cleared as soon as the cursor moves or the text changes. Several items
-- (the server's choices for an explicit request) are cycled through; a part of the one shown
-- (a word, a line) can be accepted.
local util = require('stablelm.util')

local api = vim.api
local M = {}

M.namespace = api.nvim_create_namespace('stablelm.ghost')

local INVOKED, AUTOMATIC = 1, 2 -- lsp.InlineCompletionTriggerKind

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
---@field items? stablelm.GhostItem[]
---@field index? integer      the item shown

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

local function cancel_request(state)
  if state.request then
    local client = vim.lsp.get_client_by_id(state.request.client_id)
    if client then
      util.cancel(client, state.request.id)
    end
    state.request = nil
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
  cancel_request(state)
  state.items, state.index = nil, nil
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, M.namespace, 0, -1)
  end
end

--- Draws the item shown, with its place among several as a hint.
local function draw(bufnr, state)
  api.nvim_buf_clear_namespace(bufnr, M.namespace, 0, -1)
  local item = state.items[state.index]
  local shown = item.shown
  local hl = 'StablelmGhost'
  local virt_lines = {}
  for i = 2, #shown do
    virt_lines[#virt_lines + 1] = { { shown[i], hl } }
  end
  local hint = #state.items > 1 and { (' (%d/%d)'):format(state.index, #state.items), 'StablelmGhostHint' } or nil
  local last = #virt_lines > 0 and virt_lines[#virt_lines] or nil
  local first = { { shown[1], hl } }
  if hint then
    table.insert(last or first, hint)
  end
  api.nvim_buf_set_extmark(bufnr, M.namespace, item.at[1], item.at[2], {
    virt_text = first,
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = 'combine',
  })
end

--- The usable items of a response, placed in the buffer: those that continue what is typed.
---@return stablelm.GhostItem[]
local function place(bufnr, client, result, row, col)
  local placed = {}
  for _, item in ipairs(result and (result.items or result) or {}) do
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
          local shown = vim.split(text:sub(#typed + 1), '\n', { plain = true })
          if table.concat(shown, '\n') ~= '' then
            placed[#placed + 1] = {
              client_id = client.id,
              lines = vim.split(text, '\n', { plain = true }),
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
  return placed
end

--- Asks for completions at the cursor; shows item `index` of the answer (wrapping around).
---@param bufnr integer
---@param kind integer lsp.InlineCompletionTriggerKind
---@param index integer
local function request(bufnr, kind, index)
  local state = buffers[bufnr]
  local client = util.client(bufnr)
  local row, col = cursor(bufnr)
  if not state or not client or not row or not api.nvim_get_mode().mode:match('^i') then
    return
  end
  cancel_request(state)
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local win = vim.fn.bufwinid(bufnr)
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = kind }
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
    local items = place(bufnr, client, result, row, col)
    if #items == 0 then
      return
    end
    state.items, state.index = items, (index - 1) % #items + 1
    draw(bufnr, state)
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
      request(bufnr, AUTOMATIC, 1)
    end
  end))
end

---@param bufnr integer
---@return boolean
function M.visible(bufnr)
  return buffers[bufnr] ~= nil and buffers[bufnr].items ~= nil
end

--- Shows the item `step` places on (-1: the one before). With one item shown, or none, asks
--- explicitly, which gets the server's choices. False when there is no server to ask.
---@param bufnr integer
---@param step integer
---@return boolean
function M.cycle(bufnr, step)
  local state = buffers[bufnr]
  if not state then
    return false
  end
  if state.items and #state.items > 1 then
    state.index = (state.index - 1 + step) % #state.items + 1
    draw(bufnr, state)
    return true
  end
  stop_timer(state)
  request(bufnr, INVOKED, 1 + step)
  return state.request ~= nil
end

--- Inserts the ghost text shown in `bufnr`; false when there is none.
---@param bufnr integer
---@return boolean
function M.accept(bufnr)
  local state = buffers[bufnr]
  local item = state and state.items and state.items[state.index]
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

--- Inserts the first part of the ghost text shown, `piece(text)` of it (util.next_word,
--- util.next_line); all of it is an ordinary accept. False when none is shown.
---@param bufnr integer
---@param piece fun(text: string): string
---@param delay_ms integer  before asking for the rest
---@return boolean
function M.accept_part(bufnr, piece, delay_ms)
  local state = buffers[bufnr]
  local item = state and state.items and state.items[state.index]
  if not item then
    return false
  end
  local rest = table.concat(item.shown, '\n')
  local part = piece(rest)
  if part == rest then
    return M.accept(bufnr)
  end
  M.clear(bufnr)
  local lines = vim.split(part, '\n', { plain = true })
  local row, col = item.at[1], item.at[2]
  api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  api.nvim_win_set_cursor(vim.fn.bufwinid(bufnr), { row + #lines, (#lines == 1 and col or 0) + #lines[#lines] })
  -- The server answers the rest from memory: the part typed is what it suggested.
  M.schedule(bufnr, delay_ms)
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
