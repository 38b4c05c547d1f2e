"""The engine: the model, the documents' KV caches and decoding, in a child process of the language server.

A crash, an out-of-memory kill or a hung decode step in here takes only this process down. The server
(lsp_server/engine_process.py, lsp_server/model_host.py) keeps the editor's text of every document, starts a
new engine and re-opens them from it. The model's Python code also holds this process's GIL, not the server's,
so hovers and text sync are answered while a decode runs.

Messages come over a pipe (pickled tuples, see `EngineProcess`); each job runs on the engine's model worker
(lsp_server/worker.py) in the order it came, and is answered with its result. On the way the engine sends the
signs of life the server's watchdog reads (a job started, a decode step), the progress of a load or a large
encode, and its log records.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from inference.model_store import load_model
from kv_cache.edits import TextEdit
from lsp_server.completer import Completer
from lsp_server.completion import CacheSettings, CompletionOptions, CompletionOutcome
from lsp_server.engine_process import EngineConfig, text_digest
from lsp_server.log_setup import OWN_LOGGERS, apply_log_level
from lsp_server.options import ServerOptions
from lsp_server.worker import SKIPPED, ModelWorker

log = logging.getLogger(__name__)

LARGE_ENCODE_TOKENS = 256  # a window with this many tokens still to encode gets $/progress (seconds of idle work)
PROGRESS_STEP = 10  # percent of a window's encoding between two progress reports
CANCELLABLE = ("complete", "prefetch")  # jobs that check for cancellation at every decode step


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def _return_free_memory() -> None:
    """Give the heap's free pages back to the system once the idle work is done. Rows made idle and the buffers
    of finished forwards leave free memory that RSS still counts (bench/memory.py); glibc keeps it otherwise."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def run_engine(conn: Connection, config: EngineConfig) -> None:
    """The child process's entry point: serve jobs until the server says stop or goes away."""
    _detach_stdio()
    Engine(conn, config).serve()


