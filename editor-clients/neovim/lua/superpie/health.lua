--- `:checkhealth superpie`: the Neovim version and ghost-text mode, the server command, the running
--- server and its model.
local config_mod = require('superpie.config')
local lsp = require('superpie.lsp')

local M = {}

local health = vim.health

local function check_editor()
  health.start('superpie: editor')
  if vim.fn.has('nvim-0.10') == 1 then
    health.ok(('Neovim %s'):format(tostring(vim.version())))
  else
    health.error('Neovim 0.10 or later is needed (inline virtual text)')
  end
  local info = require('superpie').info()
  if info.native then
    health.ok('ghost text: vim.lsp.inline_completion (native)')
  elseif require('superpie.native').available() then
    health.info('ghost text: the plugin\'s renderer (native = false in setup)')
  else
    health.ok('ghost text: the plugin\'s renderer (this Neovim has no vim.lsp.inline_completion)')
  end
  for _, problem in ipairs(info.problems) do
    health.warn('setup: ' .. problem)
  end
  if not info.enabled then
    health.info('inline completions are toggled off (:Superpie toggle)')
  end
end

local function check_command(config)
  health.start('superpie: server command')
  local cmd = config_mod.command_line(config)
  health.info('command: ' .. table.concat(cmd, ' '))
  if vim.fn.executable(cmd[1]) ~= 1 then
    health.error(('`%s` is not executable'):format(cmd[1]), {
      'Install superpie (`pip install .` in its repository) so that `superpie` is on PATH,',
      'or point setup{ command = ... } or setup{ python = ... } at it.',
    })
    return
  end
  -- `... serve --help` proves that the installed superpie has the server, without starting it.
  local help = vim.deepcopy(cmd)
  for i, arg in ipairs(cmd) do
    if arg == 'serve' then
      help = vim.list_slice(cmd, 1, i)
      break
    end
  end
  table.insert(help, '--help')
  local ok, result = pcall(function()
    return vim.system(help, { text = true, env = config.cmd_env }):wait(20000)
  end)
  if ok and result.code == 0 then
    health.ok('`' .. table.concat(help, ' ') .. '` runs')
  else
    health.error('`' .. table.concat(help, ' ') .. '` failed: '
      .. (ok and (result.stderr or ''):sub(1, 300) or tostring(result)))
  end
end

local function check_server()
  health.start('superpie: server')
  local client = lsp.clients()[1]
  if not client then
    health.warn('no superpie server is running: open a file (setup{} must have been called)')
    return
  end
  health.ok(('running (client id %d), positions in %s'):format(client.id, client.offset_encoding))
  local caps = client.server_capabilities or {}
  if caps.inlineCompletionProvider then
    health.ok('the server offers textDocument/inlineCompletion')
  else
    health.error('the server does not offer textDocument/inlineCompletion')
  end
  local response = lsp.request_sync(client, 'workspace/executeCommand', { command = 'superpie.stats', arguments = {} }, 5000)
  if not response or response.err or not response.result then
    health.warn('superpie.stats did not answer within 5 s')
    return
  end
  local server = response.result.server or {}
  local model = (server.settings or {}).model or '?'
  if server.model_state == 'ready' then
    health.ok(('model %s is loaded'):format(model))
  elseif server.model_state == 'failed' then
    health.error(('model %s failed to load: %s'):format(model, tostring(server.model_error)),
      { 'Set settings = { model = ... } in setup{} to a registry name or a .gguf path.' })
  else
    health.info(('model %s: %s'):format(model, tostring(server.model_state)))
  end
  local cache = response.result.cache
  if type(cache) == 'table' and type(cache.reuse_ratio) == 'number' then
    health.info(('cache reuse: %d%% of prompt tokens'):format(math.floor(cache.reuse_ratio * 100 + 0.5)))
  end
end

function M.check()
  local config = require('superpie').info().config
  check_editor()
  check_command(config)
  check_server()
end

return M
