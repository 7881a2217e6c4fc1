"""OpenAI-compatible HTTP server for BAGEL (extra ``serve``): ``create_app(pipe, ServeSettings(...))``."""

from __future__ import annotations

from .settings import ServeSettings
from .worker import Job, JobCancelled, ModelWorker, QueueFull

__all__ = ["ServeSettings", "ModelWorker", "Job", "JobCancelled", "QueueFull", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`bagel_engine.serve.app.create_app` (imported lazily: FastAPI is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
