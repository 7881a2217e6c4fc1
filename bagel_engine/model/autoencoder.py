"""The FLUX.1 autoencoder (VAE) that BAGEL uses to map images to and from its latent space.

A pure ``nn.Module``: no file I/O and no random draws. Parameter names and shapes match the
official ``ae.safetensors`` exactly (``encoder.*`` / ``decoder.*``, no prefix), so the file loads
with ``load_state_dict(strict=True)``.

Layout (spec section 6.1), with ``C_i = ch * ch_mult[i]``:

* Encoder: ``conv_in`` -> per level ``i``: ``num_res_blocks`` ResnetBlocks to ``C_i``, then a
  stride-2 Downsample except at the last level -> mid (ResnetBlock, AttnBlock, ResnetBlock) ->
  GroupNorm -> swish -> ``conv_out`` to ``2 * z_channels`` (mean | logvar).
* Decoder: ``conv_in`` from ``z_channels`` -> the same mid section -> levels from the deepest to
  the shallowest: ``num_res_blocks + 1`` ResnetBlocks to ``C_i``, then a nearest x2 Upsample except
  at level 0 -> GroupNorm -> swish -> ``conv_out`` to ``out_ch``. The levels are stored as
  ``decoder.up.{i}`` by level index ``i`` (so ``up.0`` is the shallowest, run last).

The posterior is sampled by the caller: :meth:`AutoEncoder.latent_from_moments` takes the standard
normal ``eps`` explicitly (the official code draws it with ``torch.randn_like(mean)``) and does not
clamp ``logvar`` (the official ``DiagonalGaussian`` does not either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bagel_engine.model.config import VAEConfig

__all__ = ["AutoEncoder", "Encoder", "Decoder", "ResnetBlock", "AttnBlock", "Downsample", "Upsample"]

_GROUPS = 32
_EPS = 1e-6


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=_EPS, affine=True)


def _swish(x: Tensor) -> Tensor:
    # Written as x * sigmoid(x), the reference's exact formula (F.silu may round differently).
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv3x3, twice, plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 q/k/v/out projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1, H*W, C)
            return t.reshape(b, 1, c, hgt * wid).transpose(-1, -2).contiguous()

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad one column on the right and one row at the bottom, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (``mid.block_1/attn_1/block_2``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block.{j}`` ResnetBlocks, then an optional resampler.

    The resampler is registered under its official name (``downsample`` in the encoder, ``upsample``
    in the decoder) so the state dict keys match the checkpoint.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, resample: str | None = None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks)
        )
        self.resample_name = resample
        if resample == "downsample":
            self.downsample = Downsample(out_channels)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels)
        elif resample is not None:
            raise ValueError(f"unknown resampler {resample!r}")

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/d, W/d)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        prev = cfg.ch
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            self.down.append(_Level(prev, width, cfg.num_res_blocks, None if last else "downsample"))
            prev = width
        self.mid = _Mid(prev)
        self.norm_out = _norm(prev)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Unscaled latent (B, z_channels, h, w) -> image (B, out_ch, h*d, w*d)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        prev = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, prev, kernel_size=3, padding=1)
        self.mid = _Mid(prev)
        # Built deepest first (that fixes each level's input width), stored by level index.
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            levels.insert(0, _Level(prev, widths[i], cfg.num_res_blocks + 1, "upsample" if i else None))
            prev = widths[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(prev)
        self.conv_out = nn.Conv2d(prev, cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # deepest (last index) first
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX autoencoder with BAGEL's latent scaling ``z_scaled = scale_factor * (z - shift_factor)``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.scale_factor = float(cfg.scale_factor)
        self.shift_factor = float(cfg.shift_factor)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode_moments(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> raw encoder output (B, 2*z_channels, H/d, W/d): mean | logvar.

        ``x`` is cast to the module's dtype; the output has that dtype.
        """
        return self.encoder(x.to(self.dtype))

    def latent_from_moments(self, moments: Tensor, eps: Tensor | None = None) -> Tensor:
        """Scaled latent from the moments: ``scale * (mean + exp(logvar/2) * eps - shift)``.

        ``eps`` is the standard normal posterior draw, shaped like the mean (the official code uses
        ``torch.randn_like(mean)``); with ``eps=None`` the posterior mean is used. ``logvar`` is not
        clamped, as in the official code.
        """
        mean, logvar = torch.chunk(moments, 2, dim=1)
        if eps is None:
            z = mean
        else:
            if eps.shape != mean.shape:
                raise ValueError(f"eps has shape {tuple(eps.shape)}, expected {tuple(mean.shape)}")
            z = mean + torch.exp(0.5 * logvar) * eps.to(device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (z - self.shift_factor)

    def encode(self, x: Tensor, eps: Tensor | None = None) -> Tensor:
        """``latent_from_moments(encode_moments(x), eps)``."""
        return self.latent_from_moments(self.encode_moments(x), eps)

    def decode(self, z_scaled: Tensor) -> Tensor:
        """Scaled latent (B, z_channels, h, w) -> image (B, out_ch, h*d, w*d), roughly in [-1, 1].

        The unscaling runs in the input's dtype; the result is then cast to the module's dtype.
        """
        z = z_scaled / self.scale_factor + self.shift_factor
        return self.decoder(z.to(self.dtype))
