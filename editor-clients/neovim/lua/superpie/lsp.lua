--- The few vim.lsp calls whose form changed between Neovim 0.10 (`client.request(...)`) and 0.11
--- (`client:request(...)`), in one place.
local M = {}

M.name = 'superpie'

local has_011 = vim.fn.has('nvim-0.11') == 1

---@param bufnr integer?
---@return vim.lsp.Client?
function M.client_for(bufnr)
  local clients = vim.lsp.get_clients({ name = M.name, bufnr = bufnr })
  return clients[1]
end

---@return vim.lsp.Client[]
function M.clients()
  return vim.lsp.get_clients({ name = M.name })
end

---@return boolean, integer?
function M.request(client, method, params, handler, bufnr)
  if has_011 then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

function M.cancel(client, id)
  if has_011 then
    client:cancel_request(id)
  else
    client.cancel_request(id)
  end
end

--- Synchronous request with a timeout, for commands and :checkhealth.
---@return { err: table?, result: any }?, string?
function M.request_sync(client, method, params, timeout_ms, bufnr)
  if has_011 then
    return client:request_sync(method, params, timeout_ms, bufnr)
  end
  return client.request_sync(method, params, timeout_ms, bufnr)
end

function M.stop(client, force)
  if has_011 then
    client:stop(force)
  else
    client.stop(force)
  end
end

--- A protocol position's character -> byte column in the buffer line, in the client's encoding.
---@param bufnr integer
---@param position { line: integer, character: integer }
---@param encoding string
---@return integer
function M.byte_col(bufnr, position, encoding)
  local line = vim.api.nvim_buf_get_lines(bufnr, position.line, position.line + 1, false)[1] or ''
  if encoding == 'utf-8' then
    return math.min(position.character, #line)
  end
  if has_011 then
    return vim.str_byteindex(line, encoding, position.character, false)
  end
  return vim.str_byteindex(line, position.character, encoding == 'utf-16')
end

return M
