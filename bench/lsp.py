"""LSP latency benchmark: from a keystroke to the first inline suggestion, through `superpie serve` over stdio.

A keystroke is a `didChange` and a `textDocument/inlineCompletion` (Automatic trigger, one draft, scope
"single") written to the server's stdin together; its latency runs until the response is read. The client
is a small JSON-RPC client in this file, so what is measured is the server plus the pipe, nothing mocked.

Files are Python stdlib sources of 350-800 lines (more than the 2,048 tokens a document keeps whole, so
the cache works on a window around the cursor). Each file is opened with some target lines cut in half
(the user is typing them) and warmed: one request at a cursor in the middle of the targets, then idle
encoding runs until the worker is quiet. Then it takes `repeats` keystrokes per case, each on its own line,
so the typed-through cache never answers and every sample runs the model. All cursors of a file lie within
REGION_CHARS of each other, about two thirds of the way down, so the rows' window never moves: the buffer
stays warm (a cursor that jumps further makes the next request encode the newly covered tokens first).

- `line_end`: the next character of a half-typed line, then the request at the new end of that line;
- `new_line`: "\\n" plus the indentation an editor would insert, at the end of a complete line;
- `far_edit`: one character appended to a line FAR_CHARS characters or more above the cursor (inside the
  cursor's 1,536-token window, so the edit moves cached rows), then the request at the end of a half-typed
  line.

Keystrokes within a case come GAP_S after the previous answer, as a typist would: with refresh "idle" the
server spends those gaps re-encoding stale rows, and a keystroke may wait for the chunk in progress. The
refresh policy is an option. Between cases the server is left to go quiet.

`cacheMode` pie and full run in the same process tree: one server per mode, both given the same keystrokes
on the same text, file by file. The server reports each completion's timings (`superpie.stats`), which
split the latency into applying the edit, building the context, prefill and decode; `other` is the rest
(waiting for an idle step in progress, JSON-RPC, the event loop).

    python -m bench.lsp [--model M] [--cache DIR] [--json OUT] [--files N] [--repeats N] [--refresh P]
                        [--modes pie,full] [--gap-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import re
import statistics
import sys
import tempfile
import time
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.engine import machine_info, save_results
from inference.registry import DEFAULT_MODEL
from kv_cache.choices import SPLICE_MODES
from lsp_server.worker import IDLE_DELAY_S

STDLIB = Path(os.__file__).parent
STDLIB_FILES = ("textwrap.py", "shlex.py", "heapq.py", "contextlib.py", "json/encoder.py")
CASES = ("line_end", "new_line", "far_edit")
MODES = ("pie", "full")
REFRESH_POLICIES = ("off", "idle", "threshold")
QUIET_POLL_S = 2.5 * IDLE_DELAY_S
DEFAULT_JSON = Path(__file__).parent / "results" / "lsp.json"
GAP_S = 0.150  # between an answer and the next keystroke
FAR_CHARS = 4000  # how far above the cursor the far edit is (about 1,000 tokens of Python)
REGION_CHARS = 700  # a file's cursors stay this close (~170 tokens): the rows' window does not move
GOAL_P50_MS = 200.0
FAR_CHARACTER = "x"
INVOKED, AUTOMATIC = 1, 2  # InlineCompletionTriggerKind
REQUEST_TIMEOUT_S = 600.0


# -- the keystrokes ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Keystroke:
    """One edit and the request after it; offsets are code points in the text before (edit) and after (cursor)."""

    case: str
    line: int  # the cursor's line in the original file (0-based), to name the sample
    start: int
    end: int
    new_text: str
    cursor: int


@dataclass
class FilePlan:
    name: str
    original: str
    opened: str  # the original with the half-typed target lines cut
    warm_cursor: int  # in `opened`
    keystrokes: list[Keystroke]


def split_lines(text: str) -> list[str]:
    """Lines with their "\n" (the only line end in these files; str.splitlines also splits at form feeds)."""
    return re.findall(r"[^\n]*\n|[^\n]+", text)


def multiline_string_lines(text: str) -> set[int]:
    """0-based lines inside multi-line strings (docstrings): prose, not code to complete."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            inside.update(range(tok.start[0] - 1, tok.end[0]))
    return inside


