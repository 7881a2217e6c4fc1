"""The training objective on a packed sequence: flow-matching MSE on the target images' latents and
cross-entropy on the learnt text, in one forward of the MoT decoder.

Flow convention (the official one): ``x_t = (1 - t) x_0 + t eps`` and the model predicts
``v = eps - x_0``. Each target image draws one time ``t = shift * s / (1 + (shift - 1) s)`` with
``s = sigmoid(n)``, ``n ~ N(0, 1)``; conditioning images sit at ``t = 0`` (clean latents).
Input images are encoded with a posterior sample (as the official training and inference do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.model.bagel import Bagel, PackedInputs
from bagel_engine.runtime import image_transforms
from bagel_engine.train.latent_cache import LatentCache
from bagel_engine.train.packing import PackedBatch


@dataclass
class Losses:
    mse: torch.Tensor | None  # (Nm,) per latent token, mean over its channels
    ce: torch.Tensor | None  # (Nc,) per learnt text token
    timesteps: list[float]  # the flow time of each target image
    velocity: torch.Tensor | None = None  # (Nm, p*p*C) the predicted velocities (float32)
    logits: torch.Tensor | None = None  # (Nc, vocab) the logits of the learnt tokens (float32)

    def total(self, mse_weight: float = 1.0, ce_weight: float = 1.0,
              mse_tokens: float | None = None, ce_tokens: float | None = None,
              ce_token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of the token means. ``*_tokens``: the divisors (the global token counts
        under data parallelism, so that every token weighs the same whatever rank it is on).
        ``ce_token_weights``: the official CE reweighting (``PackedBatch.ce_weights``): the CE is then
        the weighted mean, ``ce_tokens`` being the global sum of the weights."""
        parts = []
        if self.mse is not None and self.mse.numel():
            parts.append(mse_weight * self.mse.sum() / (mse_tokens or self.mse.numel()))
        if self.ce is not None and self.ce.numel():
            if ce_token_weights is not None:
                w = ce_token_weights.to(self.ce.device, self.ce.dtype)
                parts.append(ce_weight * (self.ce * w).sum() / (ce_tokens or w.sum()))
            else:
                parts.append(ce_weight * self.ce.sum() / (ce_tokens or self.ce.numel()))
        if not parts:
            raise ValueError("the batch has nothing to learn (no target image and no learnt text)")
        return sum(parts)


def shifted_time(n: torch.Tensor, shift: float) -> torch.Tensor:
    s = torch.sigmoid(n)
    return shift * s / (1 + (shift - 1) * s)


