"""The frozen VAE's posterior moments of the training pictures, computed once per picture.

The trainer never updates the autoencoder, so the encoder's output for a given picture is the same
at every step: keeping its moments (mean and log-variance, ``2C x h x w`` floats) and drawing a new
posterior sample from them each time gives exactly the latents an encode would, without the convolutions
(about a third of a training step for a small model on the CPU). Pictures are keyed by a digest of their
pixels, so the same file under two names, or a picture packed twice, is one entry, and nothing that
changes the pixels (a resize, an augmentation) can hit a stale entry. ``max_mb`` bounds the memory;
when full, new pictures are encoded and not kept.

A run keeps its cache across a resume: at every checkpoint the trainer writes the entries added since the last
one to a new shard (``OUTPUT/latent_cache/rank{r}/shard-{n}.safetensors``, so the folder holds each entry once),
and a resumed run reads the shards back instead of encoding every picture again. Each shard records a digest of
the autoencoder's weights; shards of another autoencoder are not read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class LatentCache:
    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.entries: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self.unsaved: list[bytes] = []  # entries not yet in a shard

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
            self.unsaved.append(k)
            self.bytes += size
        return out

    def put(self, key: bytes, moments: torch.Tensor) -> None:
        """Keep ``moments`` under ``key`` if the budget allows (a miss already counted by the caller)."""
        size = moments.numel() * moments.element_size()
        if key not in self.entries and self.bytes + size <= self.max_bytes:
            self.entries[key] = moments.detach()
            self.unsaved.append(key)
            self.bytes += size

    def stats(self) -> dict:
        return {"entries": len(self.entries), "mb": round(self.bytes / 2**20, 1), "hits": self.hits,
                "misses": self.misses}

    def spill(self, folder: Path, vae_digest: str) -> Path | None:
        """Write the entries added since the last spill to a new shard in ``folder`` (atomically); returns it."""
        from safetensors.torch import save_file

        if not self.unsaved:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        number = 1 + max((int(p.stem.split("-")[-1]) for p in folder.glob("shard-*.safetensors")), default=-1)
        path = folder / f"shard-{number:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k.hex(): self.entries[k].to("cpu").contiguous() for k in self.unsaved}, str(tmp),
                  metadata={"vae": vae_digest})
        os.replace(tmp, path)
        self.unsaved = []
        return path

    def restore(self, folder: Path, vae_digest: str, device: torch.device | str = "cpu") -> int:
        """Read the shards of ``folder`` written for this autoencoder, up to the budget; returns the entries read."""
        from safetensors import safe_open

        read = 0
        for path in sorted(folder.glob("shard-*.safetensors")):
            with safe_open(str(path), "pt", device=str(device)) as f:
                if (f.metadata() or {}).get("vae") != vae_digest:
                    log.warning("%s was written for another autoencoder: not read", path)
                    continue
                for name in f.keys():
                    key = bytes.fromhex(name)
                    if key in self.entries:
                        continue
                    moments = f.get_tensor(name)
                    size = moments.numel() * moments.element_size()
                    if self.bytes + size > self.max_bytes:
                        return read
                    self.entries[key] = moments
                    self.bytes += size
                    read += 1
        return read


def module_digest(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
