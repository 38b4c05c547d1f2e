--- Pure text helpers for showing and partly accepting a suggestion. No editor state here, so
--- tests/unit.lua checks them directly.
local M = {}

--- The first "word" of a suggestion, the way editors accept word by word: leading blanks, then a run
--- of identifier characters or else a run of other non-blank characters. A suggestion that starts with
--- a line break accepts the break and the next line's indentation.
---@param text string
---@return string
function M.next_word(text)
  local newline = text:match('^\r?\n[ \t]*')
  if newline then
    return newline
  end
  local word = text:match('^[ \t]*[%w_]+') or text:match('^[ \t]*[^%w_%s]+') or text:match('^[ \t]+')
  return word or text
end

--- The rest of the current line of a suggestion, or, when it starts with a line break, that break and
--- the whole next line.
---@param text string
---@return string
function M.next_line(text)
  local newline = text:match('^\r?\n[^\n]*')
  if newline then
    return newline
  end
  return text:match('^[^\r\n]+') or text
end

--- Splits a suggestion into lines for an extmark: the first line goes after the cursor, the others
--- become virtual lines below.
---@param text string
---@return string[]
function M.lines(text)
  return vim.split(text:gsub('\r\n', '\n'), '\n', { plain = true })
end

--- How much of `typed` (what the user typed since the request) the suggestion already contains: the
--- remaining suggestion, or nil when the user typed something else (the suggestion is stale).
---@param suggestion string
---@param typed string
---@return string?
function M.after_typed(suggestion, typed)
  if typed == '' then
    return suggestion
  end
  if suggestion:sub(1, #typed) == typed then
    return suggestion:sub(#typed + 1)
  end
  return nil
end

--- Drops the text after the cursor that the suggestion ends with (a closing bracket the server
--- replaces over its `range`), so the ghost text does not show it twice.
---@param first_line string the first line of the suggestion
---@param after_cursor string the buffer text after the cursor on that line
---@param replaced integer how many bytes after the cursor the suggestion replaces
---@return string
function M.without_replaced(first_line, after_cursor, replaced)
  if replaced <= 0 then
    return first_line
  end
  local tail = after_cursor:sub(1, replaced)
  if #first_line >= #tail and first_line:sub(-#tail) == tail then
    return first_line:sub(1, #first_line - #tail)
  end
  return first_line
end

return M