def _detach_stdio() -> None:
    """The server's stdout is the LSP stream: anything printed here (by a library too) goes to stderr instead."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), 1)
    sys.stdout = sys.stderr
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


class _PipeLogHandler(logging.Handler):
    """Sends superpie's log records to the server, which logs them as its own (file and client)."""

    def __init__(self, send: Callable[..., None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send("log", {"name": record.name, "levelno": record.levelno, "levelname": record.levelname,
                               "msg": record.getMessage(), "threadName": f"engine:{record.threadName}",
                               "exc_text": self.formatException(record.exc_info) if record.exc_info else None})
        except Exception:
            self.handleError(record)


@dataclass
class _JobState:
    cancel: threading.Event = field(default_factory=threading.Event)
    steps: int = 0  # cancel checks so far
    typed: str | None = None  # what the user typed at the cursor since the request (the decode follows it)


def follows(text: str, typed: str) -> bool:
    """Whether a completion that starts with `text` can still begin with what the user typed."""
    return text.startswith(typed) or typed.startswith(text)


class Engine:
    def __init__(self, conn: Connection, config: EngineConfig) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self.config = config
        self.completer: Completer | None = None  # the worker thread's
        self.worker = ModelWorker(self._idle_step, name="superpie-engine")
        self._jobs: dict[int, _JobState] = {}  # the jobs not answered yet
        self._encoding: dict[str, tuple[int, int]] = {}  # uri: (tokens to do, percent shown)
        handler = _PipeLogHandler(self.send)
        for name in OWN_LOGGERS:
            logging.getLogger(name).addHandler(handler)
        apply_log_level(config.log_level)

    def send(self, *message: Any) -> None:
        """One message to the server, from any thread; a server that has gone is not an error here."""
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                pass

    def serve(self) -> None:
        """Read messages until "stop" or the end of the pipe, then stop the worker and save the caches' state."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "job":
                self._submit(*message[1:])
            elif kind == "cancel":
                state = self._jobs.get(message[1])
                if state is not None:
                    state.cancel.set()
            elif kind == "typed":
                state = self._jobs.get(message[1])
                if state is not None:
                    state.typed = message[2]
            elif kind == "log_level":
                apply_log_level(message[1])
            elif kind == "stop":
                break
        self.worker.stop()
        if self.completer is not None:
            self.completer.save_state()

    # -- jobs ------------------------------------------------------------------------------------------------

    def _submit(self, job_id: int, name: str, args: tuple, kind: str, front: bool, idle: bool) -> None:
        state = self._jobs[job_id] = _JobState()
        call: Callable[[], Any] = partial(getattr(self, f"_{name}"), *args)
        if name in CANCELLABLE:
            call = partial(call, partial(self._step, job_id, state))
        elif name == "load":
            call = partial(call, partial(self.send, "report", job_id))

        def run() -> Any:
            self.send("started", job_id)
            return call()

        if idle:
            future = self.worker.submit_idle(run, kind=kind, cancel=state.cancel,
                                             stop=partial(self._yield, job_id, state))
        else:
            future = self.worker.submit(run, kind=kind, cancel=state.cancel, front=front)
        future.add_done_callback(partial(self._answer, job_id))

    def _step(self, job_id: int, state: _JobState, text: str) -> bool:
        """The decoder's check before each step: counted for the server (a sign of life), then the cancel read. A
        decode the user typed past (the text so far no longer starts with what was typed) stops too: the server
        would not use it."""
        state.steps += 1
        self.send("step", job_id, state.steps)
        typed = state.typed
        return state.cancel.is_set() or typed is not None and not follows(text, typed)

    def _yield(self, job_id: int, state: _JobState) -> None:
        """An idle-priority job gives way to a newer job: it stops at its next check; the server is told at which."""
        state.cancel.set()
        self.send("yielded", job_id, state.steps)

    def _answer(self, job_id: int, future: Future) -> None:
        self._jobs.pop(job_id, None)
        worker = {"jobs_done": self.worker.jobs_done, "idle_seconds": round(self.worker.idle_seconds, 3)}
        err = future.exception()
        if err is not None:
            detail = "".join(traceback.format_exception(err))
            self.send("failed", job_id, f"{type(err).__name__}: {err}", detail, worker)
        elif future.result() is SKIPPED:
            self.send("skipped", job_id, worker)
        else:
            self.send("done", job_id, future.result(), worker)

    def _load(self, options: ServerOptions, documents: dict[str, tuple[str, str]], stage: str,
              report: Callable[[str], None]) -> dict[str, float]:
        self.completer = None  # free the old model and its caches before loading the next one
        report(stage)
        model = load_model(options.model, options.quantization, cache=self.config.cache_dir, progress=False,
                           threads=self.config.threads, device=self.config.device)
        completer = Completer(model, cache=options.cache_settings(), persist_dir=self.config.persist_dir)
        for uri, (text, language) in documents.items():
            completer.open(uri, text, language)
        self.completer = completer
        return dict(model.timings)

    def _open(self, uri: str, text: str, language: str) -> None:
        if self.completer is not None:
            self.completer.open(uri, text, language)

    def _change(self, uri: str, edits: list[TextEdit]) -> bool:
        """False if the document must be re-opened from the server's text: it is not here, or an edit failed
        (then it is dropped, so no later edit applies to a text the editor does not have)."""
        completer = self.completer
        if completer is None:
            return True
        if uri not in completer.docs:
            return False
        try:
            completer.change(uri, edits)
        except Exception:
            log.exception("%s: applying %d edit(s) failed; asking for the document's text", uri, len(edits))
            completer.close(uri)
            return False
        return True

    def _close(self, uri: str) -> None:
        if self.completer is not None:
            self.completer.close(uri)

    def _configure(self, settings: CacheSettings) -> None:
        if self.completer is not None:
            self.completer.configure(**asdict(settings))
        self.worker.wake_idle()

    def _complete(self, uri: str, offset: int, options: CompletionOptions,
                  cancelled: Callable[[str], bool]) -> CompletionOutcome | None:
        completer = self.completer
        if completer is None or uri not in completer.docs:
            return None
        return completer.complete(uri, offset, options, cancelled)

    def _prefetch(self, uri: str, offset: int, inserted: str, options: CompletionOptions,
                  cancelled: Callable[[str], bool]) -> CompletionOutcome | None:
        completer = self.completer
        if completer is None or uri not in completer.docs:
            return None
        return completer.complete_after(uri, offset, inserted, options, cancelled)

    def _stats(self, uri: str | None) -> tuple[dict[str, Any] | None, str | None]:
        completer = self.completer
        if completer is None:
            return None, None
        digest = text_digest(completer.text(uri)) if uri is not None and uri in completer.docs else None
        return completer.stats(), digest

    def _refresh(self) -> bool:
        completer = self.completer
        if completer is None:
            return False
        policy = completer.cache.refresh
        completer.configure(refresh="idle")
        try:
            return completer.refresh_step()
        finally:
            completer.configure(refresh=policy)

    # -- idle work -------------------------------------------------------------------------------------------

    def _idle_step(self) -> bool:
        completer = self.completer
        if completer is None:
            return False
        more = completer.refresh_step()
        self._report_encoding(completer)
        if not more:
            _return_free_memory()
        return more

    def _report_encoding(self, completer: Completer) -> None:
        """Progress of the windows idle steps are building: begun once LARGE_ENCODE_TOKENS are to do, reported
        every PROGRESS_STEP percent, ended when the window is built (or its document closed)."""
        for uri in [u for u in self._encoding if u not in completer.docs]:
            del self._encoding[uri]
            self.send("encoding", uri, "end", "closed")
        for uri, doc in completer.docs.items():
            pending = doc.pending_tokens()
            entry = self._encoding.get(uri)
            if entry is None:
                if pending >= LARGE_ENCODE_TOKENS:
                    self._encoding[uri] = (pending, 0)
                    self.send("encoding", uri, "begin", f"{uri.rsplit('/', 1)[-1]}: {pending} tokens")
                continue
            total, shown = entry
            if pending == 0:
                del self._encoding[uri]
                self.send("encoding", uri, "end", "done")
                continue
            percent = 100 * max(0, total - pending) // total
            if percent >= shown + PROGRESS_STEP:
                self._encoding[uri] = (total, percent)
                self.send("encoding", uri, "report", f"{percent}%")
