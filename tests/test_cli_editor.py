"""`superpie complete` is the editor's pipeline: at the same cursor it prints the editor's first suggestion."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_server import Doc, answered, start_server, stop_server  # noqa: F401, F811 (answered: a fixture)

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_cli_prints_the_first_suggestion_the_editor_gets_at_the_same_cursor(tiny_gguf, tiny_cache, answered,  # noqa: F811
                                                                                 tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(answered)
    client = await start_server(tiny_gguf, tiny_cache)
    try:
        editor = await Doc(client, path.resolve().as_uri(), answered).inline(invoked=True)
    finally:
        await stop_server(client)
    lines = answered.split("\n")
    location = f"{path}:{len(lines)}:{len(lines[-1]) + 1}"
    command = [sys.executable, "-m", "lsp_server.cli", "--quiet", "--cache-dir", str(tiny_cache), "complete",
               location, "--json", "--model", str(tiny_gguf)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = [draft["text"] for draft in json.loads(run.stdout)["drafts"]]
    assert editor, "the answered prompt got no suggestion from the editor's side"
    assert printed[0] == editor[0]
    plain = subprocess.run(command[:-3] + command[-2:], capture_output=True, text=True, timeout=300)
    assert plain.stdout == editor[0] + "\n"
