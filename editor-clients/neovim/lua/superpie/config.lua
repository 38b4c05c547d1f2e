--- The plugin's options: defaults, merged with what `setup{}` is given, checked once.
local M = {}

---@class superpie.Keymaps
---@field accept string|false accept the whole suggestion (falls back to the key itself when none is shown)
---@field accept_word string|false
---@field accept_line string|false
---@field next string|false show the next draft (asks for all drafts the first time)
---@field prev string|false
---@field dismiss string|false
---@field trigger string|false ask for suggestions now (an Invoked request: all drafts)

---@class superpie.Config
---@field cmd string[]? the full server command; overrides `command`, `python` and `args`
---@field command string the `superpie` executable
---@field python string? a Python with superpie installed: runs `python -m lsp_server.cli serve`
---@field args string[] extra options after `serve`, e.g. { '--log-file', '/tmp/superpie.log' }
---@field cmd_env table<string,string>? extra environment variables for the server
---@field settings table<string,any> server options (`superpie.*`, camelCase): sent as initializationOptions and answered to workspace/configuration
---@field filetypes string[]|nil attach only to these filetypes (nil: every normal file buffer)
---@field auto_trigger boolean ask for a suggestion as you type (otherwise only with the trigger key)
---@field debounce_ms integer wait this long after the last keystroke before asking
---@field debounce_text_changes integer vim.lsp's didChange batching, in ms
---@field native boolean|nil use vim.lsp.inline_completion (Neovim >= 0.12); nil: when available
---@field hl_group string highlight of the ghost text
---@field keymaps superpie.Keymaps
M.defaults = {
  cmd = nil,
  command = 'superpie',
  python = nil,
  args = {},
  cmd_env = nil,
  settings = {},
  filetypes = nil,
  auto_trigger = true,
  debounce_ms = 75,
  debounce_text_changes = 50,
  native = nil,
  hl_group = 'SuperpieGhostText',
  keymaps = {
    accept = '<Tab>',
    accept_word = '<M-Right>',
    accept_line = '<M-C-Right>',
    next = '<M-]>',
    prev = '<M-[>',
    dismiss = '<C-]>',
    trigger = '<M-\\>',
  },
}

--- The server option names (lsp_server/options.py, camelCase on the wire).
M.server_options = {
  'model', 'quantization', 'drafts', 'automaticDrafts', 'draftMethod', 'maxTokens', 'scope', 'speculative',
  'layout', 'cacheMode', 'memoryBudgetMb', 'persistMaxMb', 'idleRows', 'refresh', 'prefetch',
  'crossFileContext', 'crossFileTokens', 'logLevel',
}

---@type superpie.Config
M.values = vim.deepcopy(M.defaults)

--- Merges `opts` over the defaults. Returns the config and a list of problems (unknown keys), which
--- setup reports once instead of failing: a typo must not cost the user their editor start.
---@param opts table?
---@return superpie.Config, string[]
function M.resolve(opts)
  opts = opts or {}
  local problems = {}
  for key in pairs(opts) do
    if M.defaults[key] == nil and key ~= 'cmd' and key ~= 'python' and key ~= 'cmd_env'
        and key ~= 'filetypes' and key ~= 'native' then
      table.insert(problems, ('unknown option %q'):format(key))
    end
  end
  for key in pairs(opts.settings or {}) do
    if not vim.tbl_contains(M.server_options, key) then
      table.insert(problems, ('unknown server setting %q (known: %s)'):format(key, table.concat(M.server_options, ', ')))
    end
  end
  local config = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts)
  return config, problems
end

--- The server command line for a config.
---@param config superpie.Config
---@return string[]
function M.command_line(config)
  if config.cmd then
    return config.cmd
  end
  if config.python and config.python ~= '' then
    return vim.list_extend({ config.python, '-m', 'lsp_server.cli', 'serve' }, config.args)
  end
  return vim.list_extend({ config.command, 'serve' }, config.args)
end

return M