def code_lines(lines: list[str], skip: set[int]) -> list[int]:
    """Lines of real code with something to complete: at least 12 characters after the indentation."""
    return [i for i, line in enumerate(lines)
            if i not in skip and len(line.strip()) >= 12 and not line.lstrip().startswith(("#", "@"))]


def new_line_indent(line: str) -> str:
    """What an editor inserts after Enter at the end of `line`."""
    indent = line[:len(line) - len(line.lstrip())]
    return indent + "    " if line.rstrip().endswith(":") else indent


class _Lines:
    """The text being planned, as lines that remember which original line they were."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = list(lines)
        self.origin: list[int | None] = list(range(len(lines)))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def index(self, original: int) -> int:
        return self.origin.index(original)

    def end_of(self, original: int) -> int:
        """The offset of the end of a line's content (before its newline)."""
        i = self.index(original)
        return sum(len(line) for line in self.lines[:i]) + len(self.lines[i].rstrip("\n"))

    def insert(self, original: int, text: str) -> None:
        """Insert `text` at the end of a line's content; a "\\n" in it starts new lines."""
        i = self.index(original)
        content = self.lines[i].rstrip("\n")
        pieces = split_lines(content + text + self.lines[i][len(content):])
        self.lines[i:i + 1] = pieces
        self.origin[i:i + 1] = [original] + [None] * (len(pieces) - 1)


def choose_region(starts: list[int], code: list[int], needed: int) -> list[int]:
    """`needed` code lines within REGION_CHARS of each other, at least FAR_CHARS into the file, as near two thirds
    of the way down as possible (deterministic): the cursor stays where the rows are, as when typing in one place."""
    eligible = [i for i in code if starts[i] >= FAR_CHARS + 200]
    regions = [[j for j in eligible[k:] if starts[j] - starts[i] <= REGION_CHARS] for k, i in enumerate(eligible)]
    regions = [r for r in regions if len(r) >= needed]
    if not regions:
        raise ValueError(f"no {needed} code lines within {REGION_CHARS} characters")
    middle = 2 * len(starts) // 3
    region = min(regions, key=lambda r: abs(r[0] - middle))
    step = (len(region) - 1) / (needed - 1) if needed > 1 else 0
    return [region[round(k * step)] for k in range(needed)]


