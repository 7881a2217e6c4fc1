"""The denoising loop: the latent block is run against each guidance branch's context at every
step, the velocities are combined (``sampler.combine``) and the latent takes an Euler step.

The three official branches are: the full context (conditional), the context without the last
text (text-unconditional) and the context without images (image-unconditional). Branches whose
context holds the same history are computed once; branches outside ``cfg_interval`` are skipped.
Noisy latents never enter a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bagel_engine.model.bagel import Bagel
from bagel_engine.params import ImageParams
from bagel_engine.runtime import image_transforms as T
from bagel_engine.runtime.context import Context, block_routing, wrap_with_markers
from bagel_engine.runtime.sampler import combine, euler_step, step_guidance, timesteps
from bagel_engine.runtime.tokenizer import SpecialIds

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GuidanceContexts:
    full: Context
    text_uncond: Context
    img_uncond: Context


def latent_grid(cfg, height: int, width: int) -> tuple[int, int]:
    d = cfg.latent_downsample
    return height // d, width // d


def denoise(
    model: Bagel,
    special: SpecialIds,
    contexts: GuidanceContexts,
    grid_hw: tuple[int, int],
    noise: torch.Tensor,
    params: ImageParams,
    device: torch.device,
    callback: StepCallback | None = None,
    trace: dict | None = None,
) -> torch.Tensor:
    """Run the flow from ``noise`` (n, p*p*C) float32 at t = 1 to t = 0; returns the final tokens.

    The latent is kept in float32 on ``noise.device`` (the CPU in official-numerics mode).
    """
    h, w = grid_hw
    n = h * w
    pos_ids = T.grid_position_ids(h, w, model.cfg.bagel.max_latent_size).to(device)
    routing = block_routing(n, device)
    ts = timesteps(params.num_timesteps, params.timestep_shift)
    dts = ts[:-1] - ts[1:]
    x = noise.float()
    total = len(ts) - 1
    for i in range(total):
        t = ts[i]
        guidance = step_guidance(t, params.cfg_text_scale, params.cfg_img_scale, params.cfg_interval)
        t_rows = torch.full((n,), float(t), device=device)
        body = model.embed_latents(x.to(device), t_rows, pos_ids)
        query = wrap_with_markers(model, body, special.start_of_image, special.end_of_image)

        wanted = {"cond": contexts.full}
        if guidance.uses_text_branch:
            wanted["text"] = contexts.text_uncond
        if guidance.uses_img_branch:
            wanted["img"] = contexts.img_uncond
        by_history: dict[tuple, torch.Tensor] = {}
        velocities: dict[str, torch.Tensor] = {}
        for name, ctx in wanted.items():
            if ctx.history not in by_history:
                positions = torch.full((n + 2,), ctx.rope, device=device)
                hidden, _ = model.decoder(query, positions, list(ctx.kv) if ctx.kv else None, False, routing)
                by_history[ctx.history] = model.velocity(hidden)[1 : n + 1]
            velocities[name] = by_history[ctx.history]
        v = combine(
            velocities["cond"],
            velocities.get("text"),
            velocities.get("img"),
            guidance,
            params.cfg_renorm_type,
            params.cfg_renorm_min,
        )
        if trace is not None:
            trace.setdefault("steps", []).append(
                {"t": float(t), "x_t": x.detach().clone(), "v": v.detach(), "forwards": len(by_history),
                 **{f"v_{k}": val.detach() for k, val in velocities.items()}}
            )
        x = euler_step(x, v, dts[i])
        if callback is not None:
            callback(i + 1, total)
    return x
