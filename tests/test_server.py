"""`superpie serve` end to end: a pytest-lsp client drives the server process over stdio with the tiny model.

The client keeps its own copy of each document and computes positions with Python's codecs (not the
server's conversion code), so a sync bug shows up as a digest mismatch in `superpie.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcContentModified,
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcRequestCancelled,
)
from pytest_lsp import ClientServerConfig, LanguageClient
from pytest_lsp.client import make_test_lsp_client

from inference.syntax.finish import repeated_suffix
from inference.syntax.languages import language_of
from inference.syntax.lexer import CodeState, advance
from lsp_server.completer import Completer
from lsp_server.completion import CompletionOptions
from kv_cache.document import WindowBudget
from tests.fixtures import cpython_text

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = [sys.executable, "-m", "lsp_server.cli"]
LONG_PROMPT_CANDIDATES = [  # random-weight model, inside an open string: these decoded for hundreds of tokens
    'for printdef """',
    "in 1'''",
    'a a class \n = (: + , ( x classx = """',
    'ina )importdoc = """',
]
FUNCTION = "def average(values):\n    total = sum(values)\n    return "


# -- the client side -----------------------------------------------------------------------------------------------

def capabilities(*, inline: bool = True, utf8: bool = False, progress: bool = True,
                 configuration: bool = True) -> types.ClientCapabilities:
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=["utf-8", "utf-16"] if utf8 else ["utf-16"]),
        window=types.WindowClientCapabilities(work_done_progress=progress),
        workspace=types.WorkspaceClientCapabilities(configuration=configuration),
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities() if inline else None,
            completion=types.CompletionClientCapabilities(),
            hover=types.HoverClientCapabilities(content_format=[types.MarkupKind.Markdown]),
            synchronization=types.TextDocumentSyncClientCapabilities(did_save=True)),
    )


async def start_server(gguf: Path, cache: Path, *, caps: types.ClientCapabilities | None = None,
                       init_options: Any = None, configuration: dict | None = None, model: str | None = None,
                       args: tuple[str, ...] = (), wait: bool = True) -> LanguageClient:
    command = [*SERVER, "--cache-dir", str(cache), "serve", "--model", model or str(gguf), "--no-persist", *args]
    client = await ClientServerConfig(server_command=command).start()
    if configuration is not None:
        client.set_configuration(configuration, section="superpie")
    client.init_result = await client.initialize_session(types.InitializeParams(  # type: ignore[attr-defined]
        capabilities=caps or capabilities(), initialization_options=init_options))
    if wait:
        await wait_for_model(client)
    return client


async def stop_server(client: LanguageClient) -> None:
    await client.shutdown_session()
    await client.stop()


async def live_stats(client: LanguageClient, uri: str | None = None) -> dict[str, Any]:
    """superpie.stats as it answers now: while a model job runs or waits, without the cache part."""
    args = [uri] if uri else None
    return await client.workspace_execute_command_async(types.ExecuteCommandParams("superpie.stats", args))


async def stats(client: LanguageClient, uri: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """superpie.stats once no model job runs or waits, so the cache part is there (it is null until then)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await live_stats(client, uri)
        if result["cache"] is not None or result["server"]["model_state"] != "ready":
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"the model was still busy after {timeout:.0f} s: {result['server']['worker']}")
        await asyncio.sleep(0.02)


async def until_decoding(client: LanguageClient, uri: str, request: asyncio.Future, steps: int = 3,
                         timeout: float = 60) -> None:
    """Until the server reports that the suggestion in flight for `uri` has taken `steps` decode steps: an
    event from the server, not a guess with a clock. Fails if the request was answered first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if request.done():
            raise AssertionError("the request was answered before its decode was seen running: the prompt "
                                 "is too short for this test")
        decoding = (await live_stats(client))["server"]["worker"]["decoding"]
        if decoding.get(uri, 0) >= steps:
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"{uri} never decoded {steps} steps")


