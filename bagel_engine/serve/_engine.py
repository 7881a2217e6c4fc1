"""The public engine API as the front ends see it (and nothing below it)."""

from __future__ import annotations

from typing import Any

from bagel_engine.params import BagelInputError as _ParamsInputError

try:  # the public API re-exports the class; accept both spellings should they ever differ
    from bagel_engine import BagelInputError as _ApiInputError
except ImportError:  # pragma: no cover - only while the public API is being written
    _ApiInputError = _ParamsInputError

INPUT_ERRORS: tuple[type[Exception], ...] = tuple({_ParamsInputError, _ApiInputError})


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None, **options: Any) -> Any:
    import bagel_engine

    return bagel_engine.load(model, device=device, dtype=dtype, **options)
