"""superpie's language server: the protocol handlers, thin as in jedi-language-server. Each one translates the LSP
params (positions in the negotiated encoding, trigger kinds, settings) into one call on the session
(lsp_server/session.py) or the model host (lsp_server/model_host.py), and the answer back.

One keystroke, end to end: `didChange` is converted to code-point TextEdits here (the session keeps each
document's text, so positions resolve against exactly what the client has); the session cancels the in-flight
generation for that document and queues the edits on the model worker, which applies them to the completer's
buffer cache in order. An `inlineCompletion` request is answered from the prefetch or the typed-through cache when
possible; otherwise a completion job is queued behind those edits, and its result is dropped if the document
changed meanwhile. The event loop never runs the model, so hover, sync and the other requests are answered while
the worker decodes.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcMethodNotFound
from pygls.lsp.server import LanguageServer

from inference.syntax.languages import language_of
from kv_cache.edits import TextEdit
from lsp_server.engine_process import HANG_TIMEOUT_S, EngineConfig, rss_mb, text_digest
from lsp_server.log_setup import apply_log_level, configure_logging
from lsp_server.model_host import CLIENT_REPLY_TIMEOUT_S, ModelHost
from lsp_server.options import SECTION, ServerOptions, parse_options, to_wire
from lsp_server.positions import UTF16, PositionError, choose_encoding, offset_at, position_at, range_to_edit
from lsp_server.protocol import SuperpieProtocol
from lsp_server.session import Document, Session
from lsp_server.suggestions import completion_items, hover_markdown, inline_items

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("superpie")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0"

COMMAND_STATS = "superpie.stats"
COMMAND_REFRESH = "superpie.refresh"
_NO_ANSWER = object()  # a server-to-client request that failed or timed out


class SuperpieServer(LanguageServer):
    def __init__(self, base_options: ServerOptions = ServerOptions(), *, cache_dir: Path | None = None,
                 threads: int | None = None, device: str = "cpu", persist_dir: Path | None = None,
                 hang_timeout_s: float = HANG_TIMEOUT_S) -> None:
        super().__init__("superpie", VERSION, protocol_cls=SuperpieProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.base_options = base_options  # defaults + command line
        self.options = base_options  # + initializationOptions + workspace configuration
        self.position_encoding = UTF16
        self.client_caps = types.ClientCapabilities()
        self.init_raw: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the log handler's way to the client
        config = EngineConfig(cache_dir, threads, device, persist_dir, base_options.log_level)
        self.host = ModelHost(self, config=config, snapshot=self._engine_snapshot, hang_timeout_s=hang_timeout_s)
        self.session = Session(self.host)
        self.latencies_ms: dict[str, deque[float]] = {}
        self._initialized = False
        self._startup_warnings: list[str] = []
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
        general, window = params.capabilities.general, params.capabilities.window
        self.position_encoding = choose_encoding(general.position_encodings if general else None)
        self.host.progress.supported = bool(window and window.work_done_progress)
        self.init_raw = params.initialization_options
        self.options, self._startup_warnings = parse_options(self.init_raw, self.base_options)
        apply_log_level(self.options.log_level)
        self.host.set_log_level(self.options.log_level)
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
        self.host.start_load(self.options, self.session.snapshot())

    def on_shutdown(self, params: None) -> None:
        """Stop what runs and tell the engine to save and exit; `serve` waits for it after the event loop ends
        (an editor that quits right after the answer must not cut a wait short)."""
        self.session.cancel_all()
        self.host.stop()

    def _engine_snapshot(self) -> tuple[ServerOptions, dict[str, tuple[str, str]]]:
        """What a restarted engine loads: the settings and the documents as the editor has them."""
        return self.options, self.session.snapshot()

    # -- text sync -----------------------------------------------------------------------------------------

    def did_open(self, params: types.DidOpenTextDocumentParams) -> None:
        td = params.text_document
        self.session.open(td.uri, td.language_id, td.version, td.text)

    def did_change(self, params: types.DidChangeTextDocumentParams) -> None:
        uri = params.text_document.uri
        doc = self.session.documents.get(uri)
        if doc is None:
            log.warning("didChange for %s, which is not open: ignored", uri)
            return
        changes = params.content_changes
        version = params.text_document.version
        if version < doc.version:
            whole = [i for i, c in enumerate(changes) if isinstance(c, types.TextDocumentContentChangeWholeDocument)]
            if not whole:
                log.warning("%s: a change for version %s, older than version %s, ignored", uri, version, doc.version)
                return
            log.warning("%s: a change for version %s after version %s; its full text resyncs the document", uri,
                        version, doc.version)
            changes = changes[whole[-1]:]
        edits = []
        text = doc.text
        for change in changes:
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
        self.session.change(doc, params.text_document.version, edits, text)

    def did_close(self, params: types.DidCloseTextDocumentParams) -> None:
        self.session.close(params.text_document.uri)

    def did_save(self, params: types.DidSaveTextDocumentParams) -> None:
        """A save with text is a free consistency check: a copy that drifted (a dropped change) is resynced."""
        doc = self.session.documents.get(params.text_document.uri)
        if doc is None or params.text is None or params.text == doc.text:
            return
        log.warning("%s differed from the saved text; resynced", doc.uri)
        self.session.change(doc, doc.version, [TextEdit(0, len(doc.text), params.text)], params.text)

    # -- requests ------------------------------------------------------------------------------------------

    async def inline_completion(self, params: types.InlineCompletionParams) -> types.InlineCompletionList:
        t0 = time.perf_counter()
        doc = self.session.document(params.text_document.uri)
        text, offset = doc.text, self._offset(doc, params.position)
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        drafts = self.options.request_drafts(invoked)
        selected = params.context.selected_completion_info
        selected_start = None
        if selected is not None:
            if selected.range.start.line != params.position.line:
                raise JsonRpcInvalidParams("selectedCompletionInfo.range must be on the cursor's line")
            selected_start = self._offset(doc, selected.range.start)
        suggestions = await self.session.suggest(doc, offset, self.options.completion(drafts),
                                                 prefetch=self.options.prefetch and selected is None)
        items = inline_items(text, offset, suggestions[:drafts], self.position_encoding, selected, selected_start)
        self._record("inline", t0)
        return types.InlineCompletionList(items=items)

    async def completion(self, params: types.CompletionParams) -> types.CompletionList:
        t0 = time.perf_counter()
        doc = self.session.document(params.text_document.uri)
        text, offset = doc.text, self._offset(doc, params.position)
        suggestions = await self.session.suggest(doc, offset, self.options.completion(self.options.drafts))
        items = completion_items(text, offset, suggestions[:self.options.drafts], self.position_encoding,
                                 doc.language_id, markdown=self._client_reads_markdown("completion"))
        self._record("completion", t0)
        return types.CompletionList(is_incomplete=True, items=items)

    async def hover(self, params: types.HoverParams) -> types.Hover | None:
        """The drafts at the cursor, when the session has or can compute them without waiting for a decode."""
        t0 = time.perf_counter()
        doc = self.session.document(params.text_document.uri)
        text, offset = doc.text, self._offset(doc, params.position)
        suggestions = await self.session.preview(doc, offset, self.options.completion(self.options.drafts))
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
        server = self._server_stats()  # before the read: settings applied while it waits reach the cache after it
        cache = cached_digest = None
        if self.host.can_read_cache_now():
            cache, cached_digest = await self.host.read_cache(uri, front=uri is None)
        result = {"server": server, "cache": cache}
        if uri is not None:
            doc = self.session.documents.get(uri)
            result["document"] = None if doc is None else {
                "version": doc.version, "characters": len(doc.text), "sha256": text_digest(doc.text),
                "cache_sha256": cached_digest, "syntax": language_of(doc.language_id, uri).rules}
        return result

    async def cmd_refresh(self, *args: Any) -> dict[str, Any]:
        """Re-encode every stale cache row now (`superpie.refresh`), whatever the refresh policy."""
        t0 = time.perf_counter()
        steps, stale_rows = await self.host.refresh_all()
        return {"steps": steps, "seconds": round(time.perf_counter() - t0, 3), "stale_rows": stale_rows}

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
        self.host.set_log_level(new.log_level)
        if new != old:
            log.info("settings: %s", to_wire(new))
        if reload and new.model_identity() != old.model_identity():
            self.host.start_load(new, self.session.snapshot())
            return
        if new.cache_settings() != old.cache_settings():
            self.host.configure(new.cache_settings())

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

    # -- helpers -------------------------------------------------------------------------------------------

    def _offset(self, doc: Document, position: types.Position) -> int:
        try:
            return offset_at(doc.text, position, self.position_encoding)
        except PositionError as err:
            raise JsonRpcInvalidParams(f"{doc.uri}: {err}") from None

    def _record(self, kind: str, t0: float) -> None:
        self.latencies_ms.setdefault(kind, deque(maxlen=1024)).append(1000 * (time.perf_counter() - t0))

    def _server_stats(self) -> dict[str, Any]:
        latency = {}
        for kind, values in self.latencies_ms.items():
            ordered = sorted(values)
            latency[kind] = {"n": len(ordered), "p50_ms": round(ordered[len(ordered) // 2], 2),
                             "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)}
        session = self.session.stats()
        engine = self.host.engine_stats()
        server_rss = rss_mb() or 0.0
        return {
            "version": VERSION,
            "position_encoding": self.position_encoding,
            "model_state": self.host.state,
            "model_error": self.host.error,
            "settings": to_wire(self.options),
            "documents": session["documents"],
            "versions": session["versions"],
            "counters": session["counters"],
            "latency": latency,
            "worker": {**self.host.worker_stats(), "decoding": session["decoding"]},
            "engine": engine,
            "prefetch": session["prefetch"],
            "pending_futures": len(self.protocol._request_futures),
            "rss_mb": round(server_rss + (engine["rss_mb"] or 0), 1),  # the server's and the engine's
            "server_rss_mb": server_rss,
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


def serve(base_options: ServerOptions, *, cache_dir: Path | None, threads: int | None, device: str,
          tcp: tuple[str, int] | None = None, log_file: Path | None = None,
          persist_dir: Path | None = None, hang_timeout_s: float = HANG_TIMEOUT_S) -> int:
    """Run the server until the client exits it (stdio) or disconnects (TCP), then let the engine save and exit."""
    server = SuperpieServer(base_options, cache_dir=cache_dir, threads=threads, device=device,
                            persist_dir=persist_dir, hang_timeout_s=hang_timeout_s)
    configure_logging(server, log_file, base_options.log_level)
    try:
        if tcp is not None:
            server.start_tcp(*tcp)
        else:
            server.start_io()
    finally:
        server.host.join()
    return 0
