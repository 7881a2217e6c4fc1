"""Serving replicas on Ray: N model workers, each a Ray actor holding one pipeline (on its own GPU(s), or the CPU),
behind the one OpenAI-compatible front (``bagel serve --replicas N [--ray-address ADDR]``).

:class:`ReplicaPool` stands where the server's pipeline stands. Its task methods (``generate`` / ``edit`` /
``understand`` / ``chat`` / ``interleave``) go to the replica with the fewest calls in flight, so the server's
worker, queue and 429, cancellation, streaming and the web UI are the same code as with one in-process model (the
front's worker runs ``max_batch`` jobs per replica; each replica batches its own step by step).

Inside a replica a call runs in a thread of the actor; what the callables of the call would have seen comes back
as a Ray streaming generator of event lists:

- ``("step", k, n)``: the step callback. The front calls the job's own callback, which raises once the job is
  cancelled (its client left, the server stops); the pool then tells the replica, which stops the call at its
  next step.
- ``("text", piece)``: streamed text (``on_text``).
- ``("preview", k, n, image)``: a live preview. Decoding one costs a VAE pass, so the replica decodes only the
  steps the job's ``on_step`` asks for through its ``wants(step, total)`` attribute (:func:`wants_previews`);
  an ``on_step`` without it gets every step's.
- ``("done", result)`` or ``("error", exception)``: the end (a bad input is the same ``BagelInputError`` as in
  process, so the server still answers 400).

A replica that dies (its process killed, out of memory, its node gone) fails the calls it had in flight with
:class:`ReplicaFailed` (the request answers 503 at once, it does not hang), and Ray restarts it, which loads the
model again; meanwhile the pool sends new calls to the replicas that are up. Nothing here is a transport of our
own: the calls, the streams and the restarts are Ray's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .worker import JobCancelled

log = logging.getLogger("bagel_engine.serve")

TASKS = ("generate", "edit", "understand", "chat", "interleave")
_CALLABLES = ("callback", "on_text", "on_step")


class ReplicaFailed(RuntimeError):
    """The replica running a call died (or could not be reached) before answering; Ray restarts it."""


def wants_previews(on_step: Callable, wants: Callable[[int, int], bool]) -> Callable:
    """Mark a preview callback with the steps it uses (``wants(step, total) -> bool``, picklable): a replica then
    decodes only those steps' pictures instead of every step's."""
    on_step.wants = wants  # type: ignore[attr-defined]
    return on_step


@dataclass
class RemotePreview:
    """A replica's live preview as ``on_step`` sees it in process (step, total, ``image()``)."""

    step: int
    total: int
    picture: Any

    def image(self) -> Any:
        return self.picture


def _every_step(step: int, total: int) -> bool:
    return True


def _portable(e: BaseException) -> BaseException:
    """``e`` with the replica's traceback as a note, if it survives pickling (to go back to the front); else a
    RuntimeError that says what it was. Never raises."""
    try:
        e.add_note("on the replica (pid %d):\n%s" % (os.getpid(), "".join(traceback.format_exception(e))))
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception that does not pickle (or print)
        try:
            text = str(e)
        except Exception:  # noqa: BLE001
            text = "(unprintable)"
        return RuntimeError(f"{type(e).__name__} on the replica: {text}")


def check_resources(replicas: int, cpus: float, gpus: float, have: dict) -> None:
    """Refuse replicas that a cluster of resources ``have`` (Ray's ``cluster_resources()``) cannot hold."""
    for what, each in (("CPU", cpus), ("GPU", gpus)):
        if each and replicas * each > have.get(what, 0) + 1e-9:
            raise ValueError(f"{replicas} replica(s) of {each:g} {what} each need {replicas * each:g} {what}, and "
                             f"this machine's Ray has {have.get(what, 0):g}: fewer replicas, or less per replica "
                             f"(--{what.lower()}s-per-replica)")


