"""Web UI for BAGEL (extra ``ui``): ``build_ui(worker, pipe, settings)`` returns a gradio Blocks app."""

from __future__ import annotations

__all__ = ["build_ui", "launch_ui"]


def build_ui(*args, **kwargs):
    from .app import build_ui as _build_ui

    return _build_ui(*args, **kwargs)


def launch_ui(*args, **kwargs):
    from .app import launch_ui as _launch_ui

    return _launch_ui(*args, **kwargs)
