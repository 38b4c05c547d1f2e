"""The engine process: a crash or a hang in it costs a restart, never the server, the user's text, or an error
for the request in flight. End to end: a real `superpie serve` over stdio with the tiny model, and a real
signal to the engine's process (SIGKILL for a crash or an out-of-memory kill, SIGSTOP for a hung decode step)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsprotocol import types
from pytest_lsp import LanguageClient

from tests import test_server
from tests.fixtures import process_alive
from tests.test_server import Doc, live_stats, start_server, stats, stop_server, until_decoding

answered = test_server.answered  # fixtures
long_prompt = test_server.long_prompt

pytestmark = pytest.mark.asyncio(loop_scope="module")

HANG_TIMEOUT_S = 2.0  # the server's --engine-timeout here: a stopped engine is declared hung after this


async def until_restarted(client: LanguageClient, restarts: int, timeout: float = 120) -> dict[str, Any]:
    """Until the server reports `restarts` engine restarts and a ready model again (an event from the server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server = (await live_stats(client))["server"]
        if server["engine"]["restarts"] >= restarts and server["model_state"] == "ready":
            return server
        await asyncio.sleep(0.02)
    raise TimeoutError(f"the engine was not restarted {restarts} time(s): {server['engine']}")


def engine_pid(server_stats: dict[str, Any]) -> int:
    pid = server_stats["engine"]["pid"]
    assert isinstance(pid, int) and pid != os.getpid()
    return pid


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fault_client(tiny_gguf, tiny_cache, tmp_path_factory):
    """Long multi-line decodes (so a signal lands mid-decode), no prefetch, a short hang timeout, a log file."""
    log_file = tmp_path_factory.mktemp("engine-log") / "server.log"
    client = await start_server(tiny_gguf, tiny_cache, init_options={"scope": "multi", "maxTokens": 1024,
                                                                     "prefetch": False},
                                args=("--engine-timeout", str(HANG_TIMEOUT_S), "--log-file", str(log_file)))
    client.log_file = log_file  # type: ignore[attr-defined]
    yield client
    await stop_server(client)


async def _fault_mid_decode(client: LanguageClient, long_prompt: str, answered: str, sig: signal.Signals,
                            name: str) -> None:
    """Send `sig` to the engine while it decodes; check what the issue asks of a restart."""
    long_doc = Doc(client, f"file:///{name}-long.py", long_prompt)
    other = Doc(client, f"file:///{name}-other.py", answered)
    other.edit(0, 0, "# edited before the fault\n")
    await other.assert_in_sync()
    before = (await stats(client))["server"]
    pid = engine_pid(before)

    pending = asyncio.ensure_future(client.text_document_inline_completion_async(long_doc.inline_params()))
    await until_decoding(client, long_doc.uri, pending)
    os.kill(pid, sig)
    other.edit(0, 0, "# typed while the engine was down\n")  # the server keeps the text; the new engine gets it

    result = await pending  # no JSON-RPC error: an empty answer
    assert result is not None and len(result.items) == 0
    after = await until_restarted(client, before["engine"]["restarts"] + 1)
    assert engine_pid(after) != pid
    assert not process_alive(pid)
    await long_doc.assert_in_sync()
    await other.assert_in_sync()
    completions = after["counters"].get("completions", 0)
    await other.inline()  # the first request after the restart: answered by the new engine's model
    assert (await stats(client))["server"]["counters"].get("completions", 0) == completions + 1
    assert after["model_error"] is None


async def test_a_killed_engine_is_replaced_and_the_request_in_flight_gets_an_empty_answer(
        fault_client, long_prompt, answered):
    await _fault_mid_decode(fault_client, long_prompt, answered, signal.SIGKILL, "killed")


async def test_a_hung_engine_is_killed_and_replaced(fault_client, long_prompt, answered):
    await _fault_mid_decode(fault_client, long_prompt, answered, signal.SIGSTOP, "hung")


async def test_the_restart_is_shown_as_progress(fault_client):
    begins = [v.title for values in fault_client.progress_reports.values() for v in values
              if isinstance(v, types.WorkDoneProgressBegin)]
    assert "superpie: restarting the engine" in begins


async def test_the_log_says_why_the_engine_was_restarted(fault_client):
    log = Path(fault_client.log_file).read_text()
    assert "killed by signal 9" in log
    assert "showed no progress" in log


async def test_shutdown_stops_the_engine_without_a_traceback(tiny_gguf, tiny_cache, tmp_path):
    log_file = tmp_path / "server.log"
    client = await start_server(tiny_gguf, tiny_cache, args=("--log-file", str(log_file)))
    doc = Doc(client, "file:///shutdown.py", "x = 1\n")
    await doc.assert_in_sync()
    pid = engine_pid((await stats(client))["server"])
    await stop_server(client)
    assert not process_alive(pid), "the engine outlived the server"
    text = log_file.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text
