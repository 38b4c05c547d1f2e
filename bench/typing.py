"""Typing benchmark: real lines typed into `superpie serve`, one character every 120 ms, with two pauses a line.

How fast and how good is the suggestion when the typist pauses, and how many keystrokes get an answer before the
next one? The same for llama.cpp's `llama-server` driven as llama.vscode drives it, side by side.

**Lines.** `--limit` lines (default 20) from the edits dataset (shared/data/edits/README.md), records in file
order, each record's targets bottom up as `bench.fim.lines_to_type` picks them. A record's file after its commit is
opened once and warmed up (one unmeasured request at the end of the line above the first line to type, then quiet);
before each line is typed, that line is deleted after its indentation (one didChange) and the client waits until the
server is quiet.

**Typing.** The line's characters are typed one every `interval` (120 ms). Every keystroke is one write: a
`$/cancelRequest` for the previous request if it has not been answered, the didChange, and an Automatic
`textDocument/inlineCompletion` at the new cursor. The server runs with its default settings.

**Pauses**, two per line, where the typist stops and waits for the answer:
- `line_start`: the cursor after the indentation, before the first character (a request with no edit);
- `mid_line`: the first word boundary (the end of a run of letters, digits or "_") at or past 40% of the line's
  content (trailing whitespace aside) and before its end; a line with none pauses after ceil(40%) characters.
  The pause's request is the one of the keystroke that reaches it.

**Metrics.**
- Pause latency: from writing the pause's request to reading its response (a result or an error). p50 and p90.
- Keep-up: answered / keystrokes. A keystroke's request is *answered* when a result (with items or empty) was read
  before the next keystroke was written; for the line's last keystroke, within one interval. A request that was
  cancelled, or answered RequestCancelled / ContentModified, or answered after that deadline, is not answered.
  The keystrokes that reach a mid-line pause are left out (the typist waits for those by design).
- Exact at a pause: the line as it would read after accepting the first item (the typed text plus the first line
  of the suggestion, the item's `range` applied) equals the target line, trailing whitespace stripped.
- Similar at a pause: `difflib.SequenceMatcher(None, a, b).ratio() >= 0.8`, where a and b are the accepted line
  and the target line after the typed prefix (the part the suggestion had to write), trailing whitespace stripped.
  So the typed text does not inflate it, and exact implies similar. `similarity_mean` is the mean ratio.

**The peer (`--against URL`).** A running llama.cpp `llama-server`, driven the way llama.vscode drives it. What was
taken from llama.vscode (github.com/ggml-org/llama.vscode at 3938fb3, 2026-08-19), re-implemented here:
- `src/completion.ts` `getCompletionItems`: each keystroke is one provider call, and the editor cancels the
  previous call's token. The call waits `debounce_ms` and returns if cancelled; then, while a request is in flight,
  polls every DELAY_BEFORE_COMPL_REQUEST (150 ms, `src/configuration.ts`) and returns if cancelled; then it sends one
  request and waits for it (the HTTP request itself is never aborted). The debounce is 150 ms here, as in the issue's
  peer measurement (`llama-vscode.debounce_ms` defaults to 0, `package.json`).
- The prompt: `input_prefix` = the 256 lines before the cursor's line (`n_prefix`), each + "\\n"; `input_suffix` =
  the rest of the line, "\\n", the 64 lines after it (`n_suffix`), "\\n"; `prompt` = the line before the cursor, or
  "" when that is only indentation, whose width is then stripped from the suggestion (`src/utils.ts`
  getPrefixLines / getSuffixLines).
- The body (`src/llama-server.ts` createRequestPayload): `id_slot` 0, `input_prefix`, `input_suffix`,
  `input_extra` (the ring's chunks), `prompt`, `n_predict` 128, `top_k` 40, `top_p` 0.99, `stream` false,
  `samplers` ["top_k", "top_p", "infill"], `cache_prompt` true, `n_indent` (the line's indentation, when not 0),
  `t_max_prompt_ms` 500, `t_max_predict_ms` 500 (`package.json` defaults). `n_cmpl` is 1 (one suggestion, as
  superpie's Automatic requests; llama.vscode's 3 needs 3 server slots).
- The client's result cache: keyed by SHA-256 of prefix|suffix|prompt, 250 entries, and a lookup that walks back
  over the typed prompt for a cached suggestion the typed text is consistent with (getCachedCompletion). After
  a suggestion is shown, `cacheFutureSuggestion` requests the completion of the state after accepting it and
  `cacheFutureAcceptLineSuggestion` caches the rest after accepting its first line.
- The discard rules (shouldDiscardSuggestion): empty, or repeating the line's suffix or the next lines.
- The ring of extra context (`src/extra-context.ts`): after a suggestion, when the cursor moved more than 32
  lines, a prefix chunk (from 1,024 to 256 lines above) and a suffix chunk (64 lines below) are queued, each at most
  32 lines (a random start, seeded here). Every second, once no completion started for 3 s, one queued chunk
  joins the ring (16 chunks) and an `n_predict` 0 request warms the server's cache with it.
Pause latency for the peer runs from the keystroke's provider call to its return (debounce included): what the
user waits for. Keep-up counts a keystroke answered when its call returned a suggestion or an empty answer before the
next keystroke.

**Cross-file context (`--cross-file TOKENS`).** A second `superpie serve` with `crossFileContext` on
(`crossFileTokens` TOKENS) is typed into in turn with the first, whose setting is off; both have the other files of
`requests` (the pinned sdist of `bench crossfile`) open as tabs, so what differs is the context alone.

    python -m bench.typing [--data FILE] [--limit N] [--against URL] [--json OUT] [--model M] [--cache DIR]
                           [--interval-ms MS] [--debounce-ms MS] [--cross-file TOKENS]
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from lsprotocol import types

from bench.engine import machine_info, save_results
from bench.fim import lines_to_type
from bench.lsp import AUTOMATIC, BenchServer, LspError, OpenDocument, lsp_position, percentile
from bench.pie import DEFAULT_DATA, edits_parser, load_records
from inference.registry import DEFAULT_MODEL
from kv_cache.edits import TextEdit
from lsp_server.positions import UTF16, offset_at

DEFAULT_JSON = Path(__file__).parent / "results" / "typing.json"
DEFAULT_LIMIT = 20
INTERVAL_S = 0.120
PEER_DEBOUNCE_S = 0.150
PAUSE_FRACTION = 0.4
SIMILAR_RATIO = 0.8
ANSWER_TIMEOUT_S = 600.0
CANCELLED_CODES = (-32800, -32801)  # RequestCancelled, ContentModified
SUPERPIE, PEER = "superpie", "llama.cpp"
CONTEXT = "superpie + cross-file"  # the second server of --cross-file
PAUSE_KINDS = ("line_start", "mid_line")
_WORD = re.compile(r"\w")


# -- the lines ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TypedLine:
    """One target line: where it is in the record's file after the commit, and where the typist pauses."""

    record: int  # index of the record in `records`
    line: int  # 0-based line in the file
    text: str  # the whole target line, indentation included
    cursor: int  # offset of the line's content (after the indentation) in the file
    expected: str  # the content, typed character by character
    mid_pause: int  # characters typed at the mid-line pause


