"""Training the FLUX autoencoder (VAE) from scratch, for models of other worlds than the real one
(the demo model ``bagel-shapes``). BAGEL's own VAE is never trained: ``bagel train`` keeps it fixed.

The objective is the usual VAE one: pixel MSE of the decoded posterior sample plus a small KL term
(``kl_weight``), which keeps the posterior's variance small, so the official posterior *sampling*
of input images costs nothing. After training, ``latent_statistics`` measures the mean and the
standard deviation of the latents, which become ``shift_factor`` and ``scale_factor`` (unit-variance
latents for the flow-matching model, as FLUX's factors are for its data).

    ae = AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 2), z_channels=8, num_res_blocks=1))
    train_autoencoder(ae, pictures, AETrainConfig(steps=3000), checkpoint="ae_train.pt")

``pictures(step, batch)`` returns a batch of images as a float tensor (B, 3, H, W) in [-1, 1]: the
caller decides what the autoencoder learns. Training resumes from ``checkpoint`` when it exists.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.weights.files import save_safetensors

log = logging.getLogger(__name__)


@dataclass
class AETrainConfig:
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    seed: int = 0
    save_every: int = 250


def vae_losses(ae: AutoEncoder, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel MSE of the decoded posterior sample, KL to the standard normal per latent value)."""
    moments = ae.encoder(x)
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * eps
    recon = ae.decoder(z)
    mse = torch.mean((recon - x) ** 2)
    kl = 0.5 * torch.mean(mean**2 + logvar.exp() - 1.0 - logvar)
    return mse, kl


def _lr(cfg: AETrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train_autoencoder(ae: AutoEncoder, pictures: Callable[[int, int], torch.Tensor], cfg: AETrainConfig,
                      checkpoint: str | Path | None = None, progress: bool = True,
                      on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``ae`` in place (float32, its device) for ``cfg.steps`` steps; returns the log records.

    With ``checkpoint``, the weights, optimizer and step are saved there every ``save_every``
    steps and at the end (atomically), and a rerun continues from it."""
    from tqdm import tqdm

    ae.train().requires_grad_(True)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    path = Path(checkpoint) if checkpoint else None
    if path is not None and path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        step, history = int(state["step"]), list(state.get("history", []))
        log.info("autoencoder training resumed at step %d", step)

    def save():
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        torch.save({"model": ae.state_dict(), "optimizer": opt.state_dict(), "rng": gen.get_state(), "step": step,
                    "history": history, "config": asdict(cfg)}, tmp)
        os.replace(tmp, path)

    bar = tqdm(total=cfg.steps, initial=step, desc="autoencoder", unit="step", disable=not progress, dynamic_ncols=True)
    device = next(ae.parameters()).device
    try:
        while step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            x = pictures(step, cfg.batch).to(device)
            mse, kl = vae_losses(ae, x, gen)
            loss = mse + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            psnr = 10 * math.log10(4.0 / max(float(mse.detach()), 1e-12))  # pixels span [-1, 1]
            bar.set_postfix(psnr=f"{psnr:.1f}", kl=f"{float(kl.detach()):.3g}")
            if step % 50 == 0 or step == cfg.steps:
                record = {"step": step, "mse": float(mse.detach()), "kl": float(kl.detach()), "psnr": psnr, "lr": _lr(cfg, step - 1)}
                history.append(record)
                if on_log:
                    on_log(record)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save()
    finally:
        bar.close()
    ae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def latent_statistics(ae: AutoEncoder, x: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the posterior means of ``x``: the shift and 1 / scale of unit-variance latents."""
    mean, _ = torch.chunk(ae.encoder(x), 2, dim=1)
    return float(mean.mean()), float(mean.std())


@torch.no_grad()
def reconstruction_psnr(ae: AutoEncoder, x: torch.Tensor, sample: bool = True, seed: int = 0) -> list[float]:
    """PSNR (dB) of each picture of ``x`` after encoding and decoding, on 8-bit pixels as the engine
    writes them; ``sample``: through a posterior sample, as input images are."""
    moments = ae.encoder(x)
    mean, logvar = torch.chunk(moments, 2, dim=1)
    z = mean
    if sample:
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
        z = mean + torch.exp(0.5 * logvar) * eps
    recon = ae.decoder(z)
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).floor()  # noqa: E731  (truncation, as the engine)
    err = ((to8(recon) - to8(x)) ** 2).flatten(1).mean(1)
    return [float(10 * torch.log10(255.0**2 / e.clamp_min(1e-6))) for e in err]


def save_autoencoder(ae: AutoEncoder, path: str | Path) -> None:
    """The weights as ``ae.safetensors`` (official key names)."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in ae.state_dict().items()}
    save_safetensors(state, str(path), metadata={"format": "pt"})


def load_autoencoder_weights(ae: AutoEncoder, path: str | Path) -> None:
    ae.load_state_dict(load_file(str(path)))
