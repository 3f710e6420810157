-- :StablelmChat: a markdown buffer in a split holding the conversation. Each question is one
-- `stablelm.chat` request (workspace/executeCommand) with the conversation so far and the current
-- file (and the selected lines) as context; the reply streams in from stablelm/chatDelta.
local util = require('stablelm.util')

local api = vim.api
local M = {}

local BUFFER_NAME = 'stablelm://chat'

---@class stablelm.ChatPending
---@field chat_id string
---@field client_id integer
---@field request_id? integer
---@field text string    the reply streamed so far
---@field first_line integer  0-based line of the reply's first line in the chat buffer

---@type { messages: { role: string, content: string }[], pending?: stablelm.ChatPending, count: integer }
local conversation = { messages = {}, count = 0 }

---@type integer?
local chat_buf

--- Options from setup(): { split = 'vertical'|'horizontal', width?, height? }.
M.options = { split = 'vertical' }

local function buffer()
  if chat_buf and api.nvim_buf_is_valid(chat_buf) then
    return chat_buf
  end
  chat_buf = api.nvim_create_buf(false, true)
  api.nvim_buf_set_name(chat_buf, BUFFER_NAME)
  vim.bo[chat_buf].buftype = 'nofile'
  vim.bo[chat_buf].bufhidden = 'hide'
  vim.bo[chat_buf].swapfile = false
  vim.bo[chat_buf].filetype = 'markdown'
  vim.keymap.set('n', '<C-c>', M.stop, { buffer = chat_buf, desc = 'Stop the StableLM reply' })
  vim.keymap.set('n', 'q', '<cmd>close<cr>', { buffer = chat_buf, desc = 'Close the StableLM chat' })
  return chat_buf
end

--- The chat buffer, shown in a split (reused when it is already visible).
---@return integer bufnr
local function show()
  local bufnr = buffer()
  local win = vim.fn.bufwinid(bufnr)
  if win == -1 then
    local current = api.nvim_get_current_win()
    vim.cmd(M.options.split == 'horizontal' and 'botright split' or 'botright vsplit')
    win = api.nvim_get_current_win()
    api.nvim_win_set_buf(win, bufnr)
    vim.wo[win].wrap = true
    vim.wo[win].linebreak = true
    api.nvim_set_current_win(current)
  end
  return bufnr
end

local function line_count(bufnr)
  return api.nvim_buf_line_count(bufnr)
end

--- Appends `lines` at the end of the chat buffer and scrolls its window there.
local function append(bufnr, lines)
  local last = api.nvim_buf_get_lines(bufnr, -2, -1, false)[1]
  local start = (line_count(bufnr) == 1 and last == '') and 0 or line_count(bufnr)
  api.nvim_buf_set_lines(bufnr, start, -1, false, lines)
  local win = vim.fn.bufwinid(bufnr)
  if win ~= -1 then
    api.nvim_win_set_cursor(win, { line_count(bufnr), 0 })
  end
end

--- Replaces the reply (from its first line to the end of the buffer) with `text`.
local function set_reply(bufnr, first_line, text)
  api.nvim_buf_set_lines(bufnr, first_line, -1, false, vim.split(text, '\n', { plain = true }))
  local win = vim.fn.bufwinid(bufnr)
  if win ~= -1 then
    api.nvim_win_set_cursor(win, { line_count(bufnr), 0 })
  end
end

--- stablelm/chatDelta handler.
---@param params { chatId: string, delta: string }
function M.on_delta(params)
  local pending = conversation.pending
  if not pending or params.chatId ~= pending.chat_id or not chat_buf then
    return
  end
  pending.text = pending.text .. params.delta
  set_reply(chat_buf, pending.first_line, pending.text)
end

