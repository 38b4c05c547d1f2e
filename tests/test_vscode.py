"""The VS Code extension (editor-clients/vscode): its type check, lint and unit tests, and an end-to-end
run of the packaged .vsix in a real VS Code (code-server on loopback, driven in Chromium by
playwright-core) against `superpie serve` with the tiny model: typing shows ghost text, Tab accepts,
and the saved file has the completion.

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
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "editor-clients"
EXTENSION = CLIENTS / "vscode"
E2E = EXTENSION / "e2e"
NODE_BIN = CLIENTS / "toolchain" / "node_modules" / ".bin"
CHROMIUM = os.environ.get("SUPERPIE_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("SUPERPIE_REQUIRE_EDITORS") == "1"
SCREENSHOTS = os.environ.get("SUPERPIE_SCREENSHOTS")  # a folder: keep the e2e screenshot there


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


def test_vsix_installs_and_tab_accepts_the_ghost_text(vsix: Path, tmp_path: Path, tiny_gguf: Path,
                                                       tiny_cache: Path) -> None:
    _skip_or_fail(_missing_e2e())
    screenshot = tmp_path / "vscode-ghost-text.png"
    command = [str(NODE_BIN / "node"), str(E2E / "run.mjs"), "--vsix", str(vsix), "--python", sys.executable,
               "--model", str(tiny_gguf), "--cache", str(tiny_cache), "--work", str(tmp_path / "work"),
               "--screenshot", str(screenshot), "--chromium", CHROMIUM, "--timeout-s", "150"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["ok"], f"{report.get('error')}\nserver log:\n{report.get('serverLog')}\n{result.stderr[-2000:]}"
    typed, ghost, on_disk = report["typed"], report["ghostText"], report["onDisk"]
    assert ghost.strip(), "VS Code showed empty ghost text"
    assert report["ghostLines"] == 0, "scope=single must give a one-line draft"
    # Tab inserted exactly the ghost text after what was typed, and Ctrl+S saved it.
    assert report["afterTab"] == typed + ghost, report
    assert on_disk.rstrip("\n").endswith(typed + ghost), (typed, ghost, on_disk)
    assert "superpie: ready" in (report.get("statusBar") or ""), report.get("statusBar")
    assert screenshot.exists()
    if SCREENSHOTS:
        shutil.copy(screenshot, Path(SCREENSHOTS) / screenshot.name)
