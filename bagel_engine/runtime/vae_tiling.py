"""Tiled VAE encode and decode: a large image through the autoencoder in overlapping tiles, blended.

The FLUX autoencoder's peak memory grows with the image's area (its mid block attends over every
latent position, its last levels run at full resolution), so a 2048x2048 decode can need more memory
than the denoising. Tiling runs it on overlapping tiles of a fixed size and blends them: each tile's
output is weighted by a ramp that falls to zero towards the sides it shares with a neighbour
(flat on the image's own border), and the weighted outputs are summed and divided by the summed
weights (the MultiDiffusion / diffusers way, order free).

It is an approximation: inside a tile the mid block sees only that tile, and convolutions near a
tile's inner side see zero padding instead of the neighbour. The overlap hides both. The bound
measured on the demo model is in tests/test_vae_tiling.py (and docs/memory.md).

``Tiling.split`` is also the unit of VAE patch parallelism: ranks each run a share of the tiles and
the sums are combined (``blend`` takes the tiles in any grouping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Tiling:
    """Tiles of ``tile`` latent positions a side overlapping by ``overlap`` (in latent positions)."""

    tile: int = 32  # BAGEL-7B-MoT: 32 latent positions = 256 px
    overlap: int = 8

    def __post_init__(self):
        if self.tile < 2 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"a tiling needs tile >= 2 and 0 <= overlap < tile, got tile={self.tile} "
                             f"overlap={self.overlap}")

    def starts(self, size: int) -> list[int]:
        """Tile starts along one axis of ``size`` latent positions: every ``tile - overlap``, the last tile
        ending at the border (so every tile has the full size when ``size >= tile``)."""
        if size <= self.tile:
            return [0]
        stride = self.tile - self.overlap
        out = list(range(0, size - self.tile, stride))
        out.append(size - self.tile)
        return out

    def split(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """The tiles of an ``h`` x ``w`` latent: (y0, y1, x0, x1), row by row."""
        t = self.tile
        return [(y, min(y + t, h), x, min(x + t, w)) for y in self.starts(h) for x in self.starts(w)]

    def needed(self, h: int, w: int) -> bool:
        return h > self.tile or w > self.tile


def _ramp(n: int, lo_open: bool, hi_open: bool, overlap: int) -> torch.Tensor:
    """Weights along one side of a tile of ``n`` samples: rising over ``overlap`` samples from a side shared
    with a neighbour (``*_open``), flat elsewhere. Never zero, so every sample has weight."""
    w = torch.ones(n, dtype=torch.float32)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        k = min(overlap, n)
        if lo_open:
            w[:k] = torch.minimum(w[:k], ramp[:k])
        if hi_open:
            w[n - k:] = torch.minimum(w[n - k:], ramp[:k].flip(0))
    return w


def weights(box: tuple[int, int, int, int], h: int, w: int, overlap: int, scale: int) -> torch.Tensor:
    """The (H, W) blend weights of one tile's output at ``scale`` output samples per latent position."""
    y0, y1, x0, x1 = box
    wy = _ramp((y1 - y0) * scale, y0 > 0, y1 < h, overlap * scale)
    wx = _ramp((x1 - x0) * scale, x0 > 0, x1 < w, overlap * scale)
    return wy[:, None] * wx[None, :]


def run_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, boxes, in_scale: int, out_scale: int,
              tiling: Tiling, h: int, w: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weighted sums (numerator, denominator) of ``fn`` over the ``boxes`` (in latent positions) of ``x``
    (B, C, h*in_scale, w*in_scale): the part of the blend one rank computes. None when ``boxes`` is empty."""
    num = den = None
    for box in boxes:
        y0, y1, x0, x1 = box
        out = fn(x[:, :, y0 * in_scale:y1 * in_scale, x0 * in_scale:x1 * in_scale]).float()
        if num is None:
            b, c = out.shape[:2]
            num = torch.zeros(b, c, h * out_scale, w * out_scale, dtype=torch.float32, device=out.device)
            den = torch.zeros(h * out_scale, w * out_scale, dtype=torch.float32, device=out.device)
        wt = weights(box, h, w, tiling.overlap, out_scale).to(out.device)
        num[:, :, y0 * out_scale:y1 * out_scale, x0 * out_scale:x1 * out_scale] += out * wt
        den[y0 * out_scale:y1 * out_scale, x0 * out_scale:x1 * out_scale] += wt
    return num, den


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tiling: Tiling,
                 downsample: int) -> torch.Tensor:
    """``decode`` (latent (B, C, h, w) -> image (B, 3, h*d, w*d)) run tile by tile and blended."""
    h, w = z.shape[-2:]
    if not tiling.needed(h, w):
        return decode(z)
    num, den = run_tiles(decode, z, tiling.split(h, w), 1, downsample, tiling, h, w)
    return (num / den).to(z.dtype if z.is_floating_point() else torch.float32)


def encode_tiled(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling,
                 downsample: int) -> torch.Tensor:
    """``encode`` (image (B, 3, H, W) -> moments (B, 2C, H/d, W/d)) run tile by tile and blended; the
    tiles are the same latent tiles as the decode's, ``downsample`` pixels a position."""
    h, w = x.shape[-2] // downsample, x.shape[-1] // downsample
    if not tiling.needed(h, w):
        return encode(x)
    num, den = run_tiles(encode, x, tiling.split(h, w), downsample, 1, tiling, h, w)
    return (num / den).to(x.dtype)
