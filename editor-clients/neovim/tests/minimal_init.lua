-- Neovim init for the end-to-end tests (tests/test_neovim.py): only this plugin, the server command
-- from $SUPERPIE_TEST_CMD (a JSON list), no debounce, so a keystroke is answered as soon as it can be.
local plugin = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h')
vim.opt.runtimepath:prepend(plugin)
vim.opt.swapfile = false
vim.opt.shadafile = 'NONE'
require('superpie').setup({
  cmd = vim.json.decode((assert(os.getenv('SUPERPIE_TEST_CMD'), 'set SUPERPIE_TEST_CMD'))),
  debounce_ms = 0,
  debounce_text_changes = 0,
  native = os.getenv('SUPERPIE_TEST_NATIVE') == '1',
  settings = vim.json.decode(os.getenv('SUPERPIE_TEST_SETTINGS') or '{}'),
})
