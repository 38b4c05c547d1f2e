"""The server under hostile or heavy input: malformed params, impossible ranges, and a burst of edits and
cancelled completions. The bar: JSON-RPC errors, never a crash; no internal error; bounded memory; hover
answered while the model decodes (its latency is reported, not asserted: the machines are shared)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lsprotocol import types
from pygls.exceptions import JsonRpcContentModified, JsonRpcException, JsonRpcRequestCancelled
from test_server import Doc, find_long_prompt, start_server, stats, stop_server, until_decoding

FUNCTION_BODIES = [
    "def average(values):\n    total = sum(values)\n    return ",
    "import os\n\n\ndef walk(root):\n    for name in os.listdir(root):\n        ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        ",
    "# 统计 😀\r\nresult = {}\r\nfor key in data:\r\n    ",
]
ANSWERED = {-32602, -32601, -32801, -32800}  # invalid params, unknown method, content modified, cancelled
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
NUMBERS = st.one_of(st.integers(-5, 50), st.integers(2**31 - 2, 2**31 + 2), st.integers(-2**40, 2**40), JSON)


def _internal_errors(client) -> list[str]:
    return [m.message for m in client.log_messages if "internal error" in m.message]


class ThreadedClient:
    """A pytest-lsp client on an event loop of its own thread, so hypothesis' synchronous tests can drive it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = self.run(start_server(*args, **kwargs))
        self.ids = 0

    def run(self, coro, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, params: Any, timeout: float = 20) -> tuple[Any, int | None]:
        """Send a raw request; (result, None) or (None, error code)."""
        self.ids += 1
        msg_id = f"raw-{self.ids}"
        future: Future = Future()

        async def send() -> None:
            self.client.protocol._request_futures[msg_id] = future
            self.client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})

        self.run(send())
        try:
            return future.result(timeout), None
        except JsonRpcException as err:
            return None, err.code

    def notify(self, method: str, params: Any) -> None:
        async def send() -> None:
            self.client.protocol._send_data({"jsonrpc": "2.0", "method": method, "params": params})
        self.run(send())

    def close(self) -> None:
        self.run(stop_server(self.client))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def threaded(tiny_gguf, tiny_cache):
    server = ThreadedClient(tiny_gguf, tiny_cache, init_options={"maxTokens": 8})
    server.notify("textDocument/didOpen", {"textDocument": {"uri": "file:///h.py", "languageId": "python",
                                                            "version": 1, "text": "x = 1\ny = '😀'\r\nz = 3\n"}})
    yield server
    assert server.client.error is None
    server.close()


def _position(line, character) -> dict:
    return {"line": line, "character": character}


@st.composite
def near_valid_requests(draw) -> tuple[str, Any]:
    """Requests shaped like the real ones with some fields broken or out of range."""
    method = draw(st.sampled_from(["textDocument/inlineCompletion", "textDocument/completion", "textDocument/hover",
                                   "workspace/executeCommand", "textDocument/definition", "superpie/nonsense"]))
    uri = draw(st.sampled_from(["file:///h.py", "file:///nope.py"]) | JSON)
    position = draw(st.builds(_position, NUMBERS, NUMBERS) | JSON)
    params: dict[str, Any] = {"textDocument": {"uri": uri}, "position": position}
    if method == "textDocument/inlineCompletion":
        params["context"] = draw(st.builds(lambda k: {"triggerKind": k}, st.integers(-1, 4) | JSON) | JSON)
        if draw(st.booleans()):
            params["context"] = {"triggerKind": 1, "selectedCompletionInfo": {
                "range": {"start": draw(st.builds(_position, NUMBERS, NUMBERS)),
                          "end": draw(st.builds(_position, NUMBERS, NUMBERS))}, "text": draw(st.text(max_size=5))}}
    if method == "workspace/executeCommand":
        params = {"command": draw(st.sampled_from(["superpie.stats", "superpie.refresh", "x"]) | JSON),
                  "arguments": draw(JSON)}
    if draw(st.booleans()):
        params = draw(JSON)  # or nothing like it at all
    return method, params


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=near_valid_requests())
def test_malformed_requests_get_json_rpc_errors_never_a_crash(threaded, request):
    method, params = request
    result, code = threaded.request(method, params)
    assert code is None or code in ANSWERED, f"{method} {json.dumps(params)[:200]} -> error {code}"
    assert _internal_errors(threaded.client) == []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.builds(lambda a, b, c, d, t: {"range": {"start": _position(a, b), "end": _position(c, d)},
                                                        "text": t},
                                  st.integers(0, 6), st.integers(0, 12) | st.integers(0, 2**31 - 1),
                                  st.integers(0, 6), st.integers(0, 12), st.text(alphabet="a😀\r\n中", max_size=4))
                        | JSON, min_size=1, max_size=4),
       version=st.integers(-3, 10**6) | JSON)
