--- superpie for Neovim: `require('superpie').setup{}` starts `superpie serve` through vim.lsp for every
--- normal file buffer and shows its drafts as ghost text: Neovim's own inline completion on 0.12+,
--- the plugin's extmark renderer (superpie.ghost) on 0.10/0.11. Hover (K) shows the drafts with their
--- scores; `:Superpie` has the rest; `:checkhealth superpie` says what is wrong.
local config_mod = require('superpie.config')
local lsp = require('superpie.lsp')
local text = require('superpie.text')

local M = {}

local state = {
  config = config_mod.values,
  problems = {}, ---@type string[]
  enabled = true,
  native = false,
  progress = {}, ---@type table<string|integer, string>
  setup_done = false,
}

---@return boolean
function M.enabled()
  return state.enabled
end

--- For :checkhealth and tests.
function M.info()
  return { config = state.config, problems = state.problems, native = state.native, enabled = state.enabled }
end

local function ghost_for(bufnr)
  return require('superpie.ghost').active[bufnr or vim.api.nvim_get_current_buf()]
end

--- The statusline text: progress while the model loads, else nothing.
---@return string
function M.statusline()
  for _, message in pairs(state.progress) do
    return 'superpie: ' .. message
  end
  return ''
end

-- Actions, usable from mappings: each returns whether it did something.

function M.accept()
  if state.native then
    return require('superpie.native').accept()
  end
  local ghost = ghost_for()
  return ghost ~= nil and ghost:accept()
end

function M.accept_word()
  if state.native then
    return require('superpie.native').accept_part(text.next_word)
  end
  local ghost = ghost_for()
  return ghost ~= nil and ghost:accept_part(text.next_word)
end

function M.accept_line()
  if state.native then
    return require('superpie.native').accept_part(text.next_line)
  end
  local ghost = ghost_for()
  return ghost ~= nil and ghost:accept_part(text.next_line)
end

function M.next()
  if state.native then
    require('superpie.native').cycle(1)
  elseif ghost_for() then
    ghost_for():cycle(1)
  end
  return true
end

function M.prev()
  if state.native then
    require('superpie.native').cycle(-1)
  elseif ghost_for() then
    ghost_for():cycle(-1)
  end
  return true
end

function M.dismiss()
  if state.native then
    require('superpie.native').dismiss(vim.api.nvim_get_current_buf())
    return true
  end
  local ghost = ghost_for()
  local shown = ghost ~= nil and ghost:visible()
  if ghost then
    ghost:dismiss()
  end
  return shown
end

function M.trigger()
  if not state.native and ghost_for() then
    ghost_for():trigger()
  end
  return true
end

--- Maps `lhs` in insert mode to `action`; when the action does nothing the key keeps its usual meaning
--- (Tab still indents when no suggestion is shown).
local function map(bufnr, lhs, action, desc)
  if not lhs then
    return
  end
  vim.keymap.set('i', lhs, function()
    if not action() then
      vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes(lhs, true, false, true), 'n', false)
    end
  end, { buffer = bufnr, desc = 'superpie: ' .. desc, silent = true })
end

local function set_keymaps(bufnr)
  local keys = state.config.keymaps
  map(bufnr, keys.accept, M.accept, 'accept the suggestion')
  map(bufnr, keys.accept_word, M.accept_word, 'accept the next word')
  map(bufnr, keys.accept_line, M.accept_line, 'accept the next line')
  map(bufnr, keys.next, M.next, 'next draft')
  map(bufnr, keys.prev, M.prev, 'previous draft')
  map(bufnr, keys.dismiss, M.dismiss, 'dismiss the suggestion')
  map(bufnr, keys.trigger, M.trigger, 'suggest now (all drafts)')
end

local function on_attach(client, bufnr)
  set_keymaps(bufnr)
  if state.native then
    require('superpie.native').attach(bufnr, client.id)
  else
    require('superpie.ghost').attach(bufnr, state.config)
  end
end

local function wanted(bufnr)
  if vim.bo[bufnr].buftype ~= '' or vim.api.nvim_buf_get_name(bufnr) == '' then
    return false
  end
  local filetypes = state.config.filetypes
  return filetypes == nil or vim.tbl_contains(filetypes, vim.bo[bufnr].filetype)
end

--- The client capabilities: Neovim's, plus `textDocument.inlineCompletion` when the plugin draws the
--- ghost text itself, so the server knows not to duplicate the drafts as completion items.
local function capabilities()
  local caps = vim.lsp.protocol.make_client_capabilities()
  caps.textDocument.inlineCompletion = caps.textDocument.inlineCompletion or { dynamicRegistration = false }
  return caps
end

---@param bufnr integer
function M.attach(bufnr)
  if not wanted(bufnr) then
    return
  end
  local config = state.config
  local name = vim.api.nvim_buf_get_name(bufnr)
  local root = vim.fs.root(bufnr, { '.git', 'pyproject.toml', 'package.json' }) or vim.fs.dirname(name)
  -- An empty Lua table would go out as a JSON array; the server wants an object.
  local settings = next(config.settings) == nil and vim.empty_dict() or config.settings
  vim.lsp.start({
    name = lsp.name,
    cmd = config_mod.command_line(config),
    cmd_env = config.cmd_env,
    root_dir = root,
    init_options = settings,
    settings = { superpie = settings },
    capabilities = capabilities(),
    flags = { debounce_text_changes = config.debounce_text_changes },
    on_attach = on_attach,
  }, {
    bufnr = bufnr,
    -- One server for the whole editor: it keeps one cache per file, whatever the project.
    reuse_client = function(client, conf)
      return client.name == conf.name
    end,
  })
