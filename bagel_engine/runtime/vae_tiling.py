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

VAE patch parallelism (``group=``): the ranks of a process group each run a share of the tiles and
the weighted sums are added over the group (all-reduce), so every rank gets the picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


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
              tiling: Tiling, h: int, w: int, out_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums (numerator (B, out_channels, H, W), denominator (H, W)) of ``fn`` over the ``boxes`` (in
    latent positions) of ``x`` (B, C, h*in_scale, w*in_scale): the share of the blend one rank computes."""
    num = torch.zeros(x.shape[0], out_channels, h * out_scale, w * out_scale, dtype=torch.float32, device=x.device)
    den = torch.zeros(h * out_scale, w * out_scale, dtype=torch.float32, device=x.device)
    for box in boxes:
        y0, y1, x0, x1 = box
        out = fn(x[:, :, y0 * in_scale:y1 * in_scale, x0 * in_scale:x1 * in_scale]).float()
        wt = weights(box, h, w, tiling.overlap, out_scale).to(out.device)
        num[:, :, y0 * out_scale:y1 * out_scale, x0 * out_scale:x1 * out_scale] += out * wt
        den[y0 * out_scale:y1 * out_scale, x0 * out_scale:x1 * out_scale] += wt
    return num, den


def _blend(fn, x: torch.Tensor, tiling: Tiling, h: int, w: int, in_scale: int, out_scale: int, out_channels: int,
           group) -> torch.Tensor:
    boxes = tiling.split(h, w)
    if group is not None:  # patch parallel: every rank its share of the tiles, then the sums everywhere
        boxes = boxes[dist.get_rank(group)::dist.get_world_size(group)]
    num, den = run_tiles(fn, x, boxes, in_scale, out_scale, tiling, h, w, out_channels)
    if group is not None:
        dist.all_reduce(num, group=group)
        dist.all_reduce(den, group=group)
    return (num / den).to(x.dtype)


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tiling: Tiling, downsample: int,
                 out_channels: int = 3, group=None) -> torch.Tensor:
    """``decode`` (latent (B, C, h, w) -> image (B, 3, h*d, w*d)) run tile by tile and blended. With a
    process ``group`` (VAE patch parallel) each rank decodes a share of the tiles and every rank gets the
    picture (equal to one rank's tiling within float rounding: the sums are added in another order)."""
    h, w = z.shape[-2:]
    if not tiling.needed(h, w):
        return decode(z)
    return _blend(decode, z, tiling, h, w, 1, downsample, out_channels, group)


def encode_tiled(encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling, downsample: int,
                 out_channels: int, group=None) -> torch.Tensor:
    """``encode`` (image (B, 3, H, W) -> moments (B, out_channels, H/d, W/d)) run tile by tile and blended; the
    tiles are the same latent tiles as the decode's, ``downsample`` pixels a position; ``group`` as there."""
    h, w = x.shape[-2] // downsample, x.shape[-1] // downsample
    if not tiling.needed(h, w):
        return encode(x)
    return _blend(encode, x, tiling, h, w, downsample, 1, out_channels, group)
