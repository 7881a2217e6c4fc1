"""Memory sizes as people write them ("24GB", "24GiB", "12000MB") and as the project prints them."""

from __future__ import annotations

import re

GB = 1e9


def parse_size(text: str | int | float) -> int:
    """Bytes from "24GB", "24 GiB", "24G", "80", "12000MB" (a bare number means GB, as cards are sold)."""
    if isinstance(text, (int, float)):
        return int(text * GB) if text < 10_000 else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", str(text).lower())
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 24GB, 24GiB or 12000MB")
    value, prefix, binary = float(m.group(1)), m.group(2) or "g", bool(m.group(3))
    power = "kmgt".index(prefix) + 1
    return int(value * (1024 if binary else 1000) ** power)


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.95 * GB else f"{n / 1e6:.0f} MB"