async def until_prefetch(client: LanguageClient, uri: str, state: str, steps: int = 0,
                         timeout: float = 60) -> dict[str, Any]:
    """Until the server reports its prefetch for `uri` in `state` (and `steps` decode steps into it): an event
    from the server. Fails if the prefetch ends in another state first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prefetch = (await live_stats(client))["server"]["prefetch"]
        if prefetch is not None and prefetch["uri"] == uri:
            if prefetch["state"] == state and prefetch["steps"] >= steps:
                return prefetch
            if prefetch["state"] not in ("queued", "running"):
                raise AssertionError(f"the prefetch ended {prefetch['state']}, not {state}: {prefetch}")
        await asyncio.sleep(0.005)
    raise TimeoutError(f"no prefetch for {uri} was seen {state}")


async def wait_for_model(client: LanguageClient, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = (await stats(client))["server"]["model_state"]
        if state in ("ready", "failed"):
            return state
        await asyncio.sleep(0.05)
    raise TimeoutError("the model did not load")


def utf16_position(text: str, offset: int, encoding: str = "utf-16") -> types.Position:
    before = text[:offset].replace("\r\n", "\n").replace("\r", "\n")
    column = before[before.rfind("\n") + 1:]
    width = len(column.encode("utf-16-le")) // 2 if encoding == "utf-16" else len(column.encode("utf-8"))
    return types.Position(before.count("\n"), width)


class Doc:
    """The client's copy of one open document."""

    def __init__(self, client: LanguageClient, uri: str, text: str, language: str = "python",
                 encoding: str = "utf-16") -> None:
        self.client, self.uri, self.text, self.version, self.encoding = client, uri, text, 1, encoding
        client.text_document_did_open(types.DidOpenTextDocumentParams(
            types.TextDocumentItem(uri, language, self.version, text)))

    def pos(self, offset: int) -> types.Position:
        return utf16_position(self.text, offset, self.encoding)

    def edit(self, start: int, end: int, new: str) -> None:
        rng = types.Range(self.pos(start), self.pos(end))
        self.text = self.text[:start] + new + self.text[end:]
        self.version += 1
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(version=self.version, uri=self.uri),
            [types.TextDocumentContentChangePartial(range=rng, text=new)]))

    def inline_params(self, offset: int | None = None, invoked: bool = True) -> types.InlineCompletionParams:
        kind = types.InlineCompletionTriggerKind.Invoked if invoked else types.InlineCompletionTriggerKind.Automatic
        return types.InlineCompletionParams(types.InlineCompletionContext(kind), types.TextDocumentIdentifier(self.uri),
                                            self.pos(len(self.text) if offset is None else offset))

    async def inline(self, offset: int | None = None, invoked: bool = True) -> list[str]:
        result = await self.client.text_document_inline_completion_async(self.inline_params(offset, invoked))
        return [item.insert_text for item in result.items]

    async def hover(self, offset: int | None = None) -> types.Hover | None:
        return await self.client.text_document_hover_async(types.HoverParams(
            types.TextDocumentIdentifier(self.uri), self.pos(len(self.text) if offset is None else offset)))

    async def assert_in_sync(self) -> None:
        digest = hashlib.sha256(self.text.encode()).hexdigest()
        doc = (await stats(self.client, self.uri))["document"]
        assert doc["version"] == self.version
        assert doc["sha256"] == digest, "the server's copy differs from the editor's"
        assert doc["cache_sha256"] == digest, "the buffer cache's text differs from the editor's"


def send_raw_request(client: LanguageClient, msg_id: str, method: str, params: Any) -> asyncio.Future:
    """A request the typed client API would refuse to build; the answer resolves the returned future."""
    from concurrent.futures import Future

    future: Future = Future()
    client.protocol._request_futures[msg_id] = future
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return asyncio.wrap_future(future)


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_prompt(tiny_model) -> str:
    return find_long_prompt(tiny_model)


@pytest.fixture(scope="module")
def answered(tiny_model) -> str:
    """A document whose end the tiny model answers with a suggestion of a few characters. What a random-weight
    model says differs with the CPU's rounding, so the prompt is found in-process, on this machine: FUNCTION
    first, then the first lines of a fixture file."""
    completer = Completer(tiny_model)
    lines = cpython_text("textwrap.py").splitlines(keepends=True)
    candidates = [FUNCTION, *("".join(lines[:n]) + lines[n][:len(lines[n]) - len(lines[n].lstrip())]
                              for n in range(20, 220, 10))]
    for text in candidates:
        completer.open("probe", text)
        outcome = completer.complete("probe", len(text), CompletionOptions(drafts=3))
        if outcome.suggestions and len(outcome.suggestions[0].text.strip()) >= 3:
            return text
    raise AssertionError("the tiny model answers none of the candidate prompts")


def _long_prompt_candidates() -> Iterator[str]:
    """The known candidates for a long decode, then a seeded search (the completer's stopping rules change as the
    project grows)."""
    yield from LONG_PROMPT_CANDIDATES
    rng = random.Random(1)
    words = ["def", "x", "return", "(", ")", ":", "\n", "    ", "for", "in", "1", "+", "=", "a", "#", "import", "."]
    for _ in range(400):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(0, 10))) + rng.choice(['x = """', "'''"])


def _decodes_long(completer: Completer, text: str) -> tuple[bool, list[str]]:
    """Whether the tiny model decodes for 300 tokens at the end of `text` (multi-line scope), and its drafts."""
    completer.open("probe", text)
    outcome = completer.complete("probe", len(text), CompletionOptions(max_tokens=1024, scope="multi"))
    return outcome.timings.get("generated_tokens", 0) >= 300, [s.text for s in outcome.suggestions]


def find_long_prompt(model) -> str:
    """A prompt on which the tiny model decodes for a while (multi-line scope), found in-process."""
    completer = Completer(model)
    for text in _long_prompt_candidates():
        if _decodes_long(completer, text)[0]:
            return text
    raise AssertionError("no prompt makes the tiny model decode for 300 tokens any more: the tests of cancellation "
                         "mid-decode need one")


@pytest.fixture(scope="module")
def long_prefetch_prompt(tiny_model) -> str:
    """A prompt whose best suggestion, once accepted, is followed by a long decode: a prefetch that runs a while."""
    completer = Completer(tiny_model)
    for text in _long_prompt_candidates():
        drafts = _decodes_long(completer, text)[1]
        if drafts and _decodes_long(completer, text + drafts[0])[0]:
            return text
    raise AssertionError("no prompt is followed, once its suggestion is accepted, by a decode of 300 tokens: the "
                         "test of a request arriving during a prefetch needs one")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_gguf, tiny_cache):
    client = await start_server(tiny_gguf, tiny_cache, configuration={})
    yield client
    await stop_server(client)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slow_client(tiny_gguf, tiny_cache):
    """Multi-line suggestions up to 1024 tokens: with `long_prompt`, a decode lasts about a second. No prefetch:
    these tests read the timings of the last model call, which must be their request's."""
    client = await start_server(tiny_gguf, tiny_cache, init_options={"scope": "multi", "maxTokens": 1024,
                                                                     "prefetch": False})
    yield client
    await stop_server(client)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slow_prefetch_client(tiny_gguf, tiny_cache):
    """As `slow_client`, with the prefetch on (the default)."""
    client = await start_server(tiny_gguf, tiny_cache, init_options={"scope": "multi", "maxTokens": 1024})
    yield client
    await stop_server(client)


