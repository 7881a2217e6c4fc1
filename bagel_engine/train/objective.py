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
from bagel_engine.model.bagel import Bagel
from bagel_engine.model.kv_cache import PackedKV
from bagel_engine.model.qwen2_mot import Routing
from bagel_engine.runtime import image_transforms as T
from bagel_engine.train.packing import PackedBatch


@dataclass
class Losses:
    mse: torch.Tensor | None  # (Nm,) per latent token, mean over its channels
    ce: torch.Tensor | None  # (Nc,) per learnt text token
    timesteps: list[float]  # the flow time of each target image
    velocity: torch.Tensor | None = None  # (Nm, p*p*C) the predicted velocities (float32)
    logits: torch.Tensor | None = None  # (Nc, vocab) the logits of the learnt tokens (float32)

    def total(self, mse_weight: float = 1.0, ce_weight: float = 1.0,
              mse_tokens: float | None = None, ce_tokens: float | None = None) -> torch.Tensor:
        """Weighted sum of the token means. ``*_tokens``: the divisors (the global token counts
        under data parallelism, so that every token weighs the same whatever rank it is on)."""
        parts = []
        if self.mse is not None and self.mse.numel():
            parts.append(mse_weight * self.mse.sum() / (mse_tokens or self.mse.numel()))
        if self.ce is not None and self.ce.numel():
            parts.append(ce_weight * self.ce.sum() / (ce_tokens or self.ce.numel()))
        if not parts:
            raise ValueError("the batch has nothing to learn (no target image and no learnt text)")
        return sum(parts)


def shifted_time(n: torch.Tensor, shift: float) -> torch.Tensor:
    s = torch.sigmoid(n)
    return shift * s / (1 + (shift - 1) * s)


def encode_latents(vae: AutoEncoder, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(3, H, W) -> (C, H/d, W/d), a posterior sample (float32 draw on the generator's device)."""
    moments = vae.encode_moments(pixels[None].to(vae.dtype))
    eps = torch.randn(moments.shape[0], moments.shape[1] // 2, *moments.shape[2:], generator=generator,
                      device=generator.device if generator is not None else "cpu", dtype=torch.float32)
    return vae.latent_from_moments(moments, eps.to(moments.device, moments.dtype))[0]


def training_losses(model: Bagel, vae: AutoEncoder, batch: PackedBatch, *, timestep_shift: float = 1.0,
                    generator: torch.Generator | None = None, timesteps: list[float] | None = None,
                    noises: list[torch.Tensor] | None = None, block_mask: bool | None = None) -> Losses:
    """Per-token losses of one packed sequence. ``timesteps`` / ``noises`` (one per target image)
    fix the flow time and the noise instead of drawing them (tests, evaluation). ``block_mask``:
    use a flex-attention BlockMask (default on CUDA) instead of a dense (T, T) mask."""
    cfg = model.cfg
    device = model.vae2llm.weight.device
    dtype = model.vae2llm.weight.dtype
    d = cfg.llm.hidden_size
    seq = torch.zeros(batch.length, d, device=device, dtype=dtype)
    seq = seq.index_copy(0, batch.text_indexes.to(device), model.embed_text(batch.text_ids.to(device)).to(dtype))
    if batch.vit_seqlens:
        vit = model.embed_vit(batch.vit_patches.to(device), batch.vit_position_ids.to(device), batch.vit_seqlens)
        seq = seq.index_copy(0, batch.vit_indexes.to(device), vit.to(dtype))

    mse_rows, targets, times = [], [], []
    if batch.vae_images:
        ps = cfg.bagel.latent_patch_size
        tokens, token_times, offset, k = [], [], 0, 0
        for image in batch.vae_images:
            with torch.no_grad():
                latent = encode_latents(vae, image.pixels.to(device), generator)
            clean = T.patchify_latent(latent.float(), ps).to(device)
            n = clean.shape[0]
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
                t = 0.0
                tokens.append(clean)
            token_times.append(torch.full((n,), t, device=device))
            offset += n
        tokens_t, times_t = torch.cat(tokens), torch.cat(token_times)
        latents = model.embed_latents(tokens_t, model.time_embedder(times_t),
                                      model.latent_pos_embed(batch.latent_position_ids.to(device)))
        vae_rows = batch.vae_indexes.to(device)
        seq = seq.index_copy(0, vae_rows, latents.to(dtype))

    if block_mask is None:
        block_mask = seq.is_cuda
    mask = batch.block_mask(device) if block_mask else batch.dense_mask(device)
    routing = Routing(und=batch.und_indexes().to(device), gen=batch.vae_indexes.to(device))
    decoder = model.decoder
    hidden = decoder(seq, decoder.rope(batch.position_ids.to(device), dtype), PackedKV(mask), False, routing)

    mse = pred = logits = None
    if mse_rows:
        rows = vae_rows[torch.cat(mse_rows).to(device)]
        pred = model.velocity(hidden.index_select(0, rows)).float()
        mse = (pred - torch.cat(targets)).pow(2).mean(-1)
    ce = None
    if batch.ce_tokens:
        logits = model.logits(hidden.index_select(0, batch.ce_indexes.to(device))).float()
        ce = F.cross_entropy(logits, batch.ce_labels.to(device), reduction="none")
    return Losses(mse=mse, ce=ce, timesteps=times, velocity=pred, logits=logits)


def _gen_device(generator: torch.Generator | None):
    return generator.device if generator is not None else "cpu"