def plan_file(name: str, text: str, repeats: int) -> FilePlan:
    """The opened text and the keystrokes of one file, `repeats` per case, each on its own line."""
    lines = split_lines(text)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    code = code_lines(lines, multiline_string_lines(text))
    chosen = choose_region(starts, code, 3 * repeats + 1)
    warm_line = chosen.pop(len(chosen) // 2)  # warmed at a line no keystroke types on: no typed-through answer
    targets = {case: chosen[c::3] for c, case in enumerate(CASES)}
    far_lines = [i for i in code if i not in chosen and i != warm_line]

    # Half-typed lines: cut after the indentation plus half the content; the cut rest is what the user types.
    cut_rest: dict[int, str] = {}
    for i in targets["line_end"] + targets["far_edit"]:
        content = lines[i].rstrip("\n")
        indent = len(content) - len(content.lstrip())
        cut = indent + (len(content) - indent) // 2
        cut_rest[i] = content[cut:]
        lines[i] = content[:cut] + "\n"
    doc = _Lines(lines)
    opened = doc.text
    warm_cursor = doc.end_of(warm_line)

    keystrokes = []
    for i in targets["line_end"]:
        at = doc.end_of(i)
        doc.insert(i, cut_rest[i][0])
        keystrokes.append(Keystroke("line_end", i, at, at, cut_rest[i][0], at + 1))
    for i in targets["new_line"]:
        at = doc.end_of(i)
        typed = "\n" + new_line_indent(doc.lines[doc.index(i)])
        doc.insert(i, typed)
        keystrokes.append(Keystroke("new_line", i, at, at, typed, at + len(typed)))
    for i in targets["far_edit"]:
        cursor = doc.end_of(i)
        far = max((f for f in far_lines if doc.end_of(f) <= cursor - FAR_CHARS), default=far_lines[0])
        at = doc.end_of(far)
        doc.insert(far, FAR_CHARACTER)
        keystrokes.append(Keystroke("far_edit", i, at, at, FAR_CHARACTER, doc.end_of(i)))
    return FilePlan(name, text, opened, warm_cursor, keystrokes)


def stdlib_files(count: int) -> list[tuple[str, str]]:
    if not 1 <= count <= len(STDLIB_FILES):
        raise ValueError(f"--files must be from 1 to {len(STDLIB_FILES)}")
    return [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in STDLIB_FILES[:count]]


# -- positions ------------------------------------------------------------------------------------------------------

def lsp_position(text: str, offset: int) -> dict[str, int]:
    """UTF-16 line and character of a code-point offset (the files use "\\n" line ends)."""
    line_start = text.rfind("\n", 0, offset) + 1
    column = text[line_start:offset]
    return {"line": text.count("\n", 0, offset), "character": len(column.encode("utf-16-le")) // 2}


# -- a minimal JSON-RPC client over stdio ---------------------------------------------------------------------------

class LspError(RuntimeError):
    """A JSON-RPC error response (with its `code`), or the server going away (code None)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class JsonRpcClient:
    """Content-Length framed JSON-RPC with a subprocess. Responses carry the time they were read, so the event
    loop's scheduling of the awaiting coroutine does not count as server latency."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self.messages: list[dict[str, Any]] = []  # window/showMessage from the server
        self._reader = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def start(cls, command: list[str], stderr: Any) -> JsonRpcClient:
        process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE,
                                                       stdout=asyncio.subprocess.PIPE, stderr=stderr)
        return cls(process)

    @staticmethod
    def frame(message: dict[str, Any]) -> bytes:
        body = json.dumps({"jsonrpc": "2.0", **message}, separators=(",", ":")).encode("utf-8")
        return b"Content-Length: %d\r\n\r\n" % len(body) + body

    def notification(self, method: str, params: Any) -> bytes:
        return self.frame({"method": method, "params": params})

    def request_frame(self, method: str, params: Any) -> tuple[bytes, asyncio.Future]:
        _, data, future = self.numbered_request_frame(method, params)
        return data, future

    def numbered_request_frame(self, method: str, params: Any) -> tuple[int, bytes, asyncio.Future]:
        """A request's id too, for a later `cancel_frame`."""
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        return self._next_id, self.frame({"id": self._next_id, "method": method, "params": params}), future

    def cancel_frame(self, request_id: int) -> bytes:
        return self.notification("$/cancelRequest", {"id": request_id})

    async def send(self, *frames: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"".join(frames))
        await self.process.stdin.drain()

    async def request(self, method: str, params: Any = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        data, future = self.request_frame(method, params)
        await self.send(data)
        result, _ = await asyncio.wait_for(future, timeout)
        return result

    async def _read_loop(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while True:
                length = None
                while (header := await stdout.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode("ascii").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if not header or length is None:
                    break
                message = json.loads(await stdout.readexactly(length))
                received = time.perf_counter()
                self._dispatch(message, received)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(LspError("the server closed its output"))

    def _dispatch(self, message: dict[str, Any], received: float) -> None:
        if "method" in message:
            if "id" in message:  # a request from the server (none is expected): answer it with null
                self.process.stdin.write(self.frame({"id": message["id"], "result": None}))
            elif message["method"] == "window/showMessage":
                self.messages.append(message["params"])
            return
        future = self._pending.pop(message.get("id"), None)
        if future is None or future.done():
            return
        if "error" in message:
            error = message["error"]
            future.set_exception(LspError(f"{error.get('code')}: {error.get('message')}", error.get("code")))
        else:
            future.set_result((message.get("result"), received))

    async def close(self) -> None:
        try:
            await self.request("shutdown", None, timeout=30)
            await self.send(self.notification("exit", None))
            await asyncio.wait_for(self.process.wait(), 30)
        except (LspError, asyncio.TimeoutError, ConnectionError):
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        self._reader.cancel()


# -- one server -----------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    file: str
    case: str
    mode: str
    line: int
    edit_to_cursor: int  # characters from the edit to the cursor
    latency_ms: float
    text: str  # the first item's insertText ("" when there was none)
    server: dict[str, float] | None = None  # the completer's timings of this request, in ms / tokens
    load_1m: float = 0.0


@dataclass
class OpenDocument:
    uri: str
    text: str
    version: int = 1


class BenchServer:
    """One `superpie serve` process in one cacheMode, driven keystroke by keystroke."""

    def __init__(self, mode: str, client: JsonRpcClient) -> None:
        self.mode, self.client = mode, client

    @classmethod
    async def start(cls, mode: str, *, model: str, cache: Path | None, refresh: str, log: Any,
                    settings: dict[str, Any] | None = None, args: tuple[str, ...] = ()) -> BenchServer:
        """`settings` replaces this benchmark's initializationOptions (an empty dict: the server's defaults);
        `args` are more `superpie serve` options."""
        command = [sys.executable, "-m", "lsp_server.cli", *(["--cache-dir", str(cache)] if cache else []),
                   "serve", "--model", model, "--no-persist", "--log-level", "warning", *args]
        client = await JsonRpcClient.start(command, stderr=log)
        server = cls(mode, client)
        if settings is None:
            # no prefetch: each keystroke is one model call, so the server's timings pair up with the samples
            settings = {"cacheMode": mode, "refresh": refresh, "scope": "single", "drafts": 1, "automaticDrafts": 1,
                        "prefetch": False}
        capabilities = {"general": {"positionEncodings": ["utf-16"]},
                        "textDocument": {"inlineCompletion": {}, "synchronization": {}}}
        await client.request("initialize", {"processId": os.getpid(), "rootUri": None, "capabilities": capabilities,
                                            "initializationOptions": settings})
        await client.send(client.notification("initialized", {}))
        return server

    async def stats(self) -> dict[str, Any]:
        return await self.client.request("workspace/executeCommand", {"command": "superpie.stats", "arguments": []})

    async def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = (await self.stats())["server"]
            if state["model_state"] == "ready":
                return
            if state["model_state"] == "failed":
                raise LspError(f"the {self.mode} server could not load the model: {state['model_error']}")
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the {self.mode} server did not load the model in {timeout:.0f} s")

    async def wait_quiet(self, timeout: float = 600) -> float:
        """Until the worker has no job and its idle steps (encoding, refresh) have stopped; returns seconds. Polls
        QUIET_POLL_S apart: polling faster would keep the idle steps from running and look quiet."""
        t0 = time.monotonic()
        previous, calm = None, 0
        while time.monotonic() - t0 < timeout:
            stats = await self.stats()
            worker, cache = stats["server"]["worker"], stats["cache"] or {}
            state = (worker["idle_seconds"], cache.get("cached_tokens"), cache.get("stale_rows"))
            still = (previous is not None and worker["queued"] == 0 and stats["cache"] is not None
                     and state[1:] == previous[1:]
                     and state[0] - previous[0] < 0.005)
            calm = calm + 1 if still else 0
            if calm >= 2:
                return time.monotonic() - t0
            previous = state
            await asyncio.sleep(QUIET_POLL_S)  # each poll is a job, which holds the idle steps off for IDLE_DELAY_S
        raise TimeoutError(f"the {self.mode} server was still busy after {timeout:.0f} s")

    async def cache_stats(self, timeout: float = 60) -> dict[str, Any]:
        """The cache part of superpie.stats, once no model job runs or waits (it is null until then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cache = (await self.stats())["cache"]
            if cache is not None:
                return cache
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the {self.mode} server's model stayed busy for {timeout:.0f} s")

    async def open(self, uri: str, text: str, language: str = "python") -> OpenDocument:
        await self.client.send(self.client.notification("textDocument/didOpen", {
            "textDocument": {"uri": uri, "languageId": language, "version": 1, "text": text}}))
        return OpenDocument(uri, text)

    async def close(self, doc: OpenDocument) -> None:
        await self.client.send(self.client.notification("textDocument/didClose", {"textDocument": {"uri": doc.uri}}))

    async def complete(self, doc: OpenDocument, cursor: int) -> str:
        result = await self.client.request("textDocument/inlineCompletion", self._inline_params(doc, cursor))
        items = (result or {}).get("items") or []
        return items[0]["insertText"] if items else ""

    def _inline_params(self, doc: OpenDocument, cursor: int, trigger: int = AUTOMATIC) -> dict[str, Any]:
        return {"textDocument": {"uri": doc.uri}, "position": lsp_position(doc.text, cursor),
                "context": {"triggerKind": trigger}}

    def change_frame(self, doc: OpenDocument, start: int, end: int, text: str) -> bytes:
        """The didChange that replaces doc.text[start:end] with `text` (applied to `doc`), to send."""
        change = {"range": {"start": lsp_position(doc.text, start), "end": lsp_position(doc.text, end)}, "text": text}
        doc.text = doc.text[:start] + text + doc.text[end:]
        doc.version += 1
        return self.client.notification("textDocument/didChange", {
            "textDocument": {"uri": doc.uri, "version": doc.version}, "contentChanges": [change]})

    async def keystroke(self, doc: OpenDocument, key: Keystroke, trigger: int = AUTOMATIC) -> tuple[float, str]:
        """didChange + inlineCompletion in one write; milliseconds until the answer was read, and its first item."""
        did_change = self.change_frame(doc, key.start, key.end, key.new_text)
        params = self._inline_params(doc, key.cursor, trigger)
        request, future = self.client.request_frame("textDocument/inlineCompletion", params)
        t0 = time.perf_counter()
        await self.client.send(did_change, request)
        result, received = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        items = (result or {}).get("items") or []
        return 1000 * (received - t0), items[0]["insertText"] if items else ""


# -- the run --------------------------------------------------------------------------------------------------------

def server_timings(entry: dict[str, float]) -> dict[str, float]:
    """The completer's timings of one request, in milliseconds (tokens as a count)."""
    ms = {k[:-2] + "_ms": 1000 * v for k, v in entry.items() if k.endswith("_s")}
    ms["generated_tokens"] = entry.get("generated_tokens", 0.0)
    return ms


async def run_case(server: BenchServer, doc: OpenDocument, plan: FilePlan, case: str, gap_s: float) -> list[Sample]:
    """The keystrokes of one case, GAP_S apart; each sample gets the server's timings of its request."""
    calls_before = (await server.cache_stats())["calls"]
    samples = []
    for key in (k for k in plan.keystrokes if k.case == case):
        latency, text = await server.keystroke(doc, key)
        samples.append(Sample(plan.name, case, server.mode, key.line, key.cursor - key.start, round(latency, 2), text,
                              load_1m=os.getloadavg()[0]))
        await asyncio.sleep(gap_s)
    recent = [e for e in (await server.cache_stats())["recent_timings"] if e["call"] > calls_before]
    if len(recent) == len(samples):  # one model call per keystroke, as planned: pair them up
        for sample, entry in zip(samples, recent):
            sample.server = server_timings(entry)
    else:
        print(f"  {plan.name} {case} {server.mode}: {len(recent)} model calls for {len(samples)} keystrokes; "
              "server timings left out", file=sys.stderr)
    return samples


async def bench_file(servers: dict[str, BenchServer], plan: FilePlan, gap_s: float) -> tuple[list[Sample], dict]:
    """Open and warm the file in every server, then each case in each mode (one server busy at a time)."""
    uri = f"file:///bench/{plan.name}"
    docs, warm = {}, {}
    for mode, server in servers.items():
        t0 = time.perf_counter()
        docs[mode] = await server.open(uri, plan.opened)
        await server.complete(docs[mode], plan.warm_cursor)
        await server.wait_quiet()
        warm[mode] = round(time.perf_counter() - t0, 2)
    samples = []
    for case in CASES:
        for mode, server in servers.items():
            t0 = time.perf_counter()
            block = await run_case(server, docs[mode], plan, case, gap_s)
            settle = await server.wait_quiet()
            samples.extend(block)
            p50 = statistics.median(s.latency_ms for s in block)
            print(f"  {plan.name} {case:9s} {mode:5s} p50 {p50:8.0f} ms  ({time.perf_counter() - t0:.0f} s, "
                  f"quiet after {settle:.1f} s, load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    texts = {mode: doc.text for mode, doc in docs.items()}
    if len(set(texts.values())) != 1:
        raise AssertionError("the servers were given different texts")
    for mode, server in servers.items():
        await server.close(docs[mode])
    return samples, warm


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


BREAKDOWN = ("edits_ms", "context_ms", "prefill_ms", "decode_ms", "generated_tokens", "total_ms")


def summarize(samples: list[Sample], modes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Per case and mode: latency p50/p90 and the median of the server's breakdown; per case the pie/full ratio."""
    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        out[case] = {}
        for mode in modes:
            group = [s for s in samples if s.case == case and s.mode == mode]
            if not group:
                continue
            latencies = [s.latency_ms for s in group]
            row: dict[str, Any] = {"n": len(group), "p50_ms": round(percentile(latencies, 0.5), 1),
                                   "p90_ms": round(percentile(latencies, 0.9), 1),
                                   "mean_ms": round(statistics.fmean(latencies), 1),
                                   "empty": sum(not s.text.strip() for s in group)}
            timed = [s.server | {"latency_ms": s.latency_ms} for s in group if s.server]
            if timed:
                row["server_median"] = server_breakdown(timed)
            out[case][mode] = row
        if "pie" in out[case] and "full" in out[case]:
            pie, full = out[case]["pie"], out[case]["full"]
            texts = {(s.file, s.line): s.text for s in samples if s.case == case and s.mode == "full"}
            same = [s.text == texts.get((s.file, s.line)) for s in samples if s.case == case and s.mode == "pie"]
            out[case]["pie_over_full"] = {"p50": round(pie["p50_ms"] / full["p50_ms"], 4),
                                          "p90": round(pie["p90_ms"] / full["p90_ms"], 4),
                                          "same_suggestion": round(sum(same) / len(same), 3)}
    return out


def server_breakdown(timed: list[dict[str, float]]) -> dict[str, float | None]:
    """Medians of the server's timings; `other_ms` is the latency the server did not time (waiting for an idle
    step in progress, JSON-RPC, the event loop)."""
    out: dict[str, float | None] = {key: round(statistics.median(t.get(key, 0.0) for t in timed), 1)
                                    for key in BREAKDOWN}
    per_token = [t["decode_ms"] / t["generated_tokens"] for t in timed if t.get("generated_tokens")]
    out["decode_ms_per_token"] = round(statistics.median(per_token), 1) if per_token else None
    out["other_ms"] = round(statistics.median(t["latency_ms"] - t.get("edits_ms", 0.0) - t.get("total_ms", 0.0)
                                              for t in timed), 1)
    return out


def format_table(summary: dict[str, dict[str, Any]], modes: tuple[str, ...]) -> str:
    lines = ["| case | mode | n | p50 ms | p90 ms | pie/full p50 | edit | context | prefill | decode | tokens "
             "| ms/token | other |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in CASES:
        for mode in modes:
            row = summary[case].get(mode)
            if row is None:
                continue
            ratio = summary[case].get("pie_over_full", {}).get("p50") if mode == "pie" else None
            s = row.get("server_median") or {}

            def cell(key: str) -> str:
                value = s.get(key)
                return "" if value is None else f"{value:.0f}" if key != "decode_ms_per_token" else f"{value:.1f}"
            lines.append(f"| {case} | {mode} | {row['n']} | {row['p50_ms']:.0f} | {row['p90_ms']:.0f} | "
                         f"{'' if ratio is None else f'{ratio:.3f}'} | {cell('edits_ms')} | {cell('context_ms')} | "
                         f"{cell('prefill_ms')} | {cell('decode_ms')} | {cell('generated_tokens')} | "
                         f"{cell('decode_ms_per_token')} | {cell('other_ms')} |")
    return "\n".join(lines)


async def _run(model: str, cache: Path | None, plans: list[FilePlan], modes: tuple[str, ...], refresh: str,
               gap_s: float, log: Any) -> tuple[list[Sample], dict[str, Any]]:
    servers: dict[str, BenchServer] = {}
    try:
        for mode in modes:  # one at a time: two model loads at once would only slow both
            servers[mode] = await BenchServer.start(mode, model=model, cache=cache, refresh=refresh, log=log)
            await servers[mode].wait_ready()
        samples, warm = [], {}
        for plan in plans:
            file_samples, warm[plan.name] = await bench_file(servers, plan, gap_s)
            samples.extend(file_samples)
        final = {mode: (await server.stats())["server"] for mode, server in servers.items()}
        info = {"warm_s": warm,
                "server": {mode: {"counters": s["counters"], "rss_mb": s["rss_mb"],
                                  "idle_seconds": s["worker"]["idle_seconds"]} for mode, s in final.items()},
                "messages": {mode: server.client.messages for mode, server in servers.items()}}
        return samples, info
    finally:
        for server in servers.values():
            await server.client.close()


def run_lsp_bench(model: str = DEFAULT_MODEL, *, json_out: Path | None = None, cache: Path | None = None,
                  sources: list[tuple[str, str]] | None = None, repeats: int = 2, refresh: str = "idle",
                  modes: tuple[str, ...] = MODES, gap_s: float = GAP_S) -> dict[str, Any]:
    """Run the benchmark over `sources` (name, text) pairs, by default two stdlib files; print the table, write
    the JSON; returns the summary."""
    sources = sources or stdlib_files(2)
    if refresh not in REFRESH_POLICIES:
        raise ValueError(f"refresh must be one of {', '.join(REFRESH_POLICIES)}")
    if not modes or any(mode not in SPLICE_MODES for mode in modes):
        raise ValueError(f"modes must be among {', '.join(SPLICE_MODES)}")
    if not 1 <= repeats <= 64:  # the server keeps the timings of its last 64 completions
        raise ValueError("--repeats must be from 1 to 64")
    plans = [plan_file(name, text, repeats) for name, text in sources]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", prefix="superpie-bench-lsp-", suffix=".log", delete=False) as log:
        print(f"server logs: {log.name}", file=sys.stderr)
        samples, info = asyncio.run(_run(model, cache, plans, modes, refresh, gap_s, log))
    summary_by_case = summarize(samples, modes)
    goal = {case: {"p50_ms": summary_by_case[case]["pie"]["p50_ms"],
                   "met": summary_by_case[case]["pie"]["p50_ms"] <= GOAL_P50_MS}
            for case in CASES if "pie" in summary_by_case[case]}
    summary = {
        "model": model,
        "settings": {"files": len(plans), "repeats": repeats, "modes": list(modes), "refresh": refresh,
                     "gap_ms": round(1000 * gap_s), "scope": "single", "drafts": 1, "trigger": "automatic",
                     "far_chars": FAR_CHARS},
        "files": [{"name": p.name, "lines": p.original.count("\n"), "characters": len(p.original),
                   "sha256": hashlib.sha256(p.original.encode()).hexdigest()} for p in plans],
        "machine": {**machine_info(load_before),
                    "load_1m_during_median": round(statistics.median(s.load_1m for s in samples), 2)},
        "wall_s": round(time.perf_counter() - t0, 1),
        "goal": {"p50_ms_max": GOAL_P50_MS, "cases": goal},
        "results": summary_by_case,
        **info,
        "samples": [asdict(s) for s in samples],
    }
    print(f"LSP latency: {model}, {len(plans)} file(s), {repeats} keystroke(s) per case and file, refresh {refresh}, "
          f"{1000 * gap_s:.0f} ms between an answer and the next keystroke")
    print(format_table(summary_by_case, modes))
    path = json_out or DEFAULT_JSON
    save_results(summary, path)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lsp", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default: $SUPERPIE_CACHE)")
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help=f"default: {DEFAULT_JSON}")
    parser.add_argument("--files", type=int, default=2, help=f"stdlib files, 1 to {len(STDLIB_FILES)} (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="keystrokes per case, file and mode (default 2)")
    parser.add_argument("--refresh", default="idle", choices=REFRESH_POLICIES,
                        help="the servers' refresh policy for stale rows (default idle)")
    parser.add_argument("--modes", default=",".join(MODES), help="cache modes, comma-separated (default pie,full)")
    parser.add_argument("--gap-ms", type=float, default=1000 * GAP_S, help="from an answer to the next keystroke")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    run_lsp_bench(args.model, json_out=args.json_out, cache=args.cache, sources=stdlib_files(args.files),
                  repeats=args.repeats, refresh=args.refresh, modes=modes, gap_s=args.gap_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