# -- capabilities --------------------------------------------------------------------------------------------------

async def test_advertises_exactly_what_is_implemented(client):
    result = client.init_result.capabilities
    assert result.position_encoding == "utf-16"
    sync = result.text_document_sync
    assert sync.open_close and sync.change == types.TextDocumentSyncKind.Incremental and sync.save.include_text
    assert result.inline_completion_provider is not None
    assert result.hover_provider
    assert result.completion_provider is None  # the client shows inline completions: no duplicate popup
    assert set(result.execute_command_provider.commands) == {"superpie.stats", "superpie.refresh"}
    unimplemented = ["definition_provider", "references_provider", "rename_provider", "signature_help_provider",
                     "code_action_provider", "document_symbol_provider", "workspace", "diagnostic_provider",
                     "inline_value_provider", "semantic_tokens_provider", "folding_range_provider"]
    assert [name for name in unimplemented if getattr(result, name)] == []


async def test_model_load_reports_progress(client):
    begins = [v for values in client.progress_reports.values() for v in values
              if isinstance(v, types.WorkDoneProgressBegin)]
    ends = [v for values in client.progress_reports.values() for v in values
            if isinstance(v, types.WorkDoneProgressEnd)]
    reports = [v.message for values in client.progress_reports.values() for v in values
               if isinstance(v, types.WorkDoneProgressReport)]
    assert any(b.title == "superpie: loading model" for b in begins)
    assert any(m.startswith("loading") for m in reports)  # the stage (fetching / converting / loading)
    assert any(e.message.startswith("ready") for e in ends)


async def test_log_messages_reach_the_client(client):
    assert any("ready" in m.message for m in client.log_messages)


# -- inline completion ---------------------------------------------------------------------------------------------

async def test_inline_completion_is_the_completers_drafts(client, tiny_model, answered):
    doc = Doc(client, "file:///inline.py", answered)
    items = await doc.inline()
    expected = Completer(tiny_model)
    expected.open("x", answered)
    outcome = expected.complete("x", len(answered), CompletionOptions(drafts=3))
    assert items == [s.text for s in outcome.suggestions][:3]
    assert items


# A Go, a Rust and a TypeScript file, each with a cursor inside a call whose closer the suffix has.
OTHER_LANGUAGES = [
    ("go", "file:///calc/sum.go", "package calc\n\nfunc Sum(xs []int) int {\n\ttotal := 0\n"
     "\tfor _, x := range xs {\n\t\ttotal += x\n\t}\n\treturn clamp(", ")\n}\n"),
    ("rust", "file:///src/sum.rs", "pub fn sum<'a>(xs: &'a [i32]) -> i32 {\n    let total: i32 = xs.iter().sum();\n"
     "    clamp(", ")\n}\n"),
    ("typescript", "file:///src/sum.ts", "export function sum(xs: number[]): number {\n"
     "  const total = xs.reduce((a, b) => a + b, 0);\n  return clamp(", ");\n}\n"),
]


@pytest.mark.parametrize(("language", "uri", "prefix", "suffix"), OTHER_LANGUAGES)
async def test_go_rust_and_typescript_get_their_own_syntax_rules(client, tiny_model, language, uri, prefix, suffix):
    doc = Doc(client, uri, prefix + suffix, language)
    items = await doc.inline(len(prefix))
    assert (await stats(client, uri))["document"]["syntax"] == f"{language} (tree-sitter)"
    expected = Completer(tiny_model)
    expected.open(uri, prefix + suffix, language)
    outcome = expected.complete(uri, len(prefix), CompletionOptions(drafts=3))
    assert items == [s.text for s in outcome.suggestions][:3]
    for item in items:  # syntax-stopped: one line, nothing of the suffix written again, the call left to it
        assert "\n" not in item and not repeated_suffix(item, prefix, suffix, language)
        assert advance(language_of(language).lexicon, item, CodeState("("), floor=1)[1] is None


async def test_automatic_trigger_returns_the_configured_number_of_drafts(client):
    doc = Doc(client, "file:///automatic.py", FUNCTION)
    assert len(await doc.inline(invoked=False)) <= 1


async def test_typing_the_start_of_a_suggestion_answers_without_the_model(client, answered):
    doc = Doc(client, "file:///typed.py", answered)
    first = (await doc.inline())[0]
    before = await stats(client)
    typed = first[:2] if len(first) > 2 else first[:1]
    cursor = len(doc.text)
    doc.edit(cursor, cursor, typed)
    rest = await doc.inline()
    after = await stats(client)
    assert rest[0] == first[len(typed):]
    hits = [r["server"]["counters"].get("typed_through", 0) for r in (before, after)]
    assert hits[1] == hits[0] + 1
    assert after["cache"]["completions"] == before["cache"]["completions"]  # the model did not run


async def test_hover_previews_the_latest_drafts_with_scores(client, answered):
    doc = Doc(client, "file:///hover.py", answered)
    items = await doc.inline()
    hover = await doc.hover()
    assert hover.contents.kind == types.MarkupKind.Markdown
    assert "score" in hover.contents.value and items[0] in hover.contents.value
    assert hover.range.start == doc.pos(len(doc.text))


async def test_hover_computes_drafts_when_none_are_shown(client, answered):
    doc = Doc(client, "file:///hover2.py", answered)
    hover = await doc.hover()
    assert hover is not None and "draft" in hover.contents.value