local function finish(err, result)
  local pending = conversation.pending
  if not pending then
    return
  end
  conversation.pending = nil
  local question = conversation.messages[#conversation.messages]
  local text, note = pending.text, nil
  if err then
    -- RequestCancelled (-32800): stopped by the user; the streamed text stays.
    note = err.code == -32800 and 'stopped' or ('error: ' .. (err.message or vim.inspect(err)))
  else
    text = result.text or text
    note = result.finishReason == 'cancelled' and 'stopped' or nil
  end
  if text == '' then
    -- No reply to keep: the question is not sent again with the next one.
    table.remove(conversation.messages)
  else
    conversation.messages[#conversation.messages + 1] = { role = 'assistant', content = text }
  end
  if chat_buf and api.nvim_buf_is_valid(chat_buf) then
    set_reply(chat_buf, pending.first_line, text)
    append(chat_buf, note and { '', '_(' .. note .. ')_', '' } or { '' })
  end
  vim.api.nvim_exec_autocmds('User', { pattern = 'StablelmChatDone', modeline = false, data = { text = text, note = note, question = question.content } })
end

--- The file the question is about: the current buffer (when the server has it open) and the
--- selected lines.
---@param source integer
---@param client vim.lsp.Client
---@param range? { line1: integer, line2: integer }
local function context(source, client, range)
  if not client.attached_buffers[source] then
    return nil
  end
  local ctx = { uri = vim.uri_from_bufnr(source) }
  if range then
    ctx.range = {
      start = { line = range.line1 - 1, character = 0 },
      ['end'] = { line = range.line2, character = 0 },
    }
  end
  return ctx
end

--- Asks `question` about the current buffer (and `range` of its lines).
---@param question string
---@param range? { line1: integer, line2: integer }
function M.ask(question, range)
  question = vim.trim(question or '')
  if question == '' then
    return
  end
  if conversation.pending then
    vim.notify('StableLM is still answering: <C-c> in the chat stops it', vim.log.levels.WARN)
    return
  end
  local source = api.nvim_get_current_buf()
  if source == chat_buf then
    source = vim.fn.bufnr('#')
  end
  local client = util.client(source > 0 and source or nil) or util.client()
  if not client then
    vim.notify('StableLM: the server is not running (open a file first)', vim.log.levels.ERROR)
    return
  end
  local ctx = context(source, client, range)
  local bufnr = show()
  local header = { '## You', '' }
  vim.list_extend(header, vim.split(question, '\n', { plain = true }))
  if ctx then
    local name = vim.fn.fnamemodify(api.nvim_buf_get_name(source), ':t')
    local lines = range and (':%d-%d'):format(range.line1, range.line2) or ''
    vim.list_extend(header, { '', ('_(context: %s%s)_'):format(name, lines) })
  end
  vim.list_extend(header, { '', '## StableLM', '', '' })
  append(bufnr, header)

  conversation.messages[#conversation.messages + 1] = { role = 'user', content = question }
  conversation.count = conversation.count + 1
  local pending = {
    chat_id = ('nvim-%d-%d'):format(vim.fn.getpid(), conversation.count),
    client_id = client.id,
    text = '',
    first_line = line_count(bufnr) - 1,
  }
  conversation.pending = pending
  pending.request_id = util.request(client, 'workspace/executeCommand', {
    command = 'stablelm.chat',
    arguments = { { chatId = pending.chat_id, messages = vim.deepcopy(conversation.messages), context = ctx } },
  }, function(err, result)
    if conversation.pending == pending then
      finish(err, result)
    end
  end)
  if not pending.request_id then
    finish({ code = 0, message = 'the server did not take the request' })
  end
end

--- Stops the reply being generated ($/cancelRequest). Neovim drops the server's RequestCancelled
--- answer without calling the handler, so the reply ends here, with the text streamed so far.
function M.stop()
  local pending = conversation.pending
  if not pending then
    return
  end
  local client = vim.lsp.get_client_by_id(pending.client_id)
  if client and pending.request_id then
    util.cancel(client, pending.request_id)
  end
  finish({ code = -32800, message = 'stopped' })
end

--- Starts a new conversation (stopping a reply in progress).
function M.reset()
  M.stop()
  conversation.pending = nil
  conversation.messages = {}
  if chat_buf and api.nvim_buf_is_valid(chat_buf) then
    api.nvim_buf_set_lines(chat_buf, 0, -1, false, {})
  end
end

--- :StablelmChat [question]: asks, or prompts for the question when there is none.
---@param args { args: string, range: integer, line1: integer, line2: integer, bang: boolean }
function M.command(args)
  if args.bang then
    M.reset()
  end
  local range = args.range > 0 and { line1 = args.line1, line2 = args.line2 } or nil
  if args.args ~= '' then
    M.ask(args.args, range)
    return
  end
  vim.ui.input({ prompt = 'StableLM> ' }, function(question)
    if question then
      M.ask(question, range)
    end
  end)
end

return M
