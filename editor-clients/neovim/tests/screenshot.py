"""Screenshot of the Neovim plugin at work: the real Neovim TUI in tmux, with the plugin and
`superpie serve` (tiny model), typed into until the ghost text shows; the pane is captured with its
colours, turned into HTML and photographed by headless Chromium.

    .venv/bin/python editor-clients/neovim/tests/screenshot.py OUT.png [--model tiny.gguf] [--keys 'Goreturn res']

Used for editor-clients/screenshots/; needs tmux and chromium (apt) and nvim (install-test-tools.sh).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[1]
SAMPLE = "def add(a, b):\n    return a + b\n\n\ndef scale(values, factor):\n    result = []\n"
BASIC = ["#1e1e1e", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
         "#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff"]
FG, BG = "#d4d4d4", "#1e1e1e"
SGR = re.compile(r"\x1b\[([0-9;:]*)m")


def xterm_256(n: int) -> str:
    if n < 16:
        return BASIC[n]
    if n < 232:
        n -= 16
        levels = [0, 95, 135, 175, 215, 255]
        return "#{:02x}{:02x}{:02x}".format(levels[n // 36], levels[(n // 6) % 6], levels[n % 6])
    grey = 8 + 10 * (n - 232)
    return f"#{grey:02x}{grey:02x}{grey:02x}"


def _colour(codes: list[int], i: int) -> tuple[str | None, int]:
    """Reads `38;5;N` or `38;2;R;G;B` starting at codes[i] (the 5 or 2); returns colour and next index."""
    if codes[i] == 5 and i + 1 < len(codes):
        return xterm_256(codes[i + 1]), i + 2
    if codes[i] == 2 and i + 3 < len(codes):
        return "#{:02x}{:02x}{:02x}".format(*codes[i + 1:i + 4]), i + 4
    return None, i + 1


def ansi_to_html(text: str) -> str:
    """The SGR subset tmux's capture-pane -e emits: colours (16, 256, RGB), bold, italic, reverse."""
    state = {"fg": None, "bg": None, "bold": False, "italic": False, "reverse": False, "underline": False}
    out: list[str] = []
    pos = 0
    for match in list(SGR.finditer(text)) + [None]:
        chunk = text[pos:match.start() if match else len(text)]
        if chunk:
            fg, bg = state["fg"] or FG, state["bg"] or BG
            if state["reverse"]:
                fg, bg = bg, fg
            style = f"color:{fg};background:{bg}"
            style += ";font-weight:bold" if state["bold"] else ""
            style += ";font-style:italic" if state["italic"] else ""
            style += ";text-decoration:underline" if state["underline"] else ""
            out.append(f'<span style="{style}">{html.escape(chunk)}</span>')
        if match is None:
            break
        pos = match.end()
        codes = [int(c) if c else 0 for c in re.split("[;:]", match.group(1))] or [0]
        i = 0
        while i < len(codes):
            code = codes[i]
            if code == 0:
                state.update(fg=None, bg=None, bold=False, italic=False, reverse=False, underline=False)
            elif code == 1:
                state["bold"] = True
            elif code == 3:
                state["italic"] = True
            elif code == 4:
                state["underline"] = True
            elif code == 7:
                state["reverse"] = True
            elif code in (22, 23, 24, 27):
                state[{22: "bold", 23: "italic", 24: "underline", 27: "reverse"}[code]] = False
            elif 30 <= code <= 37 or 90 <= code <= 97:
                state["fg"] = BASIC[code - 30 if code < 90 else code - 82]
            elif 40 <= code <= 47 or 100 <= code <= 107:
                state["bg"] = BASIC[code - 40 if code < 100 else code - 92]
            elif code in (38, 48) and i + 1 < len(codes):
                colour, i = _colour(codes, i + 1)
                state["fg" if code == 38 else "bg"] = colour
                continue
            elif code == 39:
                state["fg"] = None
            elif code == 49:
                state["bg"] = None
            i += 1
    return "".join(out)


def tmux(*args: str, check: bool = True) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check).stdout


def wait_for_screen(session: str, ready, what: str, timeout: float = 60.0) -> None:
    """Polls the pane until `ready(text)`; Neovim's TUI can take seconds to draw on a busy machine."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(tmux("capture-pane", "-t", session, "-p")):
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}:\n{tmux('capture-pane', '-t', session, '-p')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="a .gguf (default: a fresh tiny model)")
    parser.add_argument("--keys", default="Goreturn res", help="keys typed before the capture (tmux send-keys -l)")
    parser.add_argument("--after", default="", help="tmux key names sent after the ghost text shows, e.g. M-]")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="superpie-nvim-shot-"))
    model = args.model
    if model is None:
        sys.path.insert(0, str(PLUGIN.parents[1]))
        from inference.synthetic import write_tiny_gguf
        from tests.fixtures import vocab_texts

        model = write_tiny_gguf(work / "tiny.gguf", vocab_texts())
    source = work / "sample.py"
    source.write_text(SAMPLE)
    nvim = Path(sys.executable).parent / "nvim"
    env = {
        "SUPERPIE_TEST_CMD": json.dumps([sys.executable, "-m", "lsp_server.cli", "--cache-dir", str(work / "cache"),
                                         "serve", "--model", str(model), "--no-persist"]),
        "SUPERPIE_TEST_SETTINGS": json.dumps({"maxTokens": 12, "scope": "single"}),
        "XDG_STATE_HOME": str(work / "state"), "XDG_CONFIG_HOME": str(work / "config"),
        "XDG_DATA_HOME": str(work / "data"), "XDG_CACHE_HOME": str(work / "xdg-cache"),
    }
    exports = " ".join(f"{key}={json.dumps(value)}" for key, value in env.items())
    session = f"superpie-shot-{os.getpid()}"
    command = (f"env {exports} {nvim} --clean -n -i NONE -u {PLUGIN / 'tests' / 'minimal_init.lua'} "
               "-c 'set termguicolors' "
               f"{source.name}")
    tmux("new-session", "-d", "-s", session, "-x", "72", "-y", "12", "-c", str(work), command)
    try:
        wait_for_screen(session, lambda screen: "def add" in screen, "Neovim to draw the file")
        time.sleep(3)  # the model loads
        tmux("send-keys", "-t", session, "-l", args.keys)
        typed_line = args.keys.split("o", 1)[-1]
        wait_for_screen(session, lambda screen: any(typed_line in line and len(line.rstrip()) > len(typed_line) + 4
                                                    for line in screen.splitlines()), "ghost text")
        if args.after:
            tmux("send-keys", "-t", session, args.after)
            time.sleep(2)
        screen = tmux("capture-pane", "-t", session, "-e", "-p")
    finally:
        tmux("kill-session", "-t", session, check=False)
    page = work / "screen.html"
    page.write_text(
        "<html><body style='margin:0;background:%s'><pre style='margin:0;padding:8px;font:15px/1.25 "
        "\"DejaVu Sans Mono\",monospace;color:%s'>%s</pre></body></html>" % (BG, FG, ansi_to_html(screen)))
    subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={args.out.resolve()}", "--window-size=700,260", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    shutil.rmtree(work, ignore_errors=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
