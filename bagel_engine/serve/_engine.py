"""The public engine API as the front ends see it (and nothing below it)."""

from __future__ import annotations

from typing import Any

from bagel_engine.params import BagelInputError

INPUT_ERRORS: tuple[type[Exception], ...] = (BagelInputError,)


def load_pipeline(model: str, device: str | None = None, dtype: str | None = None, **options: Any) -> Any:
    import bagel_engine

    return bagel_engine.load(model, device=device, dtype=dtype, **options)