async def test_requests_for_unknown_documents_or_impossible_positions_are_invalid_params(client):
    doc = Doc(client, "file:///bounds.py", "x = 1\n")
    with pytest.raises(JsonRpcInvalidParams):
        await client.text_document_inline_completion_async(types.InlineCompletionParams(
            types.InlineCompletionContext(types.InlineCompletionTriggerKind.Invoked),
            types.TextDocumentIdentifier("file:///never-opened.py"), types.Position(0, 0)))
    with pytest.raises(JsonRpcInvalidParams):
        await client.text_document_hover_async(types.HoverParams(types.TextDocumentIdentifier(doc.uri),
                                                                 types.Position(40, 0)))
    past_line_end = await client.text_document_inline_completion_async(types.InlineCompletionParams(
        types.InlineCompletionContext(types.InlineCompletionTriggerKind.Invoked),
        types.TextDocumentIdentifier(doc.uri), types.Position(0, 500)))  # clamps to the line end (LSP spec)
    assert isinstance(past_line_end, types.InlineCompletionList)


# -- prefetch ------------------------------------------------------------------------------------------------------

async def test_accepting_the_suggestion_is_answered_from_the_prefetch(client, answered):
    doc = Doc(client, "file:///prefetch.py", answered)
    first = (await doc.inline())[0]
    await until_prefetch(client, doc.uri, "ready")
    before = (await stats(client))["server"]["counters"]
    cursor = len(doc.text)
    doc.edit(cursor, cursor, first)  # the editor accepts the suggestion, then asks at the cursor after it
    assert isinstance(await doc.inline(), list)
    after = (await stats(client))["server"]["counters"]
    assert after.get("prefetch_hits", 0) == before.get("prefetch_hits", 0) + 1
    assert after.get("completions", 0) == before.get("completions", 0)  # the model did not run for it


@pytest.mark.parametrize("edit", ["other text", "other cursor"])
async def test_anything_but_accepting_the_suggestion_misses_the_prefetch(client, answered, edit):
    doc = Doc(client, f"file:///prefetch-miss-{edit.replace(' ', '-')}.py", answered)
    items = await doc.inline()
    await until_prefetch(client, doc.uri, "ready")
    before = (await stats(client))["server"]["counters"]
    inserted = "~" + items[0] if edit == "other text" else items[0]
    assert not any(item.startswith(inserted) for item in items[1:])  # no typed-through answer either
    cursor = len(doc.text)
    doc.edit(cursor, cursor, inserted)
    await doc.inline(len(doc.text) - (edit == "other cursor"))
    after = (await stats(client))["server"]["counters"]
    assert after.get("prefetch_hits", 0) == before.get("prefetch_hits", 0)
    assert after.get("completions", 0) == before.get("completions", 0) + 1  # the model answered


async def test_a_request_stops_a_running_prefetch_at_its_next_step(slow_prefetch_client, long_prefetch_prompt):
    client = slow_prefetch_client
    doc = Doc(client, "file:///prefetch-long.py", long_prefetch_prompt)
    other = Doc(client, "file:///prefetch-other.py", "x = 1\n")
    assert await doc.inline()
    before = (await live_stats(client))["server"]["counters"]
    await until_prefetch(client, doc.uri, "running", steps=3)
    await other.hover()  # nothing shown there: the model computes the drafts, and the prefetch yields
    after = await stats(client)
    prefetch = after["server"]["prefetch"]
    assert prefetch["uri"] == doc.uri and prefetch["state"] == "yielded", prefetch
    assert prefetch["steps_after_stop"] <= 1, prefetch  # at most the step in progress delayed the hover
    counters = after["server"]["counters"]
    assert counters.get("prefetch_yielded", 0) == before.get("prefetch_yielded", 0) + 1


# -- text sync -----------------------------------------------------------------------------------------------------

async def test_utf16_edits_with_emoji_cjk_and_crlf_stay_in_sync(client):
    doc = Doc(client, "file:///unicode.py", "# 😀 héllo\r\nname = '中文'\r\nx = 1\r\n")
    doc.edit(2, 3, "🎉🎉")  # replace an emoji (2 UTF-16 units) with two
    cjk = doc.text.index("中")
    doc.edit(cjk, cjk + 2, "日本語😀")
    crlf = doc.text.index("\r\n")
    doc.edit(crlf, crlf + 2, "\n")  # a CRLF becomes LF
    doc.edit(len(doc.text), len(doc.text), "y = '𝔘'\r\nz")
    doc.edit(doc.text.index("y"), doc.text.index("y") + 1, "")
    await doc.assert_in_sync()
    assert await doc.inline() is not None


async def test_utf8_positions_when_the_client_offers_them(tiny_gguf, tiny_cache):
    client = await start_server(tiny_gguf, tiny_cache, caps=capabilities(utf8=True))
    try:
        assert client.init_result.capabilities.position_encoding == "utf-8"
        doc = Doc(client, "file:///utf8.py", "s = 'é😀中'\nt = 2\n", encoding="utf-8")
        doc.edit(doc.text.index("😀"), doc.text.index("😀") + 1, "ü")
        doc.edit(doc.text.index("t"), doc.text.index("t") + 1, "tt")
        await doc.assert_in_sync()
    finally:
        await stop_server(client)


async def test_did_save_with_different_text_resyncs(client):
    doc = Doc(client, "file:///save.py", "a = 1\n")
    doc.text, doc.version = "b = 2\nc = 3\n", doc.version  # the editor's copy, which the server never saw
    client.text_document_did_save(types.DidSaveTextDocumentParams(types.TextDocumentIdentifier(doc.uri), doc.text))
    await doc.assert_in_sync()


