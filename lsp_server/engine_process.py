"""The server's side of the engine process (lsp_server/engine.py): start it, send it jobs, read its answers,
and notice when it is gone.

Messages are tuples pickled by multiprocessing's Connection over a local pipe: a keystroke's didChange is a
few hundred bytes and one round trip costs tens of microseconds (`superpie bench isolation` measures it), far
below a decode step, so no other format is needed.

The engine is lost when its pipe ends (it crashed or was killed) or when a job shows no sign of life (a start
or a decode step) for `hang_timeout_s` (then it is killed). Every job it had not answered then resolves with
the job's `lost` value, so no request waits for an answer that will never come, and `on_exit` tells the owner
why, which starts a new engine.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from lsp_server.worker import SKIPPED

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25  # how often the watchdog looks at the running job
HANG_TIMEOUT_S = 60.0  # a job with no sign of life (a start, a decode step) for this long means a hung engine
STOP_TIMEOUT_S = 10.0  # a stopping engine saves its caches' state; after this it is killed


class EngineError(RuntimeError):
    """A job failed inside the engine (the message carries the engine's exception)."""


@dataclass(frozen=True)
class EngineConfig:
    """What an engine is started with (the command line's; settings come with each load)."""

    cache_dir: Path | None
    threads: int | None
    device: str
    persist_dir: Path | None
    log_level: str = "info"


def text_digest(text: str) -> str:
    """What two copies of a document are compared by: the server's, the cache's, a prefetch's."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _engine_main(conn: Connection, config: EngineConfig) -> None:
    """The child's entry point. The model's code is imported here, in the child: the server never loads it."""
    from lsp_server.engine import run_engine

    run_engine(conn, config)


@dataclass
class EngineJob:
    """A job sent to the engine. `steps` and `started` are the engine's reports; `on_report` receives a load's
    progress messages and `on_yield` is called when an idle-priority job gives way (both on the reader thread)."""

    id: int
    kind: str
    lost: Any  # the result if the engine is lost before it answers
    send: Callable[..., None]  # a message to the engine about this job
    future: Future = field(default_factory=Future)
    steps: int = 0
    started: bool = False
    last_sign: float = 0.0  # time.monotonic() of the last start or step
    on_report: Callable[[str], None] | None = None
    on_yield: Callable[[], None] | None = None
    answered: bool = False  # the engine answered, or was lost (the future may have been cancelled before)

    def cancel(self) -> None:
        """Stop at the engine's next check (a job not started yet is skipped)."""
        if not self.answered:
            self.send("cancel", self.id)

    def typed(self, text: str) -> None:
        """The user typed `text` at the decode's cursor: it stops once its output cannot begin with that."""
        if not self.answered:
            self.send("typed", self.id, text)

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Settle the future once; the awaiting side may have cancelled it already."""
        self.answered = True
        try:
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)
        except InvalidStateError:
            pass


class EngineProcess:
    """One engine child process and the jobs it has not answered yet."""

    def __init__(self, config: EngineConfig, *, hang_timeout_s: float, on_event: Callable[..., None],
                 on_exit: Callable[[str], None]) -> None:
        """`on_event(kind, *args)` gets the engine's progress messages ("encoding"); `on_exit(reason)` is called
        once if the engine is lost (not after `stop`). Both run on the reader thread."""
        self.hang_timeout_s = hang_timeout_s
        self._on_event, self._on_exit = on_event, on_exit
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_engine_main, args=(child, config), name="superpie-engine", daemon=True)
        self.process.start()
        child.close()
        self._send_lock = threading.Lock()
        self._jobs: dict[int, EngineJob] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self._lost = False  # the reader has seen the end of the pipe
        self._kill_reason: str | None = None
        self.jobs_done, self.idle_seconds = 0, 0.0  # the engine worker's, as of its last answer
        threading.Thread(target=self._read, name="superpie-engine-reader", daemon=True).start()
        threading.Thread(target=self._watch, name="superpie-engine-watchdog", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    # -- sending -------------------------------------------------------------------------------------------

    def submit(self, name: str, *args: Any, kind: str, lost: Any = None, front: bool = False, idle: bool = False,
               on_report: Callable[[str], None] | None = None,
               on_yield: Callable[[], None] | None = None) -> EngineJob:
        """Run the engine's job `name` with `args` (in order with the jobs sent before it; `front`: before them;
        `idle`: at idle priority, yielding to any other job)."""
        job = EngineJob(next(self._ids), kind, lost, self.send, on_report=on_report, on_yield=on_yield)
        with self._send_lock:
            if self._stopping or self._lost or self._kill_reason is not None:
                job.resolve(lost)
                return job
            self._jobs[job.id] = job
            self._send_locked(("job", job.id, name, args, kind, front, idle))
        return job

    def send(self, *message: Any) -> None:
        with self._send_lock:
            self._send_locked(message)

    def _send_locked(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except (OSError, ValueError):  # the engine is gone; the reader sees the end of the pipe
            pass

    # -- state ---------------------------------------------------------------------------------------------

    def has_work(self, kinds: tuple[str, ...]) -> bool:
        return any(job.kind in kinds for job in list(self._jobs.values()))

    def running_kind(self) -> str | None:
        running = [job for job in list(self._jobs.values()) if job.started]
        return running[-1].kind if running else None

    @property
    def queued(self) -> int:
        return sum(not job.started for job in list(self._jobs.values()))

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid) if self.process.is_alive() else None

    # -- stopping ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the engine to finish: what is queued is skipped, the caches' state is saved, the process exits."""
        with self._send_lock:
            if self._stopping:
                return
            self._stopping = True
            self._send_locked(("stop",))

    def join(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait for a stopped engine to exit (it is killed after `timeout`)."""
        self.stop()
        self.process.join(timeout)
        if self.process.is_alive():
            log.warning("the engine did not exit within %.0f s of stop; killed", timeout)
            self.process.kill()
            self.process.join(1.0)

    def kill(self, reason: str) -> None:
        """The engine is not to be trusted any more (it hangs): kill it; the reader reports the loss."""
        if self._kill_reason is None:
            self._kill_reason = reason
            self.process.kill()

    # -- the reader and watchdog threads -------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an answer that does not unpickle fails its job, not the reader
                log.exception("unreadable message from the engine")
                continue
            self._dispatch(message)
        self.process.join(1.0)
        reason = self._kill_reason or _exit_reason(self.process.exitcode)
        with self._send_lock:
            self._lost = True
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.resolve(job.lost)
        if not self._stopping:
            self._on_exit(reason)

    def _dispatch(self, message: tuple) -> None:
        kind, *rest = message
        if kind in ("done", "skipped", "failed"):
            job = self._jobs.pop(rest[0], None)
            worker = rest[-1]
            self.jobs_done, self.idle_seconds = worker["jobs_done"], worker["idle_seconds"]
            if job is None:
                return
            if kind == "done":
                job.resolve(rest[1])
            elif kind == "skipped":
                job.resolve(SKIPPED)
            else:
                log.debug("engine job %s failed:\n%s", job.kind, rest[2])
                job.resolve(error=EngineError(rest[1]))
        elif kind in ("started", "step"):
            job = self._jobs.get(rest[0])
            if job is not None:
                job.started, job.last_sign = True, time.monotonic()
                if kind == "step":
                    job.steps = rest[1]
        elif kind == "yielded":
            job = self._jobs.get(rest[0])
            if job is not None:
                job.steps = max(job.steps, rest[1])  # the step it stops after, before the owner reads it
                if job.on_yield is not None:
                    job.on_yield()
        elif kind == "report":
            job = self._jobs.get(rest[0])
            if job is not None and job.on_report is not None:
                job.on_report(rest[1])
        elif kind == "log":
            record = logging.makeLogRecord(rest[0])
            logging.getLogger(record.name).handle(record)
        else:
            self._on_event(kind, *rest)

    def _watch(self) -> None:
        """Kill an engine whose running job has shown no sign of life for `hang_timeout_s` (a load is exempt:
        converting a model takes minutes without a step)."""
        while self.process.is_alive() and not self._stopping:
            time.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            for job in list(self._jobs.values()):
                if job.started and job.kind != "load" and now - job.last_sign > self.hang_timeout_s:
                    self.kill(f"a {job.kind} job showed no progress for {now - job.last_sign:.1f} s")
                    return


def rss_mb(pid: int | str | None = "self") -> float | None:
    """Resident memory of a process (Linux: /proc/<pid>/status), for the stats and the memory benchmarks."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "the engine's pipe closed"
    if code < 0:
        return f"the engine was killed by signal {-code}"
    return f"the engine exited with code {code}"
