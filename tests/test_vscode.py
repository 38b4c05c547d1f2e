"""The VS Code extension (editor-clients/vscode): its type check, lint and unit tests, and an end-to-end
run of the packaged .vsix in a real VS Code (code-server on loopback, driven in Chromium by
playwright-core) against `superpie serve` with the tiny model: typing shows ghost text, Tab accepts,
and the saved file has the completion.

What the random-weight tiny model says at a given prompt depends on the CPU's float rounding (AVX2 and
AVX-512 differ), so what the end-to-end test types is not fixed: the `to_type` fixture picks it in-process,
on this machine, by running the server's own Completer on the texts the server will see as the keys go in,
with the options it will use, and tells the driver the ghost text to wait for.

Needs what editor-clients/install-test-tools.sh installs (Node 24, the extension's npm packages,
code-server, playwright-core, Chromium). Without them the tests are skipped, unless
SUPERPIE_REQUIRE_EDITORS=1 (set by CI), which turns a skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lsp_server.completion import CompletionOptions
from tests.typing_probe import first_suitable, near_tie, request_options, runs_through, suggestion_texts, typed

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "editor-clients"
EXTENSION = CLIENTS / "vscode"
E2E = EXTENSION / "e2e"
NODE_BIN = CLIENTS / "toolchain" / "node_modules" / ".bin"
CHROMIUM = os.environ.get("SUPERPIE_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("SUPERPIE_REQUIRE_EDITORS") == "1"
SCREENSHOTS = os.environ.get("SUPERPIE_SCREENSHOTS")  # a folder: keep the e2e screenshot there
# The superpie.* settings the driver gives VS Code. One line (scope single): the ghost text is then one
# inline decoration whose text the driver can read.
SETTINGS = {"maxTokens": 12, "scope": "single"}


@dataclass(frozen=True)
class Sample:
    """A file to open, and what to type on its last (empty) line, tried in order. Brackets and quotes are fine
    (the driver turns auto-closing off); tabs are not (VS Code would indent instead)."""

    file: str
    language: str  # the LSP languageId VS Code gives the file
    text: str
    candidates: tuple[str, ...]


SAMPLES = {
    "python": Sample("sample.py", "python", "def add(a, b):\n    return a + b\n\n\ndef scale(values, factor):\n"
                     "    result = []\n", tuple("    " + statement for statement in (
                         "return res", "return result", "return values", "result", "values", "factor", "x = ",
                         "for value in values", "result.append(", "print(", "scale(", "add(", "if", "while", "del",
                         "y = a", "assert", "import", "factor = 2"))),
    # A second language: VS Code sends its own languageId, and the server reads the file with that language's rules.
    "typescript": Sample("sample.ts", "typescript", "export function add(a: number, b: number): number {\n"
                         "    return a + b;\n}\n\nexport function scale(values: number[], factor: number): number[] {\n"
                         "    const result: number[] = [];\n", tuple("    " + statement for statement in (
                             "return res", "return result", "return values", "result", "values", "factor",
                             "const x = ", "for (const v of values", "result.push(", "console.log(", "scale(", "add(",
                             "if", "while", "let y = a", "throw"))),
}


def _missing() -> str | None:
    if not (NODE_BIN / "node").exists():
        return "Node 24 not installed under editor-clients/toolchain"
    if not (EXTENSION / "node_modules" / ".bin" / "tsc").exists():
        return "the extension's npm packages are not installed"
    return None


def _missing_e2e() -> str | None:
    if not (E2E / "node_modules" / "code-server").exists():
        return "code-server / playwright-core not installed under editor-clients/vscode/e2e"
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    return None


def _skip_or_fail(reason: str | None) -> None:
    if reason is None:
        return
    if REQUIRED:
        pytest.fail(f"SUPERPIE_REQUIRE_EDITORS=1 but {reason}; run editor-clients/install-test-tools.sh")
    pytest.skip(f"{reason} (run editor-clients/install-test-tools.sh)")


def _npm(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """npm with Node 24 first on PATH, as the extension's scripts expect."""
    env = {**os.environ, "PATH": f"{NODE_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["npm", *args], cwd=EXTENSION, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def vsix() -> Path:
    _skip_or_fail(_missing())
    result = _npm("run", "package", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = EXTENSION / "superpie.vsix"
    assert path.exists()
    return path


def test_typecheck_lint_and_unit_tests_pass() -> None:
    _skip_or_fail(_missing())
    result = _npm("run", "check", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "ℹ fail 0" in output, output[-2000:]


def test_the_vsix_holds_only_the_bundle_and_its_manifest(vsix: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(vsix).namelist())
    assert "extension/dist/extension.js" in names
    assert "extension/package.json" in names
    assert not any("node_modules" in name or name.startswith("extension/src/") for name in names), sorted(names)


@dataclass(frozen=True)
class Typing:
    """What to type on the sample's last line, and the server's as-you-type draft once it is typed (in-process)."""

    sample: Sample
    typed: str
    draft: str


def _shortcoming(model: Any, sample: Sample, keys: str, options: CompletionOptions) -> tuple[str | None, Typing]:
    """Why typing `keys` at the end of the sample does not suit the test (None: it does), and the best draft there."""
    completer, before = typed(model, sample.text, len(sample.text), keys, options, language=sample.language)
    text = sample.text + keys
    assert completer.text("probe") == text
    drafts = suggestion_texts(completer, len(text), options)
    found = Typing(sample, keys, drafts[0] if drafts else "")
    if near_tie(model, text, len(text), [(options, drafts)], language=sample.language):
        return "its drafts change with how they are computed (a near-tie)", found
    if (reason := runs_through(keys, before)) is not None:
        return reason, found
    if not drafts or not drafts[0].strip():
        return f"the drafts {drafts!r} have no non-blank best one", found
    if not all(c.isprintable() for c in drafts[0]):
        return f"the draft {drafts[0]!r} has characters VS Code draws otherwise (control characters, tabs)", found
    return None, found


@pytest.fixture(scope="module", params=list(SAMPLES))
def to_type(request: pytest.FixtureRequest, tiny_model: Any) -> Typing:
    """The first of the sample's candidates on which, on this machine, the server's best draft is non-blank and
    printable, and no draft from before the last keystroke already starts with the rest of what is typed."""
    sample = SAMPLES[request.param]
    options = request_options(SETTINGS, invoked=False)  # VS Code asks as you type
    return first_suitable(sample.candidates, lambda keys: _shortcoming(tiny_model, sample, keys, options),
                          f"the VS Code test ({sample.language})")


def test_vsix_installs_and_tab_accepts_the_ghost_text(vsix: Path, tmp_path: Path, tiny_gguf: Path,
                                                       tiny_cache: Path, to_type: Typing) -> None:
    _skip_or_fail(_missing_e2e())
    suffix = "" if to_type.sample.language == "python" else f"-{to_type.sample.language}"
    screenshot = tmp_path / f"vscode-ghost-text{suffix}.png"  # editor-clients/README.md shows the Python one
    command = [str(NODE_BIN / "node"), str(E2E / "run.mjs"), "--vsix", str(vsix), "--python", sys.executable,
               "--model", str(tiny_gguf), "--cache", str(tiny_cache), "--work", str(tmp_path / "work"),
               "--file", to_type.sample.file, "--sample", to_type.sample.text, "--typed", to_type.typed, "--settings", json.dumps(SETTINGS),
               "--expect", to_type.draft,
               "--screenshot", str(screenshot), "--chromium", CHROMIUM, "--timeout-s", "150"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["ok"], f"{report.get('error')}\nserver log:\n{report.get('serverLog')}\n{result.stderr[-2000:]}"
    typed, ghost, on_disk = report["typed"], report["ghostText"], report["onDisk"]
    assert typed == to_type.typed
    assert ghost == to_type.draft, "VS Code's ghost text is not the server's draft for the text as typed"
    assert report["ghostLines"] == 0, "scope=single must give a one-line draft"
    # Tab inserted exactly the ghost text after what was typed, and Ctrl+S saved it.
    assert report["afterTab"] == typed + ghost, report
    assert on_disk == to_type.sample.text + typed + ghost, (typed, ghost, on_disk)
    rules = [line for line in report["syntaxRules"] if line.split(": ")[0].endswith("/" + to_type.sample.file)]
    assert rules and all(line.endswith(f": syntax rules {to_type.sample.language} (tree-sitter)") for line in rules), (
        report["syntaxRules"])
    assert "superpie: ready" in (report.get("statusBar") or ""), report.get("statusBar")
    assert screenshot.exists()
    if SCREENSHOTS:
        shutil.copy(screenshot, Path(SCREENSHOTS) / screenshot.name)
