"""The model worker: jobs reach the pipeline through a bounded queue; ``max_batch`` run at once.

A job is a function ``fn(pipe, callback)``; ``callback(step, total)`` is handed to the engine, which
calls it after every denoising step or token. It records progress and raises :class:`JobCancelled`
once the job was cancelled (its client went away), which stops that job at the next step.

With ``max_batch`` 1, one thread runs one job at a time. With more, ``max_batch`` threads each run a
job and the pipeline's scheduler (``start_batching``) batches their engine calls step by step: the
model itself is still touched by one thread only, the scheduler's. ``queue_size`` more jobs wait;
the next gets :class:`QueueFull` (HTTP 429).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import queue
import threading
import time
from typing import Any, Callable

from bagel_engine.engine_protocol import Pipeline
from .metrics import Metrics

log = logging.getLogger("bagel_engine.serve")

JobFn = Callable[[Any, Callable[[int, int], None]], Any]


class QueueFull(Exception):
    """The queue holds as many jobs as allowed; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int, queue_size: int) -> None:
        super().__init__(f"the server is busy: {queue_size} request(s) are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job was cancelled (its client disconnected) and stopped between two steps."""


class WorkerStopped(RuntimeError):
    """The worker is shut down and takes no more jobs."""


class Job:
    def __init__(self, kind: str, fn: JobFn) -> None:
        self.kind = kind
        self.fn = fn
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancel_event = threading.Event()
        self.step = 0
        self.total = 0
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None

    def cancel(self) -> None:
        """Ask the job to stop: before it starts it is skipped, while it runs it stops at the next step."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def callback(self, step: int, total: int) -> None:
        self.step, self.total = int(step), int(total)
        if self.cancel_event.is_set():
            raise JobCancelled(f"cancelled at step {step}/{total}")


_STOP = object()


class ModelWorker:
    """Runs up to ``max_batch`` jobs at once (batched by the pipeline's scheduler); at most
    ``queue_size`` more wait."""

    def __init__(self, pipe: Pipeline, *, queue_size: int = 8, metrics: Metrics | None = None,
                 max_batch: int = 1, max_step_tokens: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.pipe = pipe
        self.max_batch, self.max_step_tokens = max_batch, max_step_tokens
        self.queue_size = queue_size
        self.metrics = metrics or Metrics()
        # The bound is kept by ``_waiting`` under ``_lock`` (queue_size 0: no job may wait).
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running: set[Job] = set()
        self._avg_job_s: float | None = None
        self._stopped = False
        self._threads = [threading.Thread(target=self._loop, name=f"bagel-model-worker-{k}", daemon=True)
                         for k in range(max_batch)]
        self.jobs_done = 0
        m = self.metrics
        m.gauge("bagel_queue_depth", "Jobs waiting for the model worker.", lambda: self._waiting)
        m.gauge("bagel_queue_capacity", "Jobs that may wait before requests get 429.", lambda: self.queue_size)
        m.gauge("bagel_jobs_in_progress", "Jobs the model worker is running now (at most max_batch).",
                lambda: len(self._running))
        m.gauge("bagel_max_batch", "Jobs the model worker runs at once (batched step by step).", lambda: self.max_batch)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "ModelWorker":
        if self.max_batch > 1 and hasattr(self.pipe, "start_batching"):
            self.pipe.start_batching(self.max_batch, self.max_step_tokens)
        for thread in self._threads:
            if not thread.is_alive():
                thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop taking jobs, cancel the waiting ones and the running ones, and join the threads."""
        with self._lock:
            self._stopped = True
            running = list(self._running)
        for job in running:
            job.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.cancel()
                job.future.set_exception(WorkerStopped("the server is shutting down"))
        for _ in self._threads:
            self._queue.put(_STOP)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self.max_batch > 1 and hasattr(self.pipe, "stop_batching"):
            self.pipe.stop_batching()

    # -- state ---------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stopped

    def retry_after(self) -> int:
        per_job = self._avg_job_s if self._avg_job_s is not None else 1.0
        return max(1, math.ceil(per_job * (self._waiting // self.max_batch + 1)))

    # -- submission ----------------------------------------------------------------------------
    def submit(self, kind: str, fn: JobFn) -> Job:
        """Queue a job; raise :class:`QueueFull` when ``queue_size`` jobs already wait."""
        job = Job(kind, fn)
        with self._lock:
            if self._stopped:
                raise WorkerStopped("the server is shutting down")
            # A job that a free runner will take at once never counts as waiting (queue_size 0:
            # accept only then).
            free = self.max_batch - len(self._running) - self._waiting
            full = self._waiting >= self.queue_size + max(free, 0)
            if full:
                self.metrics.inc("bagel_requests_rejected_total")
                raise QueueFull(self.retry_after(), self.queue_size)
            self._waiting += 1
            self._queue.put_nowait(job)
        return job

    def run(self, kind: str, fn: JobFn, timeout: float | None = None) -> Any:
        """Submit and wait (blocking; for synchronous front ends such as the web UI)."""
        return self.submit(kind, fn).future.result(timeout)

    # -- the thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            with self._lock:
                self._waiting -= 1
                if job.cancelled:
                    outcome = "cancelled"
                else:
                    self._running.add(job)
                    outcome = None
            if outcome == "cancelled":
                self.metrics.inc("bagel_jobs_total", kind=job.kind, outcome="cancelled")
                if not job.future.done():
                    job.future.set_exception(JobCancelled("cancelled before it started"))
                continue
            if not job.future.set_running_or_notify_cancel():
                with self._lock:
                    self._running.discard(job)
                continue
            job.started = time.monotonic()
            self.metrics.observe("bagel_queue_wait_seconds", job.started - job.created)
            try:
                result = job.fn(self.pipe, job.callback)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
                outcome = _outcome_of(e)
                if outcome == "error":
                    log.exception("job %s failed", job.kind)
                job.future.set_exception(e)
                if not isinstance(e, Exception):  # KeyboardInterrupt / SystemExit: stop the worker
                    raise
            else:
                outcome = "ok"
                job.future.set_result(result)
            finally:
                job.finished = time.monotonic()
                took = job.finished - job.started
                self.metrics.observe("bagel_job_duration_seconds", took, kind=job.kind)
                with self._lock:
                    self._running.discard(job)
                    self.jobs_done += 1
                    if outcome == "ok":
                        self._avg_job_s = took if self._avg_job_s is None else 0.8 * self._avg_job_s + 0.2 * took
                self.metrics.inc("bagel_jobs_total", kind=job.kind, outcome=outcome or "error")
                job = None  # drop references to the request's images before waiting again


def _outcome_of(e: BaseException) -> str:
    if isinstance(e, JobCancelled):
        return "cancelled"
    if _is_input_error(e):
        return "bad_input"
    return "error"


def _is_input_error(e: BaseException) -> bool:
    from ._engine import INPUT_ERRORS

    return isinstance(e, INPUT_ERRORS)