async def test_did_close_forgets_the_document(client):
    doc = Doc(client, "file:///close.py", "a = 1\n")
    client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(doc.uri)))
    with pytest.raises(JsonRpcInvalidParams):
        await doc.inline()
    assert (await stats(client, doc.uri))["document"] is None


async def test_versions_are_tracked(client):
    doc = Doc(client, "file:///versions.py", "a\n")
    for i in range(5):
        doc.edit(0, 0, str(i))
    assert (await stats(client))["server"]["versions"][doc.uri] == 6


def _send_change(doc: Doc, version: int, change: types.TextDocumentContentChangeEvent) -> None:
    doc.client.text_document_did_change(types.DidChangeTextDocumentParams(
        types.VersionedTextDocumentIdentifier(version=version, uri=doc.uri), [change]))


async def test_a_change_older_than_the_document_is_ignored(client):
    doc = Doc(client, "file:///stale-version.py", "a = 1\n")
    doc.edit(0, 0, "# one\n")
    doc.edit(0, 0, "# two\n")  # version 3
    _send_change(doc, 2, types.TextDocumentContentChangePartial(
        range=types.Range(doc.pos(0), doc.pos(0)), text="# late\n"))
    await doc.assert_in_sync()  # neither the text nor the version moved back
    assert (await live_stats(client))["server"]["versions"][doc.uri] == 3


async def test_a_full_text_change_resyncs_whatever_its_version(client):
    doc = Doc(client, "file:///stale-full.py", "a = 1\n")
    doc.edit(0, 0, "# one\n")
    doc.edit(0, 0, "# two\n")  # version 3
    doc.text = "b = 2\n"  # the editor's text, sent whole with an older version
    _send_change(doc, 2, types.TextDocumentContentChangeWholeDocument(text=doc.text))
    doc.version = 2
    await doc.assert_in_sync()


async def test_notifications_leave_no_future_behind(client):
    """pygls 2.1.1 kept one future per notification with a generator or async handler in `_request_futures`
    (+200 after 200 didChange). Text sync and configuration changes both go through such handlers."""
    doc = Doc(client, "file:///leak.py", "")
    before = (await stats(client))["server"]["pending_futures"]
    for i in range(200):
        doc.edit(len(doc.text), len(doc.text), "x")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    await doc.assert_in_sync()
    after = (await stats(client))["server"]["pending_futures"]
    assert after <= before + 1, f"{after - before} futures left behind by 200 didChange + 200 didChangeConfiguration"


# -- commands ------------------------------------------------------------------------------------------------------

async def test_stats_report_cache_sizes_reuse_and_latencies(client):
    doc = Doc(client, "file:///stats.py", FUNCTION)
    await doc.inline()
    result = await stats(client)
    assert result["cache"]["cached_tokens"] > 0 and result["cache"]["cache_bytes"] > 0
    assert "reuse_ratio" in result["cache"] and result["cache"]["latency_p50_ms"] is not None
    assert result["server"]["latency"]["inline"]["n"] >= 1
    assert result["server"]["rss_mb"] > 0


async def test_refresh_re_encodes_stale_rows(client):
    doc = Doc(client, "file:///refresh.py", FUNCTION * 4)
    await doc.inline(offset=10)  # builds the rows
    doc.edit(0, 0, "import math\n")  # later rows go stale
    result = await client.workspace_execute_command_async(types.ExecuteCommandParams("superpie.refresh"))
    assert result["stale_rows"] == 0 and result["steps"] >= 1


async def test_unknown_command_is_an_error(client):
    with pytest.raises(JsonRpcException):
        await client.workspace_execute_command_async(types.ExecuteCommandParams("superpie.nothing"))


# -- lifecycle: cancellation and stale results ---------------------------------------------------------------------

async def test_cancel_request_stops_the_generation_mid_decode(slow_client, long_prompt):
    full_tokens = await _full_decode_tokens(slow_client, long_prompt)
    doc = Doc(slow_client, "file:///cancel.py", long_prompt)
    await doc.assert_in_sync()
    before = (await stats(slow_client))["server"]["counters"]
    pending = asyncio.ensure_future(slow_client.protocol.send_request_async(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, doc.inline_params(), msg_id="cancel-me"))
    await until_decoding(slow_client, doc.uri, pending)
    slow_client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="cancel-me"))
    with pytest.raises(JsonRpcRequestCancelled):
        await pending
    after = await stats(slow_client)  # once the worker is free: the decode has stopped
    last = after["cache"]["recent_timings"][-1]
    assert last["cancelled"] == 1.0 and last["generated_tokens"] < full_tokens, (last, full_tokens)
    assert after["server"]["counters"].get("cancelled_by_client", 0) == before.get("cancelled_by_client", 0) + 1


async def test_an_edit_cancels_the_generation_and_drops_the_stale_result(slow_client, long_prompt):
    doc = Doc(slow_client, "file:///stale.py", long_prompt)
    before = (await stats(slow_client))["server"]["counters"]
    pending = asyncio.ensure_future(doc.inline())
    await until_decoding(slow_client, doc.uri, pending)
    doc.edit(0, 0, "# edited\n")
    with pytest.raises(JsonRpcException) as dropped:
        await pending
    assert dropped.value.code == JsonRpcContentModified.CODE
    after = await stats(slow_client)
    counters = after["server"]["counters"]
    assert counters.get("stale_dropped", 0) == before.get("stale_dropped", 0) + 1
    assert counters.get("cancelled_by_edit", 0) == before.get("cancelled_by_edit", 0) + 1
    assert after["cache"]["recent_timings"][-1]["cancelled"] == 1.0
    await doc.assert_in_sync()