def mid_pause(content: str) -> int:
    """Characters typed at the mid-line pause: the first word end at or past 40% of the content (trailing whitespace
    aside) and before its end, else ceil(40%)."""
    body = content.rstrip()
    first = max(1, math.ceil(PAUSE_FRACTION * len(body)))
    for p in range(first, len(body)):
        if _WORD.match(body[p - 1]) and not _WORD.match(body[p]):
            return p
    return first


class _PlainText:
    """The record's text without a model: `bench.fim.lines_to_type` deletes and restores each target through it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def apply(self, edits: Sequence[TextEdit]) -> None:
        for edit in edits:
            self.text = edit.apply(self.text)

    def change(self, uri: str, edits: Sequence[TextEdit]) -> None:
        self.apply(edits)


def plan_lines(records: list[dict[str, Any]], limit: int) -> list[TypedLine]:
    """The first `limit` target lines, records in order, each record's lines as bench.fim visits them."""
    lines: list[TypedLine] = []
    for index, record in enumerate(records):
        doc = _PlainText(record["after"])
        for line in lines_to_type(doc, record):  # type: ignore[arg-type]  # only its edits are needed
            if len(lines) == limit:
                return lines
            if not line.expected.strip():
                continue
            lines.append(TypedLine(index, line.target["line"], line.target["text"], line.cursor, line.expected,
                                   mid_pause(line.expected)))
    return lines


# -- what a pause is worth ------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """How one request ended: `status` is items, empty, cancelled or error; `line` the line after accepting."""

    received: float
    status: str
    suggestion: str = ""  # the first item's text
    line: str | None = None
    server: dict[str, Any] | None = None  # the peer's own timings of the request


@dataclass
class Answer:
    """A request written at `sent`; `outcome` resolves when it ends."""

    sent: float
    outcome: asyncio.Future


def accepted_line(text: str, cursor: int, insert: str, start: int | None = None, end: int | None = None) -> str:
    """The cursor's line after the suggestion replaces text[start:end] (the cursor by default)."""
    start = cursor if start is None else start
    end = cursor if end is None else end
    after = text[:start] + insert + text[end:]
    line_start = text.rfind("\n", 0, min(start, cursor)) + 1
    line_end = after.find("\n", start + len(insert.split("\n", 1)[0]))
    return after[line_start:line_end if line_end >= 0 else len(after)]


def similarity(line: str, target: str, typed: str) -> float:
    """SequenceMatcher ratio of what the suggestion wrote (the line after the typed prefix) to the rest of the
    target line, trailing whitespace stripped."""
    skip = len(typed) if line.startswith(typed) and target.startswith(typed) else 0
    return difflib.SequenceMatcher(None, line[skip:].rstrip(), target[skip:].rstrip(), autojunk=False).ratio()


@dataclass
class PauseSample:
    kind: str
    typed_chars: int
    latency_ms: float
    status: str
    suggestion: str
    line: str  # the line after accepting (the typed line when there was no suggestion)
    exact: bool
    similarity: float
    similar: bool
    server: dict[str, Any] | None = None


def pause_sample(kind: str, line: TypedLine, typed_chars: int, answer: Answer, outcome: Outcome) -> PauseSample:
    typed = line.text[:len(line.text) - len(line.expected) + typed_chars]  # indentation + what was typed
    result = outcome.line if outcome.line is not None else typed
    ratio = similarity(result, line.text, typed)
    exact = result.rstrip() == line.text.rstrip()
    return PauseSample(kind, typed_chars, round(1000 * (outcome.received - answer.sent), 2), outcome.status,
                       outcome.suggestion, result, exact, round(ratio, 4), exact or ratio >= SIMILAR_RATIO,
                       outcome.server)


