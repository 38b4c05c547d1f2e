"""One model-worker thread: every call into the model and the caches runs here, in submission order.

The event loop never waits on the model; it submits jobs and awaits their futures. Edits are jobs too, so
they reach the completer in the order the client sent them. A job carries an optional cancel event that a
newer request, an edit or `$/cancelRequest` sets; the job's own code checks it between decode steps, and a
job still queued when cancelled is skipped. With nothing queued, the worker runs short idle steps (cache
refresh), so a new job waits at most one step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SKIPPED = object()  # the result of a job cancelled before it started
IDLE_DELAY_S = 0.4  # idle work starts this long after the last job, so a burst of keystrokes never waits for it


@dataclass
class Job:
    run: Callable[[], Any]
    future: Future = field(default_factory=Future)
    kind: str = "task"
    uri: str | None = None
    cancel: threading.Event | None = None


class ModelWorker:
    def __init__(self, idle_step: Callable[[], bool] | None = None, name: str = "superpie-model") -> None:
        self._idle_step = idle_step
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._idle_work = True  # whether the last idle step said more remains
        self.idle_delay = IDLE_DELAY_S
        self._last_job = 0.0  # time.monotonic() when the last job finished
        self.idle_seconds = 0.0  # time spent in idle steps (statistics)
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- called from the event loop ----------------------------------------------------------------------

    def submit(self, run: Callable[[], Any], *, kind: str = "task", uri: str | None = None,
               cancel: threading.Event | None = None, front: bool = False) -> Future:
        job = Job(run, kind=kind, uri=uri, cancel=cancel)
        with self._wake:
            if self._stopping:
                job.future.set_exception(RuntimeError("the model worker has stopped"))
                return job.future
            (self._queue.appendleft if front else self._queue.append)(job)
            self._wake.notify()
        return job.future

    def cancel(self, uri: str, kinds: tuple[str, ...]) -> int:
        """Set the cancel event of queued and running jobs of `uri` with one of `kinds`; how many there were."""
        with self._wake:
            jobs = [*self._queue, *([self._running] if self._running else [])]
        hit = 0
        for job in jobs:
            if job.uri == uri and job.kind in kinds and job.cancel is not None and not job.cancel.is_set():
                job.cancel.set()
                hit += 1
        return hit

    @property
    def busy(self) -> bool:
        """A job (not an idle step) is running or waiting."""
        with self._wake:
            return self._running is not None or bool(self._queue)

    def has_work(self, kinds: tuple[str, ...]) -> bool:
        """A job of one of `kinds` is running or waiting."""
        with self._wake:
            jobs = [*self._queue, *([self._running] if self._running else [])]
        return any(job.kind in kinds for job in jobs)

    def running_kind(self) -> str | None:
        job = self._running
        return job.kind if job is not None else None

    @property
    def queued(self) -> int:
        with self._wake:
            return len(self._queue)

    def wake_idle(self) -> None:
        """New idle work may exist (a policy changed): let the idle steps run again."""
        with self._wake:
            self._idle_work = True
            self._wake.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._wake.notify()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(SKIPPED)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    if not (self._idle_work and self._idle_step):
                        self._wake.wait()
                        continue
                    wait = self._last_job + self.idle_delay - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
                if self._stopping:
                    return
                job = self._queue.popleft() if self._queue else None
                self._running = job
            if job is None:
                self._idle()
                continue
            try:
                self._run(job)
            finally:
                with self._wake:
                    self._running = None
                    self._idle_work = True  # any job may leave cache work behind
                    self._last_job = time.monotonic()

    def _run(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # the awaiting side gave up before the job started
        if job.cancel is not None and job.cancel.is_set():
            job.future.set_result(SKIPPED)
            return
        try:
            result = job.run()
        except BaseException as err:  # a failed job fails its request, never the worker
            job.future.set_exception(err)
        else:
            job.future.set_result(result)
        self.jobs_done += 1

    def _idle(self) -> None:
        t0 = time.perf_counter()
        try:
            more = bool(self._idle_step())
        except Exception:
            log.exception("idle cache refresh failed; idle work paused until the next job")
            more = False
        self.idle_seconds += time.perf_counter() - t0
        with self._wake:
            self._idle_work = more  # a job that arrives meanwhile sets it again when it finishes