def encode_latents(vae: AutoEncoder, pixels: torch.Tensor, generator: torch.Generator | None,
                   cache: LatentCache | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """(3, H, W) -> (C, H/d, W/d), a posterior sample (float32 draw on the generator's device, or the
    given ``eps`` of shape (1, C, H/d, W/d)); ``cache`` keeps the encoder's moments of each picture (the
    draw is new every time)."""
    encode = lambda px: vae.encode_moments(px[None].to(vae.dtype))  # noqa: E731
    moments = cache.moments(pixels, encode) if cache is not None else encode(pixels)
    return _posterior_sample(vae, moments, generator, eps)


def batch_moments(vae: AutoEncoder, pictures: list[torch.Tensor], cache: LatentCache | None = None,
                  chunk: int = 32) -> list[torch.Tensor]:
    """The encoder's moments (1, 2C, h, w) of each picture: kept ones from ``cache``, the others encoded together,
    pictures of one size in one call (a packed sequence of tens of small pictures: one convolution pass instead of
    tens), then kept."""
    out: list[torch.Tensor | None] = [None] * len(pictures)
    keys = [cache.key(px) if cache is not None else None for px in pictures]
    todo: dict[tuple, list[int]] = {}
    first: dict[bytes, int] = {}  # a picture twice in the sequence: encoded once
    repeats: list[tuple[int, int]] = []
    for i, (px, key) in enumerate(zip(pictures, keys)):
        hit = cache.entries.get(key) if cache is not None else None
        if hit is not None:
            cache.hits += 1
            out[i] = hit
        elif key is not None and key in first:
            cache.hits += 1
            repeats.append((i, first[key]))
        else:
            if key is not None:
                first[key] = i
            todo.setdefault(tuple(px.shape), []).append(i)
    for indexes in todo.values():
        for start in range(0, len(indexes), chunk):
            part = indexes[start:start + chunk]
            moments = vae.encode_moments(torch.stack([pictures[i] for i in part]).to(vae.dtype))
            for i, m in zip(part, moments):
                out[i] = m[None]
                if cache is not None:
                    cache.misses += 1
                    cache.put(keys[i], out[i])
    for i, j in repeats:
        out[i] = out[j]
    return out


def _posterior_sample(vae: AutoEncoder, moments: torch.Tensor, generator: torch.Generator | None,
                      eps: torch.Tensor | None) -> torch.Tensor:
    if eps is None:
        eps = torch.randn(moments.shape[0], moments.shape[1] // 2, *moments.shape[2:], generator=generator,
                          device=generator.device if generator is not None else "cpu", dtype=torch.float32)
    return vae.latent_from_moments(moments, eps.to(moments.device, moments.dtype))[0]


def training_losses(model: Bagel, vae: AutoEncoder, batch: PackedBatch, *, timestep_shift: float = 1.0,
                    generator: torch.Generator | None = None, timesteps: list[float] | None = None,
                    noises: list[torch.Tensor] | None = None, block_mask: bool | None = None,
                    dense_mask: bool = False, latent_cache: LatentCache | None = None,
                    posterior_eps: list[torch.Tensor] | None = None) -> Losses:
    """Per-token losses of one packed sequence. ``timesteps`` / ``noises`` (one per target image)
    fix the flow time and the noise instead of drawing them (tests, evaluation). ``block_mask``:
    use a flex-attention BlockMask (default on CUDA) instead of SDPA sample by sample; ``dense_mask``: one
    SDPA over the whole sequence with the dense (T, T) mask (the reference the others are tested against);
    ``latent_cache``: the frozen VAE's moments kept per picture (``bagel_engine.train.latent_cache``);
    ``posterior_eps``: one VAE posterior draw per VAE image of the batch, in packing order, instead of drawing
    them (the official trainer's recorded draws, tests/test_train_parity.py)."""
    cfg = model.cfg
    device = model.vae2llm.weight.device
    long = lambda t: t.to(device)  # noqa: E731
    ps = cfg.bagel.latent_patch_size
    tokens, token_times, targets, mse_rows, times = [], [], [], [], []
    offset, k = 0, 0
    with torch.no_grad():
        moments = batch_moments(vae, [image.pixels.to(device) for image in batch.vae_images], latent_cache)
    for j, image in enumerate(batch.vae_images):
        with torch.no_grad():
            eps = None if posterior_eps is None else posterior_eps[j]
            latent = _posterior_sample(vae, moments[j], generator, eps)
        clean = image_transforms.patchify_latent(latent.float(), ps).to(device)
        n = clean.shape[0]
        t = 0.0
        if image.target:
            t = timesteps[k] if timesteps is not None else float(shifted_time(
                torch.randn((), generator=generator, device=_gen_device(generator)), timestep_shift))
            eps = noises[k].to(device).float() if noises is not None else torch.randn(
                clean.shape, generator=generator, device=_gen_device(generator)).to(device)
            k += 1
            tokens.append((1 - t) * clean + t * eps)
            targets.append(eps - clean)
            mse_rows.append(torch.arange(offset, offset + n))
            times.append(t)
        else:
            tokens.append(clean)
        token_times.append(torch.full((n,), t, device=device))
        offset += n
    latent_dim = cfg.patch_latent_dim
    if block_mask is None:
        block_mask = device.type == "cuda"
    vae_rows = long(batch.vae_indexes)
    inputs = PackedInputs(
        length=batch.length, text_ids=long(batch.text_ids), text_indexes=long(batch.text_indexes),
        position_ids=long(batch.position_ids), vit_patches=batch.vit_patches.to(device),
        vit_position_ids=long(batch.vit_position_ids), vit_seqlens=batch.vit_seqlens,
        vit_indexes=long(batch.vit_indexes),
        latent_tokens=torch.cat(tokens) if tokens else torch.zeros(0, latent_dim, device=device),
        latent_times=torch.cat(token_times) if token_times else torch.zeros(0, device=device),
        latent_position_ids=long(batch.latent_position_ids), vae_indexes=vae_rows,
        und_indexes=long(batch.und_indexes()),
        mask=(batch.dense_mask(device) if dense_mask else batch.block_mask(device) if block_mask
              else batch.sample_blocks(device)),
        velocity_rows=vae_rows[torch.cat(mse_rows).to(device)] if mse_rows else long(torch.zeros(0, dtype=torch.long)),
        logit_rows=long(batch.ce_indexes))
    pred, logits = model(inputs)
    mse = (pred - torch.cat(targets)).pow(2).mean(-1) if pred is not None else None
    ce = F.cross_entropy(logits, long(batch.ce_labels), reduction="none") if logits is not None else None
    return Losses(mse=mse, ce=ce, timesteps=times, velocity=pred, logits=logits)


def _gen_device(generator: torch.Generator | None):
    return generator.device if generator is not None else "cpu"