@dataclass
class LineRun:
    record: int
    commit: str
    path: str
    line: int
    expected: str
    pauses: list[PauseSample]
    keystrokes: int
    answered: int
    cancelled: int  # cancelled by the client or answered RequestCancelled / ContentModified
    late: int  # answered after the next keystroke
    errors: int


# -- the engines ----------------------------------------------------------------------------------------------------

class Typist(Protocol):
    """One engine behind the editor: superpie over LSP, or llama-server driven as llama.vscode does."""

    name: str

    async def open(self, uri: str, text: str) -> None: ...

    async def edit(self, edit: TextEdit) -> None: ...

    async def settle(self) -> None: ...

    async def send(self, edit: TextEdit | None, cursor: int) -> Answer:
        """Apply `edit` (if any) and ask for a suggestion at `cursor`; the previous unanswered request is cancelled."""

    def cancel_pending(self) -> None: ...

    @property
    def text(self) -> str: ...

    async def close_document(self) -> None: ...


class SuperpieTypist:
    """`superpie serve` over stdio; with `tabs` (uri -> text), those documents are open beside the typed one, as
    the project's other files are in an editor."""

    def __init__(self, server: BenchServer, name: str = SUPERPIE, tabs: dict[str, str] | None = None) -> None:
        self.server, self.name = server, name
        self.doc: OpenDocument | None = None
        self._pending: tuple[int, asyncio.Future] | None = None  # the last request's id and response future
        self.tabs = tabs or {}
        self._open_tabs: dict[str, OpenDocument] = {}

    @property
    def text(self) -> str:
        assert self.doc is not None
        return self.doc.text

    async def open(self, uri: str, text: str) -> None:
        """The typed document, in place of the tab with its path (that tab comes back with the next record)."""
        for tab, tab_text in self.tabs.items():
            if tab != uri and tab not in self._open_tabs:
                self._open_tabs[tab] = await self.server.open(tab, tab_text)
        if uri in self._open_tabs:
            await self.server.close(self._open_tabs.pop(uri))
        self.doc = await self.server.open(uri, text)

    def _change(self, edit: TextEdit) -> bytes:
        doc = self.doc
        assert doc is not None
        change = {"range": {"start": lsp_position(doc.text, edit.start), "end": lsp_position(doc.text, edit.end)},
                  "text": edit.text}
        doc.text = edit.apply(doc.text)
        doc.version += 1
        return self.server.client.notification("textDocument/didChange", {
            "textDocument": {"uri": doc.uri, "version": doc.version}, "contentChanges": [change]})

    async def edit(self, edit: TextEdit) -> None:
        await self.server.client.send(self._change(edit))

    async def settle(self) -> None:
        await self.server.wait_quiet()

    async def send(self, edit: TextEdit | None, cursor: int) -> Answer:
        doc, client = self.doc, self.server.client
        assert doc is not None
        frames = [self._cancel_frame()] if self._pending and not self._pending[1].done() else []
        if edit is not None:
            frames.append(self._change(edit))
        params = {"textDocument": {"uri": doc.uri}, "position": lsp_position(doc.text, cursor),
                  "context": {"triggerKind": AUTOMATIC}}
        request_id, frame, future = client.numbered_request_frame("textDocument/inlineCompletion", params)
        sent = time.perf_counter()
        await client.send(*frames, frame)
        self._pending = (request_id, future)
        return Answer(sent, asyncio.ensure_future(self._outcome(future, doc.text, cursor)))

    def _cancel_frame(self) -> bytes:
        assert self._pending is not None
        return self.server.client.cancel_frame(self._pending[0])

    def cancel_pending(self) -> None:
        if self._pending and not self._pending[1].done():
            self.server.client.process.stdin.write(self._cancel_frame())

    @staticmethod
    async def _outcome(future: asyncio.Future, text: str, cursor: int) -> Outcome:
        try:
            result, received = await asyncio.wait_for(future, ANSWER_TIMEOUT_S)
        except LspError as error:
            status = "cancelled" if error.code in CANCELLED_CODES else "error"
            return Outcome(time.perf_counter(), status)
        items = (result or {}).get("items") or []
        if not items:
            return Outcome(received, "empty")
        item = items[0]
        insert = item["insertText"] if isinstance(item["insertText"], str) else item["insertText"]["value"]
        start = end = None
        if item.get("range"):
            start = offset_at(text, types.Position(**item["range"]["start"]), UTF16)
            end = offset_at(text, types.Position(**item["range"]["end"]), UTF16)
        return Outcome(received, "items", insert, accepted_line(text, cursor, insert, start, end))

    async def close_document(self) -> None:
        assert self.doc is not None
        await self.server.close(self.doc)


@dataclass
class _Token:
    cancelled: bool = False


@dataclass
class PeerCounters:
    completions: int = 0  # /infill requests for a suggestion
    prefetches: int = 0  # cacheFutureSuggestion requests
    warmups: int = 0  # n_predict 0 requests with the ring's chunks
    cache_hits: int = 0
    http_errors: int = 0