async def test_a_newer_request_supersedes_the_running_one(slow_client, long_prompt):
    doc = Doc(slow_client, "file:///supersede.py", long_prompt)
    before = (await stats(slow_client))["server"]["counters"]
    first = asyncio.ensure_future(doc.inline())
    await until_decoding(slow_client, doc.uri, first)
    second = asyncio.ensure_future(doc.inline(offset=len(long_prompt) - 3))
    assert await first == []  # answered at once, empty: its decode was stopped
    assert isinstance(await second, list)
    counters = (await stats(slow_client))["server"]["counters"]
    assert counters.get("superseded", 0) == before.get("superseded", 0) + 1


async def test_typing_what_the_decode_writes_is_followed_without_a_second_decode(slow_client, long_prompt):
    """The editor's order at a keystroke: cancel the request in flight, send the keystroke, ask at the new cursor.
    When the keystroke is the first character the decode in flight writes, that decode goes on and the new request
    gets the rest of its suggestion: no second decode."""
    reference = Doc(slow_client, "file:///follow-reference.py", long_prompt)
    whole = (await reference.inline(invoked=False))[0]  # what this machine's tiny model writes there
    assert len(whole) > 1
    doc = Doc(slow_client, "file:///follow.py", long_prompt)
    before = await stats(slow_client)
    pending = asyncio.ensure_future(slow_client.protocol.send_request_async(
        types.TEXT_DOCUMENT_INLINE_COMPLETION, doc.inline_params(invoked=False), msg_id="follow-me"))
    await until_decoding(slow_client, doc.uri, pending)
    slow_client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id="follow-me"))
    doc.edit(len(doc.text), len(doc.text), whole[0])
    assert await doc.inline(invoked=False) == [whole[1:]]
    with pytest.raises(JsonRpcRequestCancelled):
        await pending
    after = await stats(slow_client)
    counters, was = after["server"]["counters"], before["server"]["counters"]
    for name in ("followed", "followed_edits"):
        assert counters.get(name, 0) == was.get(name, 0) + 1, (name, counters)
    assert counters.get("cancelled_by_client", 0) == was.get("cancelled_by_client", 0)
    assert after["cache"]["calls"] == before["cache"]["calls"] + 1  # the one decode served both requests
    await doc.assert_in_sync()


async def test_typing_past_the_decode_stops_it_and_decodes_at_the_new_cursor(slow_client, long_prompt):
    """A keystroke the decode in flight does not write: the engine stops that decode at its next step (its output can
    no longer start with the typed text), and the request at the new cursor gets a decode of its own. Whether the
    request arrives before that stop or after it is a race: both must give the same answer."""
    reference = Doc(slow_client, "file:///past-reference.py", long_prompt)
    whole = (await reference.inline(invoked=False))[0]
    other = "@" if whole.startswith("#") else "#"
    typed = Doc(slow_client, "file:///past-typed.py", long_prompt + other)
    expected = await typed.inline(invoked=False)  # what a fresh decode there answers
    doc = Doc(slow_client, "file:///past.py", long_prompt)
    before = await stats(slow_client)
    pending = asyncio.ensure_future(doc.inline(invoked=False))
    await until_decoding(slow_client, doc.uri, pending)
    doc.edit(len(doc.text), len(doc.text), other)
    assert await doc.inline(invoked=False) == expected
    with pytest.raises(JsonRpcException) as dropped:
        await pending
    assert dropped.value.code == JsonRpcContentModified.CODE
    after = await stats(slow_client)
    counters, was = after["server"]["counters"], before["server"]["counters"]
    assert counters.get("followed_edits", 0) == was.get("followed_edits", 0) + 1  # the keystroke was followed...
    assert counters.get("completions", 0) == was.get("completions", 0) + 1  # ...and a new decode answered
    # (the request joined the stopped decode and counted `typed_past`, or came after it had settled)
    first, second = after["cache"]["recent_timings"][-2:]
    assert first["cancelled"] == 1.0 and second["cancelled"] == 0.0
    assert after["cache"]["calls"] == before["cache"]["calls"] + 2


async def test_hover_is_answered_while_the_model_decodes(slow_client, long_prompt):
    doc = Doc(slow_client, "file:///busy.py", long_prompt)
    other = Doc(slow_client, "file:///other.py", "x = 1\n")
    pending = asyncio.ensure_future(doc.inline())
    await until_decoding(slow_client, doc.uri, pending)
    assert await other.hover() is None  # nothing shown there, and the worker is busy: no waiting for it
    # answered while the decode still runs: the hover did not queue behind it
    assert not pending.done() and doc.uri in (await live_stats(slow_client))["server"]["worker"]["decoding"]
    await pending


async def _full_decode_tokens(client: LanguageClient, prompt: str) -> float:
    """How many tokens the server decodes for `prompt` when nothing stops it (on this machine)."""
    doc = Doc(client, f"file:///full-{time.monotonic_ns()}.py", prompt)
    await doc.inline()
    return (await stats(client))["cache"]["recent_timings"][-1]["generated_tokens"]


async def until_encoded(client: LanguageClient, name: str, timeout: float = 60) -> list[Any]:
    """The "superpie: encoding" progress of the file `name`, once it has ended (the idle steps built its window)."""
    deadline = time.monotonic() + timeout
    while True:
        for values in client.progress_reports.values():
            begin = values[0] if values else None  # a token the server created but has not begun yet
            if isinstance(begin, types.WorkDoneProgressBegin) and begin.title == "superpie: encoding" and \
                    (begin.message or "").startswith(name + ":") and isinstance(values[-1], types.WorkDoneProgressEnd):
                return values
        assert time.monotonic() < deadline, f"no finished encoding progress for {name}: {client.progress_reports}"
        await asyncio.sleep(0.02)


