--- Ghost text for Neovim 0.10/0.11, which have no `vim.lsp.inline_completion`: asks the server for
--- `textDocument/inlineCompletion` as you type, shows the current draft as an inline extmark (further
--- lines as virtual lines), and accepts it whole, by word or by line. One `Ghost` per buffer.
local text = require('superpie.text')
local lsp = require('superpie.lsp')

local api = vim.api
local ns = api.nvim_create_namespace('superpie.ghost')

local INVOKED, AUTOMATIC = 1, 2

---@class superpie.Item
---@field text string the suggestion, from the anchor on
---@field replace_end integer? byte column (at request time) up to which the suggestion replaces the line

---@class superpie.Ghost
---@field bufnr integer
---@field config superpie.Config
---@field items superpie.Item[]
---@field index integer
---@field invoked boolean the items came from an Invoked request (all drafts)
---@field anchor [integer, integer]? 0-based row and byte column where the items start
---@field request_id integer?
---@field request_client vim.lsp.Client?
---@field timer uv.uv_timer_t?
---@field own_tick integer? changedtick of the buffer after our own partial accept
---@field show_index boolean
local Ghost = {}
Ghost.__index = Ghost

---@type table<integer, superpie.Ghost>
Ghost.active = {}

local function cursor()
  local pos = api.nvim_win_get_cursor(0)
  return pos[1] - 1, pos[2]
end

local function in_insert_mode()
  return api.nvim_get_mode().mode:sub(1, 1) == 'i'
end

---@param bufnr integer
---@param config superpie.Config
---@return superpie.Ghost
function Ghost.attach(bufnr, config)
  local existing = Ghost.active[bufnr]
  if existing then
    existing.config = config
    return existing
  end
  local self = setmetatable({ bufnr = bufnr, config = config, items = {}, index = 1, invoked = false,
                              show_index = false }, Ghost)
  Ghost.active[bufnr] = self
  local group = api.nvim_create_augroup('superpie.ghost.' .. bufnr, { clear = true })
  api.nvim_create_autocmd({ 'TextChangedI', 'CursorMovedI' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      self:on_edit()
    end,
  })
  api.nvim_create_autocmd({ 'InsertLeave', 'BufLeave' }, {
    group = group,
    buffer = bufnr,
    callback = function()
      self:dismiss()
    end,
  })
  api.nvim_create_autocmd('BufUnload', {
    group = group,
    buffer = bufnr,
    callback = function()
      self:detach()
    end,
  })
  return self
end

function Ghost:detach()
  self:dismiss()
  pcall(api.nvim_del_augroup_by_name, 'superpie.ghost.' .. self.bufnr)
  Ghost.active[self.bufnr] = nil
end

--- The current draft, with what the user typed since the request taken off, or nil when there is none
--- or the user typed something else.
---@return string?, superpie.Item?
function Ghost:remaining()
  local item = self.items[self.index]
  if not item or not self.anchor or api.nvim_get_current_buf() ~= self.bufnr then
    return nil
  end
  local row, col = cursor()
  if row ~= self.anchor[1] or col < self.anchor[2] then
    return nil
  end
  local line = api.nvim_buf_get_lines(self.bufnr, row, row + 1, true)[1]
  local rest = text.after_typed(item.text, line:sub(self.anchor[2] + 1, col))
  if rest == nil or rest == '' then
    return nil
  end
  return rest, item
end

function Ghost:visible()
  return self:remaining() ~= nil
end