class Replica:
    """One model worker (the body of the Ray actor; also usable in process, which the tests use)."""

    def __init__(self, model: str, load_options: dict, max_batch: int = 1, max_step_tokens: int | None = None):
        from ._engine import load_pipeline

        self.pipe = load_pipeline(model, **load_options)
        self.batching = max_batch > 1 and hasattr(self.pipe, "start_batching")
        if self.batching:  # the scheduler runs the concurrent calls step by step, from one thread
            self.pipe.start_batching(max_batch, max_step_tokens)
        self._one_at_a_time = threading.Lock()  # without it, calls take turns: the model is not thread-safe
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.calls = self.cancelled = 0
        log.info("replica (pid %d) loaded %s", os.getpid(), model)

    def info(self) -> dict:
        pipe = self.pipe
        return {"pid": os.getpid(), "model_name": getattr(pipe, "model_name", None), "config": pipe.config,
                "task_defaults": getattr(pipe, "task_defaults", None), "calls": self.calls,
                "cancelled": self.cancelled}

    def cancel(self, call_id: str) -> None:
        with self._lock:
            event = self._cancel.get(call_id)
        if event is not None:
            event.set()

    def call(self, call_id: str, method: str, args: tuple, kwargs: dict, flags: dict, limits: Any):
        """Run one task call; yields lists of events (see the module doc) until its end."""
        if method not in TASKS:
            raise ValueError(f"not a task: {method!r}")
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        with self._lock:
            self._cancel[call_id] = cancel
            self.calls += 1
        kwargs = dict(kwargs)
        if flags.get("callback"):
            def callback(k: int, n: int) -> None:
                events.put(("step", int(k), int(n)))
                if cancel.is_set():
                    with self._lock:
                        self.cancelled += 1
                    raise JobCancelled(f"cancelled at step {k}/{n}")
            kwargs["callback"] = callback
        def stop_if_cancelled() -> None:
            if cancel.is_set():
                raise JobCancelled("cancelled")

        if flags.get("on_text"):
            def on_text(piece: str) -> None:
                events.put(("text", piece))
                stop_if_cancelled()
            kwargs["on_text"] = on_text
        wants = flags.get("previews")
        if wants is not None:
            def on_step(preview: Any) -> None:
                stop_if_cancelled()
                if wants(preview.step, preview.total):
                    events.put(("preview", preview.step, preview.total, preview.image()))
            kwargs["on_step"] = on_step

        def run() -> None:
            end: tuple = ("error", RuntimeError("the replica's call ended without an answer"))
            try:
                with contextlib.nullcontext() if self.batching else self._one_at_a_time:
                    stop_if_cancelled()  # cancelled while it waited for its turn
                    if limits is not None and hasattr(self.pipe, "limits"):
                        self.pipe.limits = limits
                    end = ("done", getattr(self.pipe, method)(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the front
                end = ("error", _portable(e))
            finally:  # always an end event: the stream never waits for ever
                events.put(end)

        threading.Thread(target=run, name=f"bagel-replica-{method}", daemon=True).start()
        try:
            while True:
                batch = [events.get()]
                while True:  # what piled up meanwhile goes as one list: fewer objects for many tokens
                    try:
                        batch.append(events.get_nowait())
                    except queue.Empty:
                        break
                yield batch
                if batch[-1][0] in ("done", "error"):
                    return
        finally:  # the front dropped the stream (or it ended): a call still running stops at its next step
            cancel.set()
            with self._lock:
                self._cancel.pop(call_id, None)


class ReplicaPool:
    """N replicas of one model on Ray, with the pipeline's task methods (see the module doc).

    ``load_options``: what ``bagel_engine.load`` takes besides the model (device, dtype, quantize, offload, ...),
    the same for every replica. ``gpus_per_replica`` / ``cpus_per_replica``: each actor's Ray resources (Ray sets
    ``CUDA_VISIBLE_DEVICES`` for it). ``ray_address``: an existing cluster (``auto``, ``ray://host:10001``), else a
    local one is started (``ray_init`` its extra ``ray.init`` arguments). ``max_batch``: calls each replica runs at
    once (batched by its scheduler)."""

    def __init__(self, model: str, replicas: int, load_options: dict | None = None, *, ray_address: str | None = None,
                 gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0, max_batch: int = 1,
                 max_step_tokens: int | None = None, max_restarts: int = -1, ray_init: dict | None = None,
                 start_timeout: float = 900.0, probe_every: float = 5.0, probe_timeout: float = 10.0,
                 down_wait: float = 30.0, drain_timeout: float = 120.0):
        try:
            import ray
        except ImportError:
            raise ImportError("serving replicas needs Ray: pip install 'bagel-engine[ray]'") from None
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self._ray = ray
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            ray.init(address=ray_address or "local", **{"include_dashboard": False, "log_to_driver": True, **(ray_init or {})})
        if self._own_ray and ray_address is None:  # a local cluster does not grow: say so now, not after a timeout
            try:
                check_resources(replicas, cpus_per_replica, gpus_per_replica, ray.cluster_resources())
            except ValueError:
                self.close()
                raise
        self.limits: Any = None  # the server's per-request limits, sent with every call (a restarted replica too)
        actor = ray.remote(concurrency_groups={"control": 2})(Replica).options(
            num_gpus=gpus_per_replica, num_cpus=cpus_per_replica, max_restarts=max_restarts, max_task_retries=0,
            max_concurrency=max_batch + 8)
        self._new_actor = lambda: actor.remote(model, dict(load_options or {}), max_batch, max_step_tokens)
        self._actors = [self._new_actor() for _ in range(replicas)]
        self.max_batch = max_batch
        self._inflight = [0] * replicas
        self._down: dict[int, float] = {}  # replica -> when it failed; up again once it answers
        self._turn = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a replica has fewer than max_batch calls running
        self.failures = self.replaced = 0
        self.probe_every, self.probe_timeout = probe_every, probe_timeout
        self.down_wait, self.drain_timeout = down_wait, drain_timeout
        self._probes: dict[int, tuple[Any, float]] = {}  # replica -> (its pending info call, when it was sent)
        self._replaced_at: dict[int, float] = {}
        self._died_at: dict[int, float] = {}  # replica -> when a probe first met ActorDiedError
        self._closed = threading.Event()
        log.info("starting %d replica(s) of %s on Ray ...", replicas, model)
        try:
            infos = ray.get([a.info.remote() for a in self._actors], timeout=start_timeout)
        except Exception:
            self.close()
            raise
        first = infos[0]
        self.model_name = first["model_name"] or model
        self.config = first["config"]
        self.task_defaults = first["task_defaults"]
        self.pids = [info["pid"] for info in infos]
        log.info("%d replica(s) up (pids %s)", replicas, ", ".join(map(str, self.pids)))
        self._monitor_thread = threading.Thread(target=self._monitor, name="bagel-replica-monitor", daemon=True)
        self._monitor_thread.start()

    # -- the pipeline's task methods -----------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in TASKS:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        raise AttributeError(name)

    @property
    def replicas(self) -> int:
        return len(self._actors)

    def status(self) -> list[dict]:
        """Each replica: up or restarting, and its calls in flight (for /health)."""
        with self._lock:
            return [{"replica": i, "up": i not in self._down, "in_flight": self._inflight[i]}
                    for i in range(len(self._actors))]

    def info(self, index: int, timeout: float = 60.0) -> dict:
        """What replica ``index`` reports (its pid, calls run and cancelled); waits while it restarts."""
        return self._ray.get(self._control(self._actors[index].info).remote(), timeout=timeout)

    def close(self) -> None:
        if hasattr(self, "_closed"):
            with self._lock:
                self._closed.set()
            monitor = getattr(self, "_monitor_thread", None)
            if monitor is not None and monitor is not threading.current_thread():
                monitor.join(self.probe_timeout + 5)
        for a in getattr(self, "_actors", []):
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []
        if getattr(self, "_own_ray", False) and self._ray.is_initialized():
            self._ray.shutdown()

    # -- one call ------------------------------------------------------------------------------
    def _pick(self) -> int:
        """The up replica with the fewest calls in flight (ties in turn), waiting while each runs ``max_batch``; with
        none up for ``down_wait`` seconds, ReplicaFailed."""
        deadline = time.monotonic() + self.down_wait
        with self._room:
            while True:
                if self._closed.is_set():
                    raise ReplicaFailed("the replicas are shut down")
                up = [i for i in range(len(self._actors)) if i not in self._down]
                if not up:
                    if time.monotonic() > deadline:
                        raise ReplicaFailed(f"no replica is up (all {len(self._actors)} restarting or gone for "
                                            f"{self.down_wait:g} s): try again later")
                    self._room.wait(0.5)
                    continue
                self._turn += 1  # ties go round: sequential calls spread over the replicas too
                index = min(up, key=lambda i: (self._inflight[i], (i - self._turn) % len(self._actors)))
                if self._inflight[index] < self.max_batch:
                    self._inflight[index] += 1
                    return index
                self._room.wait(1.0)

    def _release(self, index: int) -> None:
        with self._room:
            self._inflight[index] -= 1
            self._room.notify()

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        ray = self._ray
        kwargs = dict(kwargs)
        callback, on_text, on_step = (kwargs.pop(name, None) for name in _CALLABLES)
        stray = [k for k, v in kwargs.items() if callable(v)]
        if stray:
            raise TypeError(f"{method}: {', '.join(stray)} cannot go to a replica (a callable); "
                            f"only {', '.join(_CALLABLES)} are relayed")
        flags = {"callback": callback is not None, "on_text": on_text is not None,
                 "previews": None if on_step is None else getattr(on_step, "wants", _every_step)}
        index = self._pick()
        call_id, actor, stream, ended = uuid.uuid4().hex, None, None, False
        try:
            actor = self._actors[index]
            stream = actor.call.options(num_returns="streaming").remote(call_id, method, args, kwargs, flags,
                                                                        self.limits)
            for ref in stream:
                for event in ray.get(ref):
                    kind = event[0]
                    if kind == "step":
                        callback(event[1], event[2])  # raises once the job is cancelled
                    elif kind == "text":
                        on_text(event[1])
                    elif kind == "preview":
                        on_step(RemotePreview(event[1], event[2], event[3]))
                    elif kind in ("done", "error"):
                        ended = True
                        if kind == "error":
                            raise event[1]
                        return event[1]
            raise ReplicaFailed(f"replica {index} ended the call without an answer")
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            ended = True  # nothing left to wait for on that replica
            self._failed(index, actor, e)
            raise ReplicaFailed(f"replica {index} failed while running this request ({type(e).__name__}); Ray "
                                "restarts it and the other replicas take new requests: send it again") from None
        except ray.exceptions.RayTaskError as e:  # the replica's code failed outside the call: its own error
            ended = True
            raise e.as_instanceof_cause() from None
        finally:
            if ended or stream is None:
                self._release(index)
            else:  # left early (cancelled, or a callback failed): stop it there, and count it until it has stopped
                try:
                    self._control(actor.cancel).remote(call_id)
                except Exception:  # noqa: BLE001 - the drain below ends all the same
                    log.warning("replica %d: could not send the cancel", index, exc_info=True)
                threading.Thread(target=self._drain, args=(stream, index, actor), daemon=True,
                                 name=f"bagel-replica-{index}-drain").start()

    def _drain(self, stream: Any, index: int, actor: Any) -> None:
        """Wait (at most ``drain_timeout``) for a cancelled call to stop on its replica; a replica that does not
        stop by then is restarted (Ray kills the process and starts it again), so its slot cannot stay taken."""
        deadline = time.monotonic() + self.drain_timeout
        try:
            while True:
                ready, _ = self._ray.wait([stream], timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    log.warning("replica %d did not stop a cancelled call in %g s: restarting it", index,
                                self.drain_timeout)
                    self._ray.kill(actor, no_restart=False)
                    return
                ref = next(stream)
                if any(event[0] in ("done", "error") for event in self._ray.get(ref)):
                    return
        except Exception:  # noqa: BLE001 - the stream ended or the replica died meanwhile: the call is over
            pass
        finally:
            self._release(index)

    @staticmethod
    def _control(method: Any) -> Any:
        """``actor.cancel`` / ``actor.info`` in their own concurrency group: never queued behind the calls."""
        return method.options(concurrency_group="control")

    def _failed(self, index: int, actor: Any, error: BaseException) -> None:
        """A call found replica ``index`` gone: no new calls go there until the monitor hears from it again."""
        with self._lock:
            self.failures += 1
            if index in self._down or self._actors[index] is not actor:  # already known, or already replaced
                return
            self._down[index] = time.monotonic()
        log.warning("replica %d failed (%s); waiting for Ray to restart it", index, error)

    # -- the monitor ---------------------------------------------------------------------------
    def _monitor(self) -> None:
        """Every ``probe_every`` seconds each replica is asked for its info (one question pending at a time): one
        that answers is up; one silent for ``probe_timeout`` (restarting, loading its model) is down; one that Ray
        says is dead for good (its model failed to load, or a question sent after its death fails too: a question to
        a replica Ray is restarting waits for it) is replaced by a new actor, at most every 30 s. So a replica that
        dies while idle is seen too, not only by the request that meets it."""
        while not self._closed.wait(self.probe_every):
            try:
                self._probe_round()
            except Exception:  # noqa: BLE001 - the monitor goes on whatever one round meets
                if not self._closed.is_set():
                    log.exception("replica monitor")

    def _probe_round(self) -> None:
        ray, now = self._ray, time.monotonic()
        for i, actor in enumerate(list(self._actors)):
            if i not in self._probes:
                self._probes[i] = (self._control(actor.info).remote(), now)
        refs = [ref for ref, _ in self._probes.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(1.0, self.probe_timeout))
        ready = set(ready)
        for i, (ref, sent) in list(self._probes.items()):
            if ref not in ready:
                if time.monotonic() - sent >= self.probe_timeout:
                    self._mark(i, up=False, why="no answer", sent=sent)
                continue
            del self._probes[i]
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError as e:
                self._mark(i, up=False, why=(str(e).splitlines() or [type(e).__name__])[0], sent=sent)
                if e.actor_init_failed or sent > self._died_at.get(i, float("inf")):
                    self._replace(i)
                else:
                    self._died_at.setdefault(i, time.monotonic())  # dead for good if the next question fails too
            except Exception as e:  # noqa: BLE001 - unavailable for now: Ray is restarting it
                self._mark(i, up=False, why=type(e).__name__, sent=sent)
            else:
                self._died_at.pop(i, None)
                self._mark(i, up=True, sent=sent)

    def _mark(self, index: int, up: bool, why: str = "", sent: float = 0.0) -> None:
        with self._room:
            if up and index in self._down and sent > self._down[index]:  # an answer older than the failure: stale
                del self._down[index]
                self._room.notify_all()
                log.info("replica %d is up", index)
            elif not up and index not in self._down:
                self._down[index] = time.monotonic()
                log.warning("replica %d is down (%s)", index, why)

    def _replace(self, index: int) -> None:
        with self._lock:
            if self._closed.is_set() or time.monotonic() - self._replaced_at.get(index, -1e9) < 30:
                return
            self._replaced_at[index] = time.monotonic()
            old = self._actors[index]
            try:
                self._ray.kill(old, no_restart=True)  # never two of it
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._actors[index] = self._new_actor()
            self._died_at.pop(index, None)
            self.replaced += 1
        log.warning("replica %d was dead for good: a new one is starting", index)