end

--- Runs `superpie.stats` and shows the answer.
function M.stats()
  local client = lsp.client_for()
  if not client then
    vim.notify('superpie: no server is running for this buffer', vim.log.levels.WARN)
    return nil
  end
  local response = lsp.request_sync(client, 'workspace/executeCommand', { command = 'superpie.stats', arguments = {} }, 5000)
  if not response or response.err then
    vim.notify('superpie.stats failed: ' .. vim.inspect(response and response.err), vim.log.levels.ERROR)
    return nil
  end
  vim.notify(vim.inspect(response.result), vim.log.levels.INFO)
  return response.result
end

--- Lists the drafts at the cursor (an Invoked request) and inserts the one picked.
function M.pick_draft()
  local client = lsp.client_for()
  if not client then
    return
  end
  local bufnr, win = vim.api.nvim_get_current_buf(), vim.api.nvim_get_current_win()
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = 1 }
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  lsp.request(client, 'textDocument/inlineCompletion', params, function(err, result)
    if err or not result then
      return
    end
    local drafts = {}
    for _, item in ipairs(result.items or result) do
      table.insert(drafts, type(item.insertText) == 'string' and item.insertText or item.insertText.value)
    end
    vim.ui.select(drafts, {
      prompt = 'superpie drafts',
      format_item = function(draft)
        return (draft:gsub('\n', ' ⏎ '))
      end,
    }, function(choice)
      if not choice or vim.api.nvim_buf_get_changedtick(bufnr) ~= tick then
        return
      end
      local row, col = unpack(vim.api.nvim_win_get_cursor(win))
      vim.api.nvim_buf_set_text(bufnr, row - 1, col, row - 1, col, text.lines(choice))
    end)
  end, bufnr)
end

function M.toggle()
  state.enabled = not state.enabled
  for bufnr, ghost in pairs(require('superpie.ghost').active) do
    ghost:dismiss()
    if state.native then
      require('superpie.native').set_enabled(bufnr, state.enabled)
    end
  end
  if state.native then
    for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
      if lsp.client_for(bufnr) then
        require('superpie.native').set_enabled(bufnr, state.enabled)
      end
    end
  end
  vim.notify('superpie: inline completions ' .. (state.enabled and 'on' or 'off'))
end

function M.restart()
  for bufnr, ghost in pairs(require('superpie.ghost').active) do
    ghost:dismiss()
    require('superpie.ghost').active[bufnr] = nil
  end
  for _, client in ipairs(lsp.clients()) do
    lsp.stop(client, true)
  end
  vim.defer_fn(function()
    for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
      if vim.api.nvim_buf_is_loaded(bufnr) then
        M.attach(bufnr)
      end
    end
  end, 500)
end

local subcommands = {
  toggle = M.toggle,
  restart = M.restart,
  stats = M.stats,
  drafts = M.pick_draft,
  hover = function()
    vim.lsp.buf.hover()
  end,
  refresh = function()
    local client = lsp.client_for()
    if client then
      lsp.request(client, 'workspace/executeCommand', { command = 'superpie.refresh', arguments = {} },
        function(err, result)
          vim.notify('superpie.refresh: ' .. vim.inspect(err or result))
        end)
    end
  end,
}

local function track_progress()
  vim.api.nvim_create_autocmd('LspProgress', {
    group = vim.api.nvim_create_augroup('superpie.progress', { clear = true }),
    callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if not client or client.name ~= lsp.name then
        return
      end
      local token, value = ev.data.params.token, ev.data.params.value
      if value.kind == 'end' then
        state.progress[token] = nil
      else
        local title = value.title or state.progress[token] or ''
        local pct = value.percentage and (' %d%%'):format(value.percentage) or ''
        state.progress[token] = title .. pct .. (value.message and (' ' .. value.message) or '')
      end
      vim.cmd.redrawstatus()
    end,
  })
end

---@param opts superpie.Config?
function M.setup(opts)
  local config, problems = config_mod.resolve(opts)
  state.config, state.problems = config, problems
  config_mod.values = config
  if config.native == nil then
    state.native = require('superpie.native').available()
  else
    state.native = config.native and require('superpie.native').available()
  end
  if #problems > 0 then
    vim.notify('superpie: ' .. table.concat(problems, '; '), vim.log.levels.WARN)
  end
  vim.api.nvim_set_hl(0, 'SuperpieGhostText', { link = 'Comment', default = true })

  local group = vim.api.nvim_create_augroup('superpie', { clear = true })
  vim.api.nvim_create_autocmd({ 'BufReadPost', 'BufNewFile', 'FileType' }, {
    group = group,
    callback = function(ev)
      M.attach(ev.buf)
    end,
  })
  track_progress()
  vim.api.nvim_create_user_command('Superpie', function(cmd)
    local action = subcommands[cmd.args]
    if not action then
      vim.notify('superpie: unknown subcommand ' .. cmd.args, vim.log.levels.ERROR)
      return
    end
    action()
  end, {
    nargs = 1,
    complete = function()
      return vim.tbl_keys(subcommands)
    end,
    desc = 'superpie: toggle, restart, stats, drafts, hover, refresh',
  })
  state.setup_done = true
  for _, bufnr in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(bufnr) then
      M.attach(bufnr)
    end
  end
end

return M