def test_impossible_ranges_and_malformed_changes_never_desync_the_cache(threaded, changes, version):
    threaded.notify("textDocument/didChange", {"textDocument": {"uri": "file:///h.py", "version": version},
                                               "contentChanges": changes})
    doc = threaded.run(stats(threaded.client, "file:///h.py"))["document"]
    assert doc["sha256"] == doc["cache_sha256"], "the server's text and the buffer cache's text diverged"
    assert _internal_errors(threaded.client) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["textDocument/didOpen", "textDocument/didClose", "textDocument/didSave",
                               "workspace/didChangeConfiguration", "$/cancelRequest", "initialized", "x/y"]),
       params=JSON)
def test_malformed_notifications_are_dropped(threaded, method, params):
    threaded.notify(method, params)
    assert threaded.run(stats(threaded.client))["server"]["model_state"] == "ready"
    assert _internal_errors(threaded.client) == []


# -- the burst ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_prompt(tiny_model) -> str:
    return find_long_prompt(tiny_model)


@pytest_asyncio.fixture(loop_scope="function")
async def burst_client(tiny_gguf, tiny_cache):
    """Settings are pushed (no pull support), so the test can switch between long and short decodes."""
    from test_server import capabilities

    client = await start_server(tiny_gguf, tiny_cache, caps=capabilities(configuration=False))
    yield client
    await stop_server(client)


async def _push_settings(client, settings: dict, check) -> None:
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"superpie": settings}))
    for _ in range(500):
        if check((await stats(client))["server"]["settings"]):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("settings not applied")


async def _hovers_while_decoding(long_doc: Doc, others: list[Doc], most: int = 40) -> list[float]:
    """Round-trip times of the hovers, sent one after another, that were answered while `long_doc` decoded a
    long suggestion (from the server's report that it runs until its answer), at most `most`."""
    decoding = asyncio.ensure_future(long_doc.inline())
    await until_decoding(long_doc.client, long_doc.uri, decoding)
    hovers: list[float] = []
    while not decoding.done() and len(hovers) < most:
        target = (others + [long_doc])[len(hovers) % 4]  # nothing shown there / shown on that line
        t0 = time.perf_counter()
        hover = await target.hover(offset=0 if target is not long_doc else 3)
        elapsed = 1000 * (time.perf_counter() - t0)
        if decoding.done():  # the decode ended meanwhile: this hover may have computed drafts itself
            break
        hovers.append(elapsed)
        if target is not long_doc:
            assert hover is None, (len(hovers), hover)  # nothing shown there, the worker busy: no preview, no wait
    await decoding
    return hovers


