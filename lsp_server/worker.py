"""One model-worker thread: every call into the model and the caches runs here, in submission order.

The event loop never waits on the model; it submits jobs and awaits their futures. Edits are jobs too, so
they reach the completer in the order the client sent them. A job carries an optional cancel event that a
newer request, an edit or `$/cancelRequest` sets; the job's own code checks it between decode steps, and a
job still queued when cancelled is skipped.

With nothing queued, the worker does idle work: an idle-priority job if one waits (a prefetch), else short
idle steps (cache refresh). Idle work yields to every job: a job submitted while an idle job runs stops it at
its next check, and one that has not started is dropped, so the job waits for one step of it at most.
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
    cancel: threading.Event | None = None
    stop: Callable[[], None] | None = None  # an idle-priority job's: makes `run` return at its next check
    front: bool = False  # queued before the other jobs, after the front jobs queued earlier


class ModelWorker:
    def __init__(self, idle_step: Callable[[], bool] | None = None, name: str = "superpie-model") -> None:
        self._idle_step = idle_step
        self._queue: deque[Job] = deque()
        self._idle_job: Job | None = None  # the idle-priority job waiting to run
        self._wake = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._idle_work = True  # whether the last idle step said more remains
        self._last_job = 0.0  # time.monotonic() when the last job finished
        self.idle_seconds = 0.0  # time spent in idle steps (statistics)
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- called from the event loop ----------------------------------------------------------------------

    def submit(self, run: Callable[[], Any], *, kind: str = "task", cancel: threading.Event | None = None,
               front: bool = False) -> Future:
        job = Job(run, kind=kind, cancel=cancel, front=front)
        with self._wake:
            if self._stopping:
                job.future.set_exception(RuntimeError("the model worker has stopped"))
                return job.future
            if front:  # front jobs keep their own order: a settings change is seen by the stats read after it
                self._queue.insert(_past_front_jobs(self._queue), job)
            else:
                self._queue.append(job)
            waiting, running = self._take_idle_jobs()
            self._wake.notify()
        _yield(waiting, running)
        return job.future

    def submit_idle(self, run: Callable[[], Any], *, kind: str, cancel: threading.Event,
                    stop: Callable[[], None]) -> Future:
        """An idle-priority job: it starts only when no job waits, once the idle delay has passed, and yields to
        every job submitted before it ends (a newer idle job too). `stop` must set `cancel` and make `run` return
        at its next check."""
        job = Job(run, kind=kind, cancel=cancel, stop=stop)
        with self._wake:
            if self._stopping:
                job.future.set_exception(RuntimeError("the model worker has stopped"))
                return job.future
            waiting, running = self._take_idle_jobs()
            self._idle_job = job
            self._wake.notify()
        _yield(waiting, running)
        return job.future

    def _take_idle_jobs(self) -> tuple[Job | None, Job | None]:
        """The waiting idle job (no longer waiting) and the running one, which a new job makes yield (locked)."""
        waiting, self._idle_job = self._idle_job, None
        running = self._running if self._running is not None and self._running.stop is not None else None
        return waiting, running

    def has_work(self, kinds: tuple[str, ...]) -> bool:
        """A job of one of `kinds` is running or waiting."""
        with self._wake:
            jobs = [*self._queue, *([self._running] if self._running else []),
                    *([self._idle_job] if self._idle_job else [])]
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
            pending = [*self._queue, *([self._idle_job] if self._idle_job else [])]
            self._queue.clear()
            self._idle_job = None
            self._wake.notify()
        for job in pending:
            _skip(job)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the worker thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    if self._idle_job is None and not (self._idle_work and self._idle_step):
                        self._wake.wait()
                        continue
                    wait = self._last_job + IDLE_DELAY_S - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
                if self._stopping:
                    return
                if self._queue:
                    job = self._queue.popleft()
                else:
                    job, self._idle_job = self._idle_job, None
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


def _skip(job: Job) -> None:
    if job.future.set_running_or_notify_cancel():
        job.future.set_result(SKIPPED)


def _yield(waiting: Job | None, running: Job | None) -> None:
    """Make idle jobs give way (outside the lock: `stop` is the submitter's code): a waiting one never starts."""
    for job in (waiting, running):
        if job is not None and job.stop is not None:
            job.stop()
    if waiting is not None:
        _skip(waiting)



def _past_front_jobs(queue: deque[Job]) -> int:
    """The index just past the front jobs at the head of `queue`."""
    count = 0
    for job in queue:
        if not job.front:
            break
        count += 1
    return count