async def test_large_buffer_encode_reports_progress(client):
    body = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400))
    doc = Doc(client, "file:///large.py", body)
    await doc.inline()
    reports = await until_encoded(client, "large.py")
    assert any(isinstance(v, types.WorkDoneProgressReport) and v.message.endswith("%") for v in reports)


async def test_a_cold_request_answers_from_a_short_window_and_idle_steps_build_the_rest(client):
    """The first request in a large unencoded document encodes only the tokens before its cursor that
    WindowBudget.first allows (not the 2,048-token window); idle work then builds the whole window."""
    body = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(600))
    doc = Doc(client, "file:///cold.py", body)
    assert await doc.inline(invoked=False) is not None
    result = await stats(client, doc.uri)
    built = [t["window_tokens"] for t in result["cache"]["recent_timings"]]  # the request's, then its prefetch's
    assert 0 < max(built) <= WindowBudget().first + 2  # the marker, the token the cursor splits
    assert doc.uri in result["cache"]["encoding"]  # superpie.stats says how far the window is
    await until_encoded(client, "cold.py")  # polling superpie.stats instead would hold the idle steps off
    cache = (await stats(client, doc.uri))["cache"]
    assert doc.uri not in cache["encoding"]
    assert cache["cached_tokens"] > WindowBudget().prefix  # all of the window, far more than the request encoded


# -- completion items for clients without inline completions -------------------------------------------------------

async def test_completion_items_for_clients_without_inline_support(tiny_gguf, tiny_cache, answered):
    client = await start_server(tiny_gguf, tiny_cache, caps=capabilities(inline=False))
    try:
        assert client.init_result.capabilities.completion_provider is not None
        doc = Doc(client, "file:///popup.py", answered)
        result = await client.text_document_completion_async(types.CompletionParams(
            types.TextDocumentIdentifier(doc.uri), doc.pos(len(doc.text))))
        assert result.is_incomplete and result.items
        item = result.items[0]
        assert item.text_edit.range.start == doc.pos(len(doc.text))
        assert item.text_edit.new_text and "score" in item.detail
    finally:
        await stop_server(client)


# -- settings ------------------------------------------------------------------------------------------------------

async def test_initialization_options_set_the_settings(tiny_gguf, tiny_cache):
    client = await start_server(tiny_gguf, tiny_cache, init_options={"superpie": {"drafts": 2, "maxTokens": 7,
                                                                                  "cacheMode": "full"}})
    try:
        result = await stats(client)
        assert result["server"]["settings"]["drafts"] == 2 and result["server"]["settings"]["maxTokens"] == 7
        assert result["cache"]["cache_mode"] == "full"
    finally:
        await stop_server(client)


async def test_draft_method_round_trips_through_initialization_options_and_configuration(tiny_gguf, tiny_cache):
    """initializationOptions set it, a pulled workspace/configuration changes it, a bad value keeps the last one."""
    client = await start_server(tiny_gguf, tiny_cache, init_options={"superpie": {"draftMethod": "superposed"}})
    try:
        assert (await stats(client))["server"]["settings"]["draftMethod"] == "superposed"
        client.set_configuration({"draftMethod": "sampled"}, section="superpie")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
        await _settle(client, lambda r: r["server"]["settings"]["draftMethod"] == "sampled")
        client.set_configuration({"draftMethod": "batched"}, section="superpie")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
        await _settle(client, lambda r: any("draftMethod" in m.message for m in client.messages))
        assert (await stats(client))["server"]["settings"]["draftMethod"] == "superposed"
    finally:
        await stop_server(client)


async def test_cross_file_context_is_placed_when_the_setting_is_on_and_not_after_it_is_turned_off(tiny_gguf,
                                                                                                   tiny_cache,
                                                                                                   tiny_model):
    """Two open files: the completion in main.py places the chunks of shapes.py that define the names it uses,
    as the in-process completer does for the same requests; turned off by workspace/configuration, none."""
    from tests.test_crossfile import CURSOR, MAIN, MAIN_URI, SHAPES, SHAPES_URI

    client = await start_server(tiny_gguf, tiny_cache, init_options={
        "superpie": {"crossFileContext": True, "crossFileTokens": 256}})
    try:
        shapes, main = Doc(client, SHAPES_URI, SHAPES), Doc(client, MAIN_URI, MAIN)
        await shapes.inline()  # encodes shapes.py's rows (a request does not wait for idle work)
        await main.inline(CURSOR)
        placed = (await stats(client))["cache"]["recent_timings"]
        expected = Completer(tiny_model)
        expected.open(SHAPES_URI, SHAPES)
        expected.open(MAIN_URI, MAIN)
        options = CompletionOptions(cross_file_tokens=256)
        expected.complete(SHAPES_URI, len(SHAPES), options)
        want = expected.complete(MAIN_URI, CURSOR, options).timings["cross_file_tokens"]
        assert want > 0 and any(t.get("cross_file_tokens") == want for t in placed)
        client.set_configuration({"crossFileContext": False}, section="superpie")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
        settled = await _settle(client, lambda r: r["server"]["settings"]["crossFileContext"] is False)
        before = len(settled["cache"]["recent_timings"])  # the jobs queued before the change (a prefetch) are done
        main.edit(CURSOR, CURSOR, "b")  # a new cursor, so the answer is not the one already shown
        await main.inline(CURSOR + 1)
        after = (await stats(client))["cache"]["recent_timings"][before:]
        assert after and all(t["cross_file_tokens"] == 0 for t in after)
    finally:
        await stop_server(client)