def _addressable(text: str, offset: int) -> int:
    """An editor's cursor is never between the two characters of a CRLF (LSP cannot even name that spot)."""
    return offset + 1 if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n" else offset


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.mark.asyncio(loop_scope="function")
async def test_burst_of_edits_and_cancelled_completions(burst_client, long_prompt, capsys):
    client, rng = burst_client, random.Random(7)

    # Hover while the model decodes one long suggestion (multi-line, up to 1024 tokens: about a second).
    await _push_settings(client, {"scope": "multi", "maxTokens": 1024}, lambda s: s["maxTokens"] == 1024)
    long_doc = Doc(client, "file:///burst/long.py", long_prompt)
    await long_doc.inline(offset=3)  # warm-up: first decode, caches allocated
    others = [Doc(client, f"file:///burst/hover{i}.py", "x = 1\n") for i in range(3)]
    busy_hovers = await _hovers_while_decoding(long_doc, others)

    # The burst: 1,000 edits over 20 documents, a completion every 10 edits, cancelled by the next edits
    # or by $/cancelRequest, hovers in between.
    await _push_settings(client, {"scope": "auto", "maxTokens": 64}, lambda s: s["maxTokens"] == 64)
    docs = [Doc(client, f"file:///burst/{i}.py", FUNCTION_BODIES[i % len(FUNCTION_BODIES)]) for i in range(20)]
    before_stats = await stats(client)
    before, counters_before = before_stats["server"]["rss_mb"], before_stats["server"]["counters"]
    t_burst = time.perf_counter()
    pending: list[tuple[str, asyncio.Future]] = []
    hover_ms, errors, outcomes = [], [], {"items": 0, "empty": 0, "cancelled": 0, "modified": 0}
    for step in range(1000):
        doc = docs[step % 20]
        at = _addressable(doc.text, rng.randrange(len(doc.text) + 1))
        if rng.random() < 0.25 and len(doc.text) > 10:
            doc.edit(_addressable(doc.text, max(0, at - 3)), at, "")
        else:
            doc.edit(at, at, rng.choice(["x", " ", "\n", "(", "😀", "中", "\r\n", "return "]))
        if step % 10 == 0:
            msg_id = f"burst-{step}"
            pending.append((msg_id, asyncio.ensure_future(client.protocol.send_request_async(
                types.TEXT_DOCUMENT_INLINE_COMPLETION, doc.inline_params(), msg_id=msg_id))))
        if step % 10 == 5 and pending:
            client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=pending[-1][0]))
        if step % 8 == 0:
            t0 = time.perf_counter()
            await doc.hover()
            hover_ms.append(1000 * (time.perf_counter() - t0))
        if step % 25 == 0:
            await asyncio.sleep(0.001)
    for _, future in pending:
        try:
            result = await future
            outcomes["items" if result.items else "empty"] += 1
        except JsonRpcRequestCancelled:
            outcomes["cancelled"] += 1
        except JsonRpcException as err:
            if err.code == JsonRpcContentModified.CODE:
                outcomes["modified"] += 1
            else:
                errors.append(err)
    burst_s = time.perf_counter() - t_burst
    for doc in docs:
        await doc.assert_in_sync()
    after = await stats(client)
    growth = after["server"]["rss_mb"] - before
    report = {"burst_s": round(burst_s, 1), "rss_before_mb": before, "rss_growth_mb": round(growth, 1),
              "hover_p50_ms_while_decoding": round(sorted(busy_hovers)[len(busy_hovers) // 2], 2),
              "hover_p99_ms_while_decoding": round(_p99(busy_hovers), 2), "hovers_while_decoding": len(busy_hovers),
              "hover_p99_ms_in_burst": round(_p99(hover_ms), 2), "hovers_in_burst": len(hover_ms),
              "completions": outcomes, "pending_futures": after["server"]["pending_futures"],
              "counters": after["server"]["counters"]}
    with capsys.disabled():
        print("\nburst:", json.dumps(report))
    assert errors == [] and _internal_errors(client) == [] and client.error is None
    assert growth < 50, report
    assert len(busy_hovers) >= 10, report  # answered while one decode ran: none waited for it
    # The cancellations were exercised, and each stale answer the client saw is one the server counted.
    assert outcomes["cancelled"] + outcomes["modified"] >= 1, report
    dropped = after["server"]["counters"].get("stale_dropped", 0) - counters_before.get("stale_dropped", 0)
    assert dropped == outcomes["modified"], report
    assert after["server"]["pending_futures"] <= 2, report
