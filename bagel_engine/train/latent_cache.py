"""The frozen VAE's posterior moments of the training pictures, computed once per picture.

The trainer never updates the autoencoder, so the encoder's output for a given picture is the same
at every step: keeping its moments (mean and log-variance, ``2C x h x w`` floats) and drawing a new
posterior sample from them each time gives exactly the latents an encode would, without the convolutions
(about a third of a training step for a small model on the CPU). Pictures are keyed by a digest of their
pixels, so the same file under two names, or a picture packed twice, is one entry, and nothing that
changes the pixels (a resize, an augmentation) can hit a stale entry. ``max_mb`` bounds the memory;
when full, new pictures are encoded and not kept.
"""

from __future__ import annotations

import hashlib

import torch


class LatentCache:
    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.entries: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> bytes:
        p = pixels.detach().to("cpu", torch.float32).contiguous()
        return hashlib.blake2b(p.numpy().tobytes(), digest_size=16, person=repr(tuple(p.shape)).encode()[:16]).digest()

    def moments(self, pixels: torch.Tensor, encode) -> torch.Tensor:
        """``encode(pixels) -> moments`` unless this picture's moments are kept; returns the moments."""
        k = self.key(pixels)
        hit = self.entries.get(k)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        out = encode(pixels)
        size = out.numel() * out.element_size()
        if self.bytes + size <= self.max_bytes:
            self.entries[k] = out.detach()
            self.bytes += size
        return out

    def put(self, key: bytes, moments: torch.Tensor) -> None:
        """Keep ``moments`` under ``key`` if the budget allows (a miss already counted by the caller)."""
        size = moments.numel() * moments.element_size()
        if key not in self.entries and self.bytes + size <= self.max_bytes:
            self.entries[key] = moments.detach()
            self.bytes += size

    def stats(self) -> dict:
        return {"entries": len(self.entries), "mb": round(self.bytes / 2**20, 1), "hits": self.hits,
                "misses": self.misses}
