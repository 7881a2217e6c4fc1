"""What a written picture says about itself: PNG text chunks with the prompt, task, seed, knobs and
model, as image tools write them (``Software``, ``prompt``, ``parameters``). Every front end that writes
a PNG (the CLI, batch jobs, the server) uses this module.

    from bagel_engine.image_metadata import read_png_metadata
    read_png_metadata("fox.png")  # {"task": "t2i", "prompt": "...", "seed": 42, "parameters": {...}, "model": ...}
"""

from __future__ import annotations

import io
import json
from importlib import metadata as _dist
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

KEYS = ("task", "prompt", "negative_prompt", "seed", "model", "parameters")


def _version() -> str:
    try:
        return _dist.version("bagel-engine")
    except _dist.PackageNotFoundError:
        return "dev"


def describe(task: str, prompt: str | None, output: Any = None, model: str | None = None) -> dict[str, Any]:
    """The metadata of one picture: ``output`` is the pipeline's ``BagelOutput`` (its seed and params)."""
    params = dict(getattr(output, "params", None) or {})
    seed = params.pop("seed", getattr(output, "seed", None))
    meta = {"task": task, "prompt": prompt, "seed": seed, "model": model,
            "negative_prompt": params.pop("negative_prompt", None), "parameters": params or None}
    return {k: v for k, v in meta.items() if v is not None}


def png_info(meta: dict[str, Any] | None) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"bagel-engine {_version()}")
    for key, value in (meta or {}).items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        info.add_itxt(key, text)  # iTXt: UTF-8 prompts
    return info


def encode_png(image: Image.Image, meta: dict[str, Any] | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(meta))
    return buffer.getvalue()


# file suffix -> PIL format; the suffix of an output name chooses how the picture is written
SUFFIX_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def encode_image(image: Image.Image, fmt: str = "PNG", meta: dict[str, Any] | None = None) -> bytes:
    """``image`` as PNG (with ``meta`` in its text chunks), JPEG (quality 95) or WebP (lossless)."""
    fmt = fmt.upper()
    if fmt == "PNG":
        return encode_png(image, meta)
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image = image.convert("RGB") if image.mode not in ("RGB", "L") else image
        image.save(buffer, format="JPEG", quality=95)
    elif fmt == "WEBP":
        image.save(buffer, format="WEBP", lossless=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}: use PNG, JPEG or WEBP")
    return buffer.getvalue()


def read_png_metadata(source: str | Path | bytes | Image.Image) -> dict[str, Any]:
    """The metadata a PNG carries (numbers and JSON values decoded), ``{}`` when none."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    text = dict(getattr(image, "text", {}) or {})
    out: dict[str, Any] = {}
    for key in KEYS:
        if key in text:
            value = text[key]
            if key in ("seed", "parameters"):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            out[key] = value
    if "Software" in text:
        out["software"] = text["Software"]
    return out