async def test_invalid_settings_warn_and_fall_back_to_the_defaults(tiny_gguf, tiny_cache):
    client = await start_server(tiny_gguf, tiny_cache, init_options={"drafts": "many", "colour": "red"})
    try:
        warnings = [m.message for m in client.messages if m.type == types.MessageType.Warning]
        assert any("drafts" in w and "colour" in w for w in warnings)
        assert (await stats(client))["server"]["settings"]["drafts"] == 3
    finally:
        await stop_server(client)


async def test_configuration_changes_are_pulled_and_applied(tiny_gguf, tiny_cache):
    client = await start_server(tiny_gguf, tiny_cache, configuration={"maxTokens": 5})
    try:
        assert (await stats(client))["server"]["settings"]["maxTokens"] == 5  # pulled at start-up
        client.set_configuration({"maxTokens": 9, "refresh": "off", "memoryBudgetMb": 64, "persistMaxMb": 8,
                                  "idleRows": "fp32", "logLevel": "debug"}, section="superpie")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
        result = await _settle(client, lambda r: r["server"]["settings"]["maxTokens"] == 9)
        assert result["cache"]["refresh"] == "off" and result["cache"]["budget_bytes"] == 64 * 2**20
        assert result["cache"]["persist_max_bytes"] == 8 * 2**20 and result["cache"]["idle_rows"] == "fp32"
        client.set_configuration({"scope": "sideways"}, section="superpie")
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
        result = await _settle(client, lambda r: r["server"]["settings"]["maxTokens"] == 64)
        assert result["server"]["settings"]["scope"] == "auto"
        assert any("sideways" in m.message for m in client.messages)
    finally:
        await stop_server(client)


async def test_pushed_settings_apply_without_pull_support(tiny_gguf, tiny_cache):
    client = await start_server(tiny_gguf, tiny_cache, caps=capabilities(configuration=False))
    try:
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"superpie": {"drafts": 1, "speculative": False}}))
        result = await _settle(client, lambda r: r["server"]["settings"]["drafts"] == 1)
        assert result["server"]["settings"]["speculative"] is False
    finally:
        await stop_server(client)


async def _settle(client: LanguageClient, ready, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await stats(client)
        if ready(result):
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"settings never applied: {result['server']['settings']}")


# -- a model that does not load ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "corrupt"])
async def test_a_model_that_does_not_load_is_reported_and_the_server_keeps_serving(tiny_gguf, tiny_cache,
                                                                                  tmp_path, kind):
    bad = tmp_path / "model.gguf"
    if kind == "corrupt":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    client = await start_server(tiny_gguf, tiny_cache, model=str(bad), wait=False)
    try:
        assert await wait_for_model(client) == "failed"
        errors = [m.message for m in client.messages if m.type == types.MessageType.Error]
        assert errors and "cannot load the model" in errors[0]
        doc = Doc(client, "file:///nomodel.py", FUNCTION)
        assert await doc.inline() == []
        assert await doc.hover() is None
        doc.edit(0, 0, "# still tracked\n")
        assert (await stats(client, doc.uri))["document"]["version"] == 2
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"superpie": {"model": str(tiny_gguf)}}))
        assert await _settle(client, lambda r: r["server"]["model_state"] == "ready")
        await doc.assert_in_sync()  # the documents were re-opened into the new model's caches
        assert isinstance(await doc.inline(), list)
    finally:
        await stop_server(client)


# -- the command line ----------------------------------------------------------------------------------------------

async def test_serve_writes_the_log_file(tiny_gguf, tiny_cache, tmp_path):
    log_file = tmp_path / "superpie.log"
    client = await start_server(tiny_gguf, tiny_cache, args=("--log-file", str(log_file)))
    await stop_server(client)
    text = log_file.read_text()
    assert "ready in" in text and "superpie" in text


def _listening(port: int) -> bool:
    """Whether a local TCP socket listens on `port`, read from /proc (connecting would use up the server)."""
    table = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(int(row.split()[1].split(":")[1], 16) == port and row.split()[3] == "0A" for row in table)


async def test_serve_over_tcp(tiny_gguf, tiny_cache):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = await asyncio.create_subprocess_exec(
        *SERVER, "--cache-dir", str(tiny_cache), "serve", "--model", str(tiny_gguf), "--no-persist",
        "--tcp", f"127.0.0.1:{port}", stderr=asyncio.subprocess.DEVNULL)
    client = make_test_lsp_client()
    try:
        # pygls serves one TCP connection and then shuts down, so connect only once the port listens.
        for _ in range(400):
            if _listening(port):
                break
            await asyncio.sleep(0.05)
        await client.start_tcp("127.0.0.1", port)
        result = await client.initialize_session(types.InitializeParams(capabilities=capabilities()))
        assert result.capabilities.inline_completion_provider is not None
        assert await wait_for_model(client) == "ready"
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        with contextlib.suppress(ConnectionError):  # the server is gone: its socket may reset
            await client.stop()


# -- the real model ------------------------------------------------------------------------------------------------

@pytest.mark.real_model
async def test_real_model_completes_through_the_server(tiny_gguf):
    from inference.fetch import cache_root
    from inference.model_store import prepare_model

    await asyncio.to_thread(prepare_model, cache=cache_root(), progress=False)  # fetch and convert once, here
    client = await start_server(tiny_gguf, cache_root(), model="qwen2.5-coder-0.5b")
    try:
        doc = Doc(client, "file:///average.py", FUNCTION)
        items = await doc.inline()
        assert items and ("total" in items[0] or "len" in items[0])
    finally:
        await stop_server(client)
