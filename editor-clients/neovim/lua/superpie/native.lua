--- Ghost text through Neovim's own `vim.lsp.inline_completion` (0.12 and later): the editor requests,
--- draws and cycles; this module only maps the plugin's keys onto it. Partial accepts use
--- `get{ on_accept }`, which hands over the item instead of inserting it.
local text = require('superpie.text')

local M = {}

function M.available()
  return vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.select ~= nil
end

---@param bufnr integer
---@param client_id integer
function M.attach(bufnr, client_id)
  vim.lsp.inline_completion.enable(require('superpie').enabled(), { bufnr = bufnr, client_id = client_id })
end

---@param bufnr integer
function M.set_enabled(bufnr, enabled)
  vim.lsp.inline_completion.enable(enabled, { bufnr = bufnr })
end

---@return boolean
function M.accept()
  return vim.lsp.inline_completion.get()
end

--- Inserts the start of the shown item at the cursor; Neovim then asks again for the rest.
---@param split fun(rest: string): string
---@return boolean
function M.accept_part(split)
  return vim.lsp.inline_completion.get({
    on_accept = function(item)
      local value = type(item.insert_text) == 'string' and item.insert_text or item.insert_text.value
      local row, col = unpack(vim.api.nvim_win_get_cursor(0))
      local typed = ''
      if item.range then
        local line = vim.api.nvim_get_current_line()
        typed = line:sub(item.range.start.col + 1, col)
      end
      local rest = text.after_typed(value, typed)
      if not rest or rest == '' then
        return
      end
      local piece = text.lines(split(rest))
      vim.api.nvim_buf_set_text(0, row - 1, col, row - 1, col, piece)
      vim.api.nvim_win_set_cursor(0, { row + #piece - 1, (#piece == 1 and col or 0) + #piece[#piece] })
    end,
  })
end

---@param count integer
function M.cycle(count)
  vim.lsp.inline_completion.select({ count = count })
end

--- There is no public "hide": disabling and re-enabling the buffer clears the shown item.
---@param bufnr integer
function M.dismiss(bufnr)
  vim.lsp.inline_completion.enable(false, { bufnr = bufnr })
  vim.lsp.inline_completion.enable(require('superpie').enabled(), { bufnr = bufnr })
end

return M