--- Draws the current draft at the cursor; clears it when it no longer applies.
function Ghost:render()
  api.nvim_buf_clear_namespace(self.bufnr, ns, 0, -1)
  local rest, item = self:remaining()
  if not rest or not item then
    return
  end
  local row, col = cursor()
  local line = api.nvim_buf_get_lines(self.bufnr, row, row + 1, true)[1]
  local lines = text.lines(rest)
  local typed = col - self.anchor[2]
  local replaced = item.replace_end and (item.replace_end + typed - col) or 0
  local first = lines[1]
  if #lines == 1 then
    first = text.without_replaced(first, line:sub(col + 1), replaced)
  end
  local virt_text = { { first, self.config.hl_group } }
  if self.show_index and #self.items > 1 then
    table.insert(virt_text, { (' (%d/%d)'):format(self.index, #self.items), 'Comment' })
  end
  local virt_lines = {}
  for i = 2, #lines do
    table.insert(virt_lines, { { lines[i], self.config.hl_group } })
  end
  api.nvim_buf_set_extmark(self.bufnr, ns, row, col, {
    virt_text = virt_text,
    virt_text_pos = 'inline',
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = 'combine',
  })
end

--- Typing: keep the suggestion while the user types through it, otherwise ask again after a pause.
function Ghost:on_edit()
  if self.own_tick and api.nvim_buf_get_changedtick(self.bufnr) == self.own_tick then
    self:render() -- our own partial accept: the rest of the draft stays, no new request
    return
  end
  self.own_tick = nil
  if self:visible() then
    self:render()
    return
  end
  self:clear()
  if self.config.auto_trigger and require('superpie').enabled() then
    self:schedule(AUTOMATIC)
  end
end

---@param kind integer
---@param on_items fun()?
function Ghost:schedule(kind, on_items)
  self:stop_timer()
  if self.config.debounce_ms <= 0 then
    self:request(kind, on_items)
    return
  end
  self.timer = vim.defer_fn(function()
    self.timer = nil
    self:request(kind, on_items)
  end, self.config.debounce_ms)
end

function Ghost:stop_timer()
  if self.timer then
    if not self.timer:is_closing() then
      self.timer:stop()
      self.timer:close()
    end
    self.timer = nil
  end
end

function Ghost:cancel()
  if self.request_id and self.request_client then
    lsp.cancel(self.request_client, self.request_id)
  end
  self.request_id, self.request_client = nil, nil
end

--- Sends one request at the cursor; the answer is dropped if the buffer or the cursor moved meanwhile.
---@param kind integer INVOKED or AUTOMATIC
---@param on_items fun()? called after the items are in place
function Ghost:request(kind, on_items)
  self:cancel()
  if api.nvim_get_current_buf() ~= self.bufnr or not in_insert_mode() then
    return
  end
  local client = lsp.client_for(self.bufnr)
  if not client then
    return
  end
  local row, col = cursor()
  local tick = api.nvim_buf_get_changedtick(self.bufnr)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = kind }
  local ok, id = lsp.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    if self.request_id ~= nil and id ~= nil and self.request_id ~= id then
      return -- a later request replaced this one
    end
    self.request_id, self.request_client = nil, nil
    if err or not result then
      return
    end
    local now_row, now_col = cursor()
    if api.nvim_buf_get_changedtick(self.bufnr) ~= tick or now_row ~= row or now_col ~= col
        or api.nvim_get_current_buf() ~= self.bufnr or not in_insert_mode() then
      return
    end
    self.items = self:normalize(client, result.items or result, row)
    self.index = 1
    self.invoked = kind == INVOKED
    self.show_index = false
    self.anchor = { row, col }
    if on_items then
      on_items()
    end
    self:render()
  end, self.bufnr)
  if ok then
    self.request_id, self.request_client = id, client
  end
end

--- Protocol items -> drafts as text from the cursor, with their replaced range in bytes.
---@return superpie.Item[]
function Ghost:normalize(client, raw_items, row)
  local items, seen = {}, {}
  for _, raw in ipairs(raw_items or {}) do
    local value = type(raw.insertText) == 'string' and raw.insertText or (raw.insertText or {}).value
    if type(value) == 'string' and value ~= '' and not seen[value] then
      seen[value] = true
      local item = { text = value }
      if raw.range and raw.range['end'].line == row then
        item.replace_end = lsp.byte_col(self.bufnr, raw.range['end'], client.offset_encoding)
      end
      table.insert(items, item)
    end
  end
  return items
end

--- Inserts `piece` (the start of the current draft) at the cursor; `whole` also replaces the text the
--- draft replaces after the cursor.
---@param piece string
---@param item superpie.Item
---@param whole boolean
function Ghost:insert(piece, item, whole)
  local row, col = cursor()
  local end_col = col
  if whole and item.replace_end then
    local typed = col - self.anchor[2]
    local line = api.nvim_buf_get_lines(self.bufnr, row, row + 1, true)[1]
    end_col = math.min(#line, math.max(col, item.replace_end + typed))
  end
  local lines = text.lines(piece)
  api.nvim_buf_set_text(self.bufnr, row, col, row, end_col, lines)
  local last_row = row + #lines - 1
  local last_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { last_row + 1, last_col })
  return last_row, last_col
end

--- Accepts the whole current draft. Returns false when nothing is shown.
---@return boolean
function Ghost:accept()
  local rest, item = self:remaining()
  if not rest or not item then
    return false
  end
  self:clear()
  self:insert(rest, item, true)
  return true
end

--- Accepts the next word or line of the current draft and keeps showing the rest.
---@param split fun(rest: string): string
---@return boolean
function Ghost:accept_part(split)
  local rest, item = self:remaining()
  if not rest or not item then
    return false
  end
  local piece = split(rest)
  if piece == rest then
    return self:accept()
  end
  local row, col = self:insert(piece, item, false)
  if row ~= self.anchor[1] then
    -- A line break was accepted: the rest of the draft now starts on the new line.
    self.items = { { text = rest:sub(#piece + 1) } }
    self.index, self.anchor = 1, { row, col }
  end
  self.own_tick = api.nvim_buf_get_changedtick(self.bufnr)
  self:render()
  return true
end

--- Shows the next (count > 0) or previous draft. The first time, asks for all drafts (an Invoked
--- request), as the as-you-type request returns only the best one.
---@param count integer
function Ghost:cycle(count)
  local function step()
    if #self.items == 0 then
      return
    end
    self.index = (self.index - 1 + count) % #self.items + 1
    self.show_index = true
    self:render()
  end
  if not self.invoked then
    self:stop_timer()
    self:request(INVOKED, step)
    return
  end
  step()
end

--- Asks for all drafts now (the trigger key).
function Ghost:trigger()
  self:stop_timer()
  self:request(INVOKED, function()
    self.show_index = true
  end)
end

--- Clears the shown draft and forgets the items.
function Ghost:clear()
  api.nvim_buf_clear_namespace(self.bufnr, ns, 0, -1)
  self.items, self.index, self.anchor, self.invoked, self.show_index = {}, 1, nil, false, false
end

--- Hides the suggestion and drops pending work.
function Ghost:dismiss()
  self:stop_timer()
  self:cancel()
  self:clear()
end

--- The draft texts as shown now (for tests and :checkhealth).
---@return { items: string[], index: integer, invoked: boolean, shown: string? }
function Ghost:state()
  local texts = {}
  for _, item in ipairs(self.items) do
    table.insert(texts, item.text)
  end
  local shown
  local marks = api.nvim_buf_get_extmarks(self.bufnr, ns, 0, -1, { details = true })
  if marks[1] then
    local details = marks[1][4]
    local parts = {}
    for _, chunk in ipairs(details.virt_text or {}) do
      if chunk[2] == self.config.hl_group then
        table.insert(parts, chunk[1])
      end
    end
    for _, virt_line in ipairs(details.virt_lines or {}) do
      table.insert(parts, '\n' .. virt_line[1][1])
    end
    shown = table.concat(parts)
  end
  return { items = texts, index = self.index, invoked = self.invoked, shown = shown }
end

Ghost.namespace = ns
Ghost.INVOKED, Ghost.AUTOMATIC = INVOKED, AUTOMATIC
return Ghost