@dataclass
class LlamaVscodeConfig:
    """llama.vscode's defaults (package.json, src/configuration.ts), n_cmpl aside."""

    debounce_s: float = PEER_DEBOUNCE_S
    poll_s: float = 0.150  # DELAY_BEFORE_COMPL_REQUEST
    n_prefix: int = 256
    n_suffix: int = 64
    n_predict: int = 128
    t_max_prompt_ms: int = 500
    t_max_predict_ms: int = 500
    max_line_suffix: int = 8
    max_cache_keys: int = 250
    ring_n_chunks: int = 16
    ring_chunk_size: int = 64
    ring_scope: int = 1024
    ring_update_s: float = 1.0
    ring_idle_s: float = 3.0  # RING_UPDATE_MIN_TIME_LAST_COMPL
    max_queued_chunks: int = 16
    max_pick_distance: int = 32  # MAX_LAST_PICK_LINE_DISTANCE


class LlamaVscodeTypist:
    """A llama.cpp `llama-server` at `url`, driven as llama.vscode drives it (see the module docstring)."""

    name = PEER

    def __init__(self, url: str, config: LlamaVscodeConfig | None = None, seed: int = 0) -> None:
        self.url = url.rstrip("/")
        self.config = config or LlamaVscodeConfig()
        self.counters = PeerCounters()
        self._text = ""
        self.filename = ""
        self._token: _Token | None = None
        self._in_progress = False  # isRequestInProgress
        self._tasks: set[asyncio.Future] = set()  # provider calls and what they started in the background
        self._cache: OrderedDict[str, list[str]] = OrderedDict()
        self.ring: list[dict[str, Any]] = []
        self._queued: list[dict[str, Any]] = []
        self._last_pick = -9999
        self._last_start = time.monotonic()
        self._rng = random.Random(seed)
        self._ring_task: asyncio.Task | None = None

    @property
    def text(self) -> str:
        return self._text

    # -- HTTP --------------------------------------------------------------------------------------------------------

    def _post_blocking(self, path: str, body: bytes) -> Any:
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=ANSWER_TIMEOUT_S) as response:
            return json.loads(response.read())

    async def _post(self, body: dict[str, Any]) -> Any:
        """POST /infill from a thread; the body is serialized here, before the ring can change."""
        try:
            return await asyncio.to_thread(self._post_blocking, "/infill", json.dumps(body).encode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as error:
            self.counters.http_errors += 1
            print(f"  llama-server: {error}", file=sys.stderr)
            return None

    def properties(self) -> dict[str, Any]:
        """What the server says about itself (GET /props), for the JSON; empty when it does not say."""
        try:
            with urllib.request.urlopen(self.url + "/props", timeout=10) as response:
                props = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return {}
        settings = props.get("default_generation_settings") or {}
        return {"model_path": props.get("model_path"), "build_info": props.get("build_info"),
                "total_slots": props.get("total_slots"), "n_ctx": settings.get("n_ctx")}

    def _payload(self, prefix: str, suffix: str, prompt: str, n_indent: int) -> dict[str, Any]:
        c = self.config
        body: dict[str, Any] = {"id_slot": 0, "input_prefix": prefix, "input_suffix": suffix, "input_extra": self.ring,
                                "prompt": prompt, "n_predict": c.n_predict, "n_cmpl": 1, "top_k": 40, "top_p": 0.99,
                                "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
                                "t_max_prompt_ms": c.t_max_prompt_ms, "t_max_predict_ms": c.t_max_predict_ms}
        if n_indent:
            body["n_indent"] = n_indent
        return body

    # -- the editor side ---------------------------------------------------------------------------------------------

    async def open(self, uri: str, text: str) -> None:
        self._text, self.filename = text, uri.rsplit("/", 1)[-1]
        self._last_pick = -9999
        if self._ring_task is None:
            self._ring_task = asyncio.ensure_future(self._ring_updates())

    async def edit(self, edit: TextEdit) -> None:
        self._text = edit.apply(self._text)

    async def settle(self) -> None:
        """Until no provider call and no request it started (prefetch, cache warm-up) is left."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def send(self, edit: TextEdit | None, cursor: int) -> Answer:
        self.cancel_pending()
        if edit is not None:
            self._text = edit.apply(self._text)
        token = _Token()
        self._token = token
        return Answer(time.perf_counter(), self._spawn(self._provide(self._text, cursor, token)))

    def cancel_pending(self) -> None:
        if self._token is not None:
            self._token.cancelled = True

    async def close_document(self) -> None:
        await self.settle()

    async def close(self) -> None:
        if self._ring_task is not None:
            self._ring_task.cancel()
        await self.settle()

    # -- the provider (completion.ts getCompletionItems) ------------------------------------------------------------

    async def _provide(self, text: str, cursor: int, token: _Token) -> Outcome:
        c = self.config
        if c.debounce_s > 0:
            await asyncio.sleep(c.debounce_s)
            if token.cancelled:
                return Outcome(time.perf_counter(), "cancelled")
        while self._in_progress:
            await asyncio.sleep(c.poll_s)
            if token.cancelled:
                return Outcome(time.perf_counter(), "cancelled")
        self._in_progress = True
        self._last_start = time.monotonic()
        try:
            return await self._complete(text, cursor, token)
        finally:
            self._in_progress = False

    async def _complete(self, text: str, cursor: int, token: _Token) -> Outcome:
        c = self.config
        lines = text.split("\n")
        row = text.count("\n", 0, cursor)
        line_start = text.rfind("\n", 0, cursor) + 1
        line_prefix, line_suffix = text[line_start:cursor], lines[row][cursor - line_start:]
        if len(line_suffix) > c.max_line_suffix:
            return Outcome(time.perf_counter(), "empty")
        n_indent = len(lines[row]) - len(lines[row].lstrip())
        prompt, spaces = (line_prefix, 0) if line_prefix.strip(" \t") else ("", len(line_prefix))
        prefix = "\n".join(lines[max(0, row - c.n_prefix):row]) + "\n"
        suffix = line_suffix + "\n" + "\n".join(lines[row + 1:min(len(lines) - 1, row + c.n_suffix) + 1]) + "\n"

        key = self._key(prefix, suffix, prompt)
        completions, server = self._cached(key, prefix, suffix, prompt), None
        cached = completions is not None
        if cached:
            self.counters.cache_hits += 1
        else:
            if token.cancelled:
                return Outcome(time.perf_counter(), "cancelled")
            self.counters.completions += 1
            data = await self._post(self._payload(prefix, suffix, prompt, n_indent))
            if data is None:
                return Outcome(time.perf_counter(), "error")
            completions = _contents(data)
            first = (data[0] if data else {}) if isinstance(data, list) else data
            timings = first.get("timings") or {}
            server = {k: timings.get(k) for k in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")}
            server["tokens_cached"] = first.get("tokens_cached")
        received = time.perf_counter()
        kept: list[str] = []
        first_lines: list[str] = []
        for completion in completions:
            suggestion_lines = _without_trailing_blank_lines(completion.split("\n"))
            if self._discard(suggestion_lines, lines, row, line_prefix, line_suffix):
                continue
            kept.append(_update_suggestion(suggestion_lines, line_suffix))
            first_lines = first_lines or suggestion_lines
        if not kept:
            return Outcome(received, "empty", server=server)
        if not cached:
            self._put(key, kept)
        self._spawn(self._after_shown(prefix, suffix, prompt, first_lines, line_suffix, row, token))
        shown = _strip_leading_blanks(kept[0], spaces)
        status = "cancelled" if token.cancelled else "items"  # the editor drops a cancelled call's result
        return Outcome(received, status, shown, accepted_line(text, cursor, shown), server)

    @staticmethod
    def _discard(suggestion: list[str], lines: list[str], row: int, line_prefix: str, line_suffix: str) -> bool:
        """shouldDiscardSuggestion: nothing, or a repeat of the line's suffix or of the lines that follow."""
        if not suggestion or (len(suggestion) == 1 and not suggestion[0].strip()):
            return True
        if row == len(lines) - 1:
            return False
        if (len(suggestion) > 1 and suggestion[0].strip() in ("", line_suffix.strip())
                and suggestion[1:] == lines[row + 1:row + len(suggestion)]):
            return True
        if len(suggestion) == 1 and suggestion[0] == line_suffix:
            return True
        nxt = row + 1
        while nxt < len(lines) and not lines[nxt].strip():
            nxt += 1
        if nxt >= len(lines) or line_prefix + suggestion[0] != lines[nxt]:
            return False
        if len(suggestion) == 1:
            return True
        if len(suggestion) == 2:
            return nxt + 1 < len(lines) and suggestion[1] == lines[nxt + 1][:len(suggestion[1])]
        return suggestion[1:] == lines[nxt + 1:nxt + len(suggestion)]

    # -- the client's result cache (lru-cache.ts, getCachedCompletion) -------------------------------------------------

    @staticmethod
    def _key(prefix: str, suffix: str, prompt: str) -> str:
        return hashlib.sha256(f"{prefix}|{suffix}|{prompt}".encode()).hexdigest()

    def _put(self, key: str, completions: list[str]) -> None:
        self._cache[key] = completions
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.max_cache_keys:
            self._cache.popitem(last=False)

    def _get(self, key: str) -> list[str] | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _cached(self, key: str, prefix: str, suffix: str, prompt: str) -> list[str] | None:
        """The exact key, else a suggestion for a shorter prompt that the typed rest agrees with."""
        exact = self._get(key)
        if exact is not None:
            return exact
        for i in range(len(prompt), -1, -1):
            cut = prompt[i:]
            found = self._get(self._key(prefix, suffix, prompt[:i]))
            matching = [c[len(cut):] for c in found or [] if c and c.startswith(cut)]
            if matching:
                return matching
        return None

    # -- after a suggestion is shown (the setTimeout in getCompletionItems) -------------------------------------------

    def _spawn(self, coroutine: Any) -> asyncio.Future:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _after_shown(self, prefix: str, suffix: str, prompt: str, lines: list[str], line_suffix: str, row: int,
                           token: _Token) -> None:
        if not token.cancelled and not line_suffix.strip():
            await self._cache_future(prefix, suffix, prompt, lines)
            if len(lines) > 1:  # cacheFutureAcceptLineSuggestion: no request
                key = self._key(prefix + prompt + lines[0] + "\n", suffix, "")
                if self._get(key) is None:
                    self._put(key, ["\n".join(lines[1:])])
        if not token.cancelled:
            self._pick_context_chunks(row)

    async def _cache_future(self, prefix: str, suffix: str, prompt: str, lines: list[str]) -> None:
        """cacheFutureSuggestion: the suggestion for the state after accepting this one."""
        future_prefix, future_prompt = prefix, prompt + lines[0]
        if len(lines) > 1:
            future_prefix = prefix + prompt + "\n".join(lines[:-1]) + "\n"
            future_prompt = lines[-1]
            kept = future_prefix[:-1].split("\n")
            if len(kept) > self.config.n_prefix:
                future_prefix = "\n".join(kept[-self.config.n_prefix:]) + "\n"
        key = self._key(future_prefix, suffix, future_prompt)
        if self._get(key) is not None:
            return
        self.counters.prefetches += 1
        data = await self._post(self._payload(future_prefix, suffix, future_prompt, len(prompt) - len(prompt.lstrip())))
        contents = [c for c in _contents(data) if c.strip()] if data is not None else []
        if contents:
            self._put(key, ["\n".join(_without_trailing_blank_lines(c.split("\n"))) for c in contents])

    # -- the ring of extra context (extra-context.ts) ----------------------------------------------------------------

    def _pick_context_chunks(self, row: int) -> None:
        c = self.config
        if abs(row - self._last_pick) <= c.max_pick_distance:
            return
        lines = self._text.split("\n")
        last = len(lines) - 1
        self._pick_chunk(lines[max(0, row - c.ring_scope):max(0, row - c.n_prefix) + 1])
        self._pick_chunk(lines[min(last, row + c.n_suffix):min(last, row + c.n_suffix + c.ring_chunk_size) + 1])
        self._last_pick = row

    def _pick_chunk(self, lines: list[str]) -> None:
        c = self.config
        if c.ring_n_chunks <= 0 or len(lines) < 3:
            return
        if len(lines) + 1 >= c.ring_chunk_size:
            start = self._rng.randrange(max(1, len(lines) - c.ring_chunk_size // 2 + 1))
            lines = lines[start:start + c.ring_chunk_size // 2]
        if len(self._queued) >= c.max_queued_chunks:
            self._queued.pop(0)
        self._queued.append({"text": "\n".join(lines) + "\n", "time": int(time.time() * 1000),
                             "filename": self.filename})

    async def _ring_updates(self) -> None:
        """periodicRingBufferUpdate, every second."""
        c = self.config
        while True:
            await asyncio.sleep(c.ring_update_s)
            if not self._queued or time.monotonic() - self._last_start < c.ring_idle_s:
                continue
            self.ring.append(self._queued.pop(0))
            del self.ring[:-c.ring_n_chunks]
            self.counters.warmups += 1
            self._spawn(self._post({"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": self.ring,
                                    "prompt": "", "n_predict": 0, "samplers": [], "cache_prompt": True,
                                    "t_max_prompt_ms": c.t_max_prompt_ms, "t_max_predict_ms": 1}))


def _contents(data: Any) -> list[str]:
    """getComplFromContent: one response object, or a list of them (n_cmpl > 1), distinct contents in order."""
    items = data if isinstance(data, list) else [data]
    return list(dict.fromkeys(item.get("content") or "" for item in items))


def _update_suggestion(lines: list[str], line_suffix: str) -> str:
    """updateSuggestion: with text right of the cursor, only the first line, less that text if it ends with it."""
    if line_suffix.strip():
        if lines[0].endswith(line_suffix):
            return lines[0][:-len(line_suffix)]
        if len(lines) > 1:
            return lines[0]
    return "\n".join(lines)


def _without_trailing_blank_lines(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _strip_leading_blanks(text: str, n: int) -> str:
    """removeLeadingSpaces: up to `n` leading spaces or tabs (the indentation the prompt left out)."""
    i = 0
    while i < len(text) and i < n and text[i] in " \t":
        i += 1
    return text[i:]


# -- typing ---------------------------------------------------------------------------------------------------------

async def _sleep_until(due: float) -> None:
    await asyncio.sleep(max(0.0, due - time.perf_counter()))


async def _settled(answers: Iterable[Answer]) -> list[Outcome]:
    return list(await asyncio.gather(*(a.outcome for a in answers)))


async def type_line(typist: Typist, line: TypedLine, record: dict[str, Any], interval: float) -> LineRun:
    """Delete the line's content, wait for quiet, then type it with the two pauses."""
    await typist.edit(TextEdit(line.cursor, line.cursor + len(line.expected), ""))
    await typist.settle()
    pauses = []
    start = await typist.send(None, line.cursor)
    pauses.append(pause_sample("line_start", line, 0, start, await start.outcome))
    keystrokes: list[Answer] = []  # the ones keep-up counts
    sent: list[float] = []  # every keystroke's send time, pause keystrokes included
    counted: list[int] = []  # index into `sent` of each counted keystroke
    due = time.perf_counter() + interval
    for i, char in enumerate(line.expected):
        await _sleep_until(due)
        answer = await typist.send(TextEdit(line.cursor + i, line.cursor + i, char), line.cursor + i + 1)
        sent.append(answer.sent)
        if i + 1 == line.mid_pause:
            pauses.append(pause_sample("mid_line", line, i + 1, answer, await answer.outcome))
            due = time.perf_counter() + interval
        else:
            keystrokes.append(answer)
            counted.append(len(sent) - 1)
            due += interval
    await _sleep_until(due)
    typist.cancel_pending()
    outcomes = await _settled(keystrokes)
    deadlines = [sent[k + 1] if k + 1 < len(sent) else sent[k] + interval for k in counted]
    answered = sum(o.status in ("items", "empty") and o.received < d for o, d in zip(outcomes, deadlines))
    late = sum(o.status in ("items", "empty") and o.received >= d for o, d in zip(outcomes, deadlines))
    if typist.text != record["after"]:
        raise AssertionError(f"{typist.name}: the typed text differs from the record's file")
    return LineRun(line.record, record["commit"], record["path"], line.line, line.expected, pauses, len(keystrokes),
                   answered, sum(o.status == "cancelled" for o in outcomes), late,
                   sum(o.status == "error" for o in outcomes))


async def warm_up(typist: Typist, line: TypedLine) -> float:
    """One unmeasured request at the end of the line above `line` (the file whole), then quiet: the engine has seen
    the file, as after working in it, and no cache holds an answer for the first pause. Returns milliseconds."""
    line_start = line.cursor - (len(line.text) - len(line.expected))
    answer = await typist.send(None, max(0, line_start - 1))
    outcome = await answer.outcome
    await typist.settle()
    return round(1000 * (outcome.received - answer.sent), 1)


def by_record(lines: list[TypedLine]) -> list[list[TypedLine]]:
    """The lines grouped by record, in order."""
    groups: dict[int, list[TypedLine]] = {}
    for line in lines:
        groups.setdefault(line.record, []).append(line)
    return list(groups.values())


async def type_record(typist: Typist, record: dict[str, Any], lines: list[TypedLine],
                      interval: float) -> tuple[list[LineRun], float]:
    """One record's file opened and warmed up, its lines typed in turn; the runs and the warm-up ms."""
    await typist.open(f"file:///bench/{record['path']}", record["after"])
    warm = await warm_up(typist, lines[0])
    runs = []
    for line in lines:
        run = await type_line(typist, line, record, interval)
        runs.append(run)
        print(f"  {typist.name:9s} {record['commit'][:10]}:{line.line + 1} "
              + " ".join(f"{p.kind} {p.latency_ms:.0f} ms{' exact' if p.exact else ''}" for p in run.pauses)
              + f" | answered {run.answered}/{run.keystrokes}", file=sys.stderr, flush=True)
    await typist.close_document()
    return runs, warm


async def type_lines(typist: Typist, lines: list[TypedLine], records: list[dict[str, Any]],
                     interval: float) -> tuple[list[LineRun], list[float]]:
    """All the lines into one engine: the runs and each file's warm-up ms."""
    runs: list[LineRun] = []
    warm: list[float] = []
    for group in by_record(lines):
        group_runs, group_warm = await type_record(typist, records[group[0].record], group, interval)
        runs.extend(group_runs)
        warm.append(group_warm)
    return runs, warm


# -- summary --------------------------------------------------------------------------------------------------------

def summarize(runs: list[LineRun]) -> dict[str, Any]:
    pauses = [p for r in runs for p in r.pauses]
    keystrokes = sum(r.keystrokes for r in runs)
    latencies = [p.latency_ms for p in pauses]
    out: dict[str, Any] = {
        "lines": len(runs), "pauses": len(pauses), "keystrokes": keystrokes,
        "answered": sum(r.answered for r in runs), "late": sum(r.late for r in runs),
        "cancelled": sum(r.cancelled for r in runs), "errors": sum(r.errors for r in runs),
        "keep_up": round(sum(r.answered for r in runs) / keystrokes, 4) if keystrokes else None,
        "pause_p50_ms": round(percentile(latencies, 0.5), 1) if latencies else None,
        "pause_p90_ms": round(percentile(latencies, 0.9), 1) if latencies else None,
        "exact": round(sum(p.exact for p in pauses) / len(pauses), 4) if pauses else None,
        "similar": round(sum(p.similar for p in pauses) / len(pauses), 4) if pauses else None,
        "similarity_mean": round(statistics.fmean(p.similarity for p in pauses), 4) if pauses else None,
        "pause_errors": sum(p.status == "error" for p in pauses),
    }
    for kind in PAUSE_KINDS:
        group = [p for p in pauses if p.kind == kind]
        if group:
            out[kind] = {"n": len(group), "p50_ms": round(percentile([p.latency_ms for p in group], 0.5), 1),
                         "p90_ms": round(percentile([p.latency_ms for p in group], 0.9), 1),
                         "exact": round(sum(p.exact for p in group) / len(group), 4),
                         "similar": round(sum(p.similar for p in group) / len(group), 4)}
    return out


TABLE_ROWS = (("lines", "lines"), ("pauses", "pauses"), ("pause p50 ms", "pause_p50_ms"),
              ("pause p90 ms", "pause_p90_ms"), ("line start p50 ms", ("line_start", "p50_ms")),
              ("mid-line p50 ms", ("mid_line", "p50_ms")), ("keep-up", "keep_up"),
              ("keystrokes answered / sent", None), ("exact at pauses", "exact"),
              ("similar at pauses (ratio ≥ 0.8)", "similar"), ("mean similarity", "similarity_mean"))


def _cell(summary: dict[str, Any], key: str | tuple[str, str] | None) -> str:
    if key is None:
        return f"{summary['answered']} / {summary['keystrokes']}"
    value = (summary.get(key[0]) or {}).get(key[1]) if isinstance(key, tuple) else summary.get(key)
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.0f}" if value >= 10 else f"{value:.3f}"


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    names = list(summaries)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, key in TABLE_ROWS:
        cells = [_cell(summaries[name], key) for name in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------------------------

def package_tabs() -> dict[str, str]:
    """`requests`' files (the pinned sdist of bench crossfile) under the URIs the typed records get: the project's
    other files, open beside the one being typed."""
    from bench.crossfile_sources import load_package_files

    return {f"file:///bench/{f.path}": f.text for f in load_package_files(stdlib=()) if f.package == "requests"}


async def _run(model: str, cache: Path | None, against: str | None, peer_config: LlamaVscodeConfig,
               lines: list[TypedLine], records: list[dict[str, Any]], interval: float, cross_file: int,
               log: Any) -> dict[str, tuple[list[LineRun], dict[str, Any]]]:
    """Record by record, each engine in turn (one busy at a time), so the shared machine's load drifts alike for
    all; per engine, its runs and what its server reported. With `cross_file` tokens, a second superpie server has
    crossFileContext on, and both have the project's other files open."""
    variants = {SUPERPIE: {}} if not cross_file else {
        SUPERPIE: {"crossFileContext": False}, CONTEXT: {"crossFileContext": True, "crossFileTokens": cross_file}}
    tabs = package_tabs() if cross_file else None
    servers = {name: await BenchServer.start(name, model=model, cache=cache, refresh="idle", log=log,
                                             settings=settings) for name, settings in variants.items()}
    peer = LlamaVscodeTypist(against, peer_config) if against else None
    typists: list[Typist] = [*(SuperpieTypist(s, name, tabs) for name, s in servers.items()), *([peer] if peer else [])]
    runs: dict[str, list[LineRun]] = {t.name: [] for t in typists}
    warm: dict[str, list[float]] = {t.name: [] for t in typists}
    out = {}
    try:
        for server in servers.values():
            await server.wait_ready()
        for group in by_record(lines):
            for typist in typists:
                group_runs, group_warm = await type_record(typist, records[group[0].record], group, interval)
                runs[typist.name].extend(group_runs)
                warm[typist.name].append(group_warm)
        for name, server in servers.items():
            state = (await server.stats())["server"]
            out[name] = (runs[name], {"warm_up_ms": warm[name], "counters": state.get("counters"),
                                      "rss_mb": state.get("rss_mb"), "settings": variants[name],
                                      "messages": server.client.messages})
    finally:
        for server in servers.values():
            await server.client.close()
        if peer:
            await peer.close()
    if peer:
        out[PEER] = (runs[PEER], {"url": against, "props": await asyncio.to_thread(peer.properties),
                                  "warm_up_ms": warm[PEER], "client": asdict(peer_config),
                                  "counters": asdict(peer.counters)})
    return out


def run_typing_bench(model: str = DEFAULT_MODEL, *, data: Path = DEFAULT_DATA, limit: int = DEFAULT_LIMIT,
                     against: str | None = None, json_out: Path | None = None, cache: Path | None = None,
                     interval_s: float = INTERVAL_S, peer_config: LlamaVscodeConfig | None = None,
                     cross_file: int = 0) -> dict[str, Any]:
    """Type the lines into superpie (and into the peer when `against` is a URL; and into a second superpie with
    `cross_file` tokens of cross-file context); print the table, write the JSON; returns the summary."""
    if limit < 1:
        raise ValueError("--limit must be at least 1")
    records = load_records(data)
    lines = plan_lines(records, limit)
    peer_config = peer_config or LlamaVscodeConfig()
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.NamedTemporaryFile("w", prefix="superpie-bench-typing-", suffix=".log", delete=False) as log:
        print(f"server logs: {log.name}", file=sys.stderr)
        results = asyncio.run(_run(model, cache, against, peer_config, lines, records, interval_s, cross_file, log))
    engines = {name: {"summary": summarize(runs), "server": info, "lines": [asdict(r) for r in runs]}
               for name, (runs, info) in results.items()}
    summary = {
        "model": model, "data": str(data), "limit": limit, "interval_ms": round(1000 * interval_s, 3),
        "pause_fraction": PAUSE_FRACTION, "similar_ratio": SIMILAR_RATIO, "superpie_settings": "server defaults",
        "cross_file_tokens": cross_file,
        "machine": machine_info(load_before),
        "wall_s": round(time.perf_counter() - t0, 1),
        "lines": [{"record": ln.record, "commit": records[ln.record]["commit"], "path": records[ln.record]["path"],
                   "line": ln.line, "text": ln.text, "mid_pause": ln.mid_pause} for ln in lines],
        "results": {name: e["summary"] for name, e in engines.items()},
        "engines": engines,
    }
    cpu = summary["machine"].get("cpu", "?")
    print(f"typing benchmark: {model}, {len(lines)} lines of {data.name}, one character every "
          f"{1000 * interval_s:.0f} ms, {cpu}")
    print(format_table(summary["results"]))
    path = json_out or DEFAULT_JSON
    save_results(summary, path)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = edits_parser("superpie bench typing", __doc__, DEFAULT_JSON, DEFAULT_LIMIT)
    parser._option_string_actions["--limit"].help = f"target lines to type (default {DEFAULT_LIMIT})"  # not records
    parser.add_argument("--against", metavar="URL", default=None,
                        help="a running llama-server (e.g. http://127.0.0.1:8012), driven as llama.vscode does")
    parser.add_argument("--interval-ms", type=float, default=1000 * INTERVAL_S, help="between keystrokes (120)")
    parser.add_argument("--debounce-ms", type=float, default=1000 * PEER_DEBOUNCE_S,
                        help="the peer client's debounce (150)")
    parser.add_argument("--cross-file", type=int, default=0, metavar="TOKENS",
                        help="also a server with crossFileContext on (crossFileTokens TOKENS), both with requests' "
                             "other files open (0: neither)")
    args = parser.parse_args(argv)
    if args.cross_file < 0:
        parser.error("--cross-file must be 0 or more")
    config = LlamaVscodeConfig(debounce_s=args.debounce_ms / 1000)
    run_typing_bench(args.model, data=args.data, limit=args.limit, against=args.against, json_out=args.json_out,
                     cache=args.cache, interval_s=args.interval_ms / 1000, peer_config=config,
                     cross_file=args.cross_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
