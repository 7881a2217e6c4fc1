"""Image I/O and the tensor layouts BAGEL uses for images and latents.

Reproduces the official preprocessing: ``pil_img2rgb`` (transparency composited onto white), the
``MaxLongEdgeMinShortEdgeResize`` size rule with PIL bicubic resampling, ``ToTensor`` +
``Normalize(0.5, 0.5)`` to [-1, 1], ViT / latent patchify with the channel fastest inside a patch,
"extrapolate" 2-D position ids, and the truncating float -> uint8 conversion of decoded images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bagel_engine import image_input
from bagel_engine.params import BagelInputError

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336, the official ImageTransform default


def to_rgb(img: Image.Image) -> Image.Image:
    """Official ``pil_img2rgb``: RGBA or images with a ``transparency`` entry are composited onto
    white using their alpha; everything else (including LA, whose alpha is dropped) is
    ``convert("RGB")``."""
    if img.mode == "RGBA" or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _snap(side: int | float, scale: float, stride: int) -> int:
    """round(side*scale), then the nearest multiple of stride (at least stride); Python round."""
    return max(stride, int(round(round(side * scale) / stride) * stride))


def resize_size(
    width: int,
    height: int,
    max_size: int,
    min_size: int,
    stride: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Output (width, height) of the official ``MaxLongEdgeMinShortEdgeResize``.

    Scale so the long side is at most ``max_size`` (never up for that reason) and the short side at
    least ``min_size``; snap both sides to ``stride``. If the area then exceeds ``max_pixels`` the
    sides are rescaled by the *area* ratio (official quirk), and if the long side exceeds
    ``max_size`` they are rescaled once more, each time re-snapping from the current size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = _snap(width, scale, stride), _snap(height, scale, stride)
    if w * h > max_pixels:
        scale = max_pixels / (w * h)
        w, h = _snap(w, scale, stride), _snap(h, scale, stride)
    if max(w, h) > max_size:
        scale = max_size / max(w, h)
        w, h = _snap(w, scale, stride), _snap(h, scale, stride)
    return w, h


def resize_image(
    img: Image.Image, max_size: int, min_size: int, stride: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Resize with PIL bicubic to :func:`resize_size` (what torchvision's ``F.resize`` does on a PIL
    image); returns ``img`` itself when the size does not change."""
    size = resize_size(img.width, img.height, max_size, min_size, stride, max_pixels)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.BICUBIC)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``).
    Non-RGB images go through :func:`to_rgb` first."""
    if img.mode != "RGB":
        img = to_rgb(img)
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return (t.to(torch.float32).div(255) - 0.5) / 0.5


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) (or (1, 3, H, W)) float in about [-1, 1] -> PIL RGB, truncating to uint8 like the
    official decode: ``((x*0.5+0.5).clamp(0,1)*255).to(uint8)``."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(x.shape)}")
    u8 = ((x.detach().float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return Image.fromarray(u8.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(C, p*h, p*w) -> (h*w, p*p*C): raster order over patches, (row, col, channel) inside a patch."""
    if x.dim() != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(x.shape)}")
    c, hh, ww = x.shape
    if hh % p or ww % p:
        raise ValueError(f"size {hh}x{ww} is not a multiple of the patch size {p}")
    h, w = hh // p, ww // p
    return x.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def patchify_image(t: torch.Tensor, patch: int) -> torch.Tensor:
    """(3, H, W) pixels -> (H/patch * W/patch, 3*patch*patch) ViT tokens."""
    return _patchify(t, patch)


def patchify_latent(z: torch.Tensor, p: int) -> torch.Tensor:
    """(C, p*h, p*w) latent -> (h*w, p*p*C) tokens, channel fastest inside each p x p patch."""
    return _patchify(z, p)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int, C: int) -> torch.Tensor:
    """Inverse of :func:`patchify_latent`: (h*w, p*p*C) -> (C, p*h, p*w)."""
    if tokens.shape != (h * w, p * p * C):
        raise ValueError(f"expected tokens of shape {(h * w, p * p * C)}, got {tuple(tokens.shape)}")
    return tokens.reshape(h, w, p, p, C).permute(4, 0, 2, 1, 3).reshape(C, h * p, w * p)


def grid_position_ids(h: int, w: int, max_per_side: int) -> torch.Tensor:
    """Flattened "extrapolate" ids ``row * max_per_side + col`` of an h x w patch grid, raster order."""
    if not (0 < h <= max_per_side and 0 < w <= max_per_side):
        raise ValueError(f"a {h}x{w} patch grid does not fit the {max_per_side}x{max_per_side} position table")
    return (torch.arange(h)[:, None] * max_per_side + torch.arange(w)).flatten()


def check_image(obj: Image.Image | str | Path | bytes | bytearray | memoryview) -> Image.Image:
    """Return a fully decoded PIL image from a PIL image, a path, a URL or encoded bytes
    (``bagel_engine.image_input``'s rules for the user's own files).

    Raises :class:`BagelInputError` when the file is missing or unreadable or the data does not decode.
    """
    if isinstance(obj, Image.Image):
        return obj
    if not isinstance(obj, (str, Path, bytes, bytearray, memoryview)):
        raise BagelInputError(f"expected a PIL image, a file path or image bytes, got {type(obj).__name__}")
    what = f"image {image_input.describe(obj)!r}" if isinstance(obj, (str, Path)) else f"image data ({len(obj)} bytes)"
    return image_input.read_image(obj, image_input.TRUSTED, what)
