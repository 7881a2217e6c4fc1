"""Serving a model that runs over several processes (CFG-parallel, tensor parallel, VAE patch parallel): rank 0
serves HTTP, the other ranks follow its calls.

Every rank must make the same pipeline calls in the same order (their collectives pair up). Rank 0's pipeline is
wrapped in :class:`LockstepPipeline`: each task call (``generate`` / ``edit`` / ``understand`` / ``chat`` /
``interleave``) is first broadcast to the other ranks (its arguments, without the callables), which run it in
:func:`follow`. The step callback is where a job is cancelled (a client gone, the server stopping): at each call of
it rank 0 broadcasts whether its own callback raised, and the followers raise too, so every rank leaves the call
at the same step. The other callables (previews, streamed text) stay on rank 0: they run no collective. Jobs run
one at a time (the server's ``--max-batch`` is 1 here: the scheduler would batch rank 0's requests in an order the
followers cannot know). When rank 0 stops serving it tells the followers to stop.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch.distributed as dist

log = logging.getLogger("bagel_engine.serve")

TASKS = ("generate", "edit", "understand", "chat", "interleave")
_STOP = ("stop",)


class FollowerCancelled(Exception):
    """Rank 0 left the call at this step (its job was cancelled): the followers leave it too."""


def _broadcast(obj: Any, group) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _flag(value: int | None, group) -> int:
    return _broadcast(value, group)


class LockstepPipeline:
    """Rank 0's pipeline: its task calls go to every rank (see the module doc); everything else is the pipeline's."""

    def __init__(self, pipe, group=None):
        self._pipe, self._group = pipe, group if group is not None else pipe.engine.lockstep
        self._lock = threading.Lock()
        self._stopped = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._pipe, name)
        if name in TASKS:
            return lambda *args, **kwargs: self._call(name, args, kwargs)
        return attr

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:  # the server's settings (limits) are the pipeline's
            setattr(self._pipe, name, value)

    def _call(self, method: str, args: tuple, kwargs: dict) -> Any:
        user_callback = kwargs.get("callback")
        shipped = {k: v for k, v in kwargs.items() if not callable(v)}
        with self._lock:
            if self._stopped:
                raise RuntimeError("the other ranks were told to stop")
            # rank 0's limits too: a request it refuses, every rank refuses at the same point
            _broadcast(("call", method, args, shipped, user_callback is not None, self._pipe.limits), self._group)
            if user_callback is not None:
                kwargs = dict(kwargs, callback=self._flagged(user_callback))
            return getattr(self._pipe, method)(*args, **kwargs)

    def _flagged(self, callback):
        def call(k: int, n: int) -> None:
            try:
                callback(k, n)
            except BaseException:
                _flag(1, self._group)  # the followers leave the call at this step too
                raise
            _flag(0, self._group)
        return call

    def stop_followers(self) -> None:
        with self._lock:
            if not self._stopped:
                self._stopped = True
                _broadcast(_STOP, self._group)


def follow(pipe, group=None) -> int:
    """A rank other than 0: run rank 0's calls until it says stop; returns the calls run."""
    group = group if group is not None else pipe.engine.lockstep

    def callback(k: int, n: int) -> None:
        if _flag(None, group):
            raise FollowerCancelled(f"rank 0 cancelled its job at step {k}")

    calls = 0
    while True:
        message = _broadcast(None, group)
        if message == _STOP or message[0] != "call":
            return calls
        _, method, args, kwargs, has_callback, limits = message
        pipe.limits = limits
        if has_callback:
            kwargs = dict(kwargs, callback=callback)
        calls += 1
        try:
            getattr(pipe, method)(*args, **kwargs)
        except FollowerCancelled:
            pass
        except Exception as e:  # noqa: BLE001 - rank 0 meets the same error (the same inputs) and answers it
            log.debug("follower: %s failed as on rank 0: %s", method, e)
