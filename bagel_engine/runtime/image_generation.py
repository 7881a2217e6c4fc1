"""The denoising loop: at every step the latent block is run against each guidance branch's
context, the velocities are combined (``sampler.combine``) and the latent takes an Euler step.

The three official branches are: the full context (conditional), the context without the last
text (text-unconditional) and the context without images (image-unconditional). Here:

- all branches of a step (and of several images generated together) run in ONE batched forward,
  each block attending to its own context (``BranchKV``);
- branches whose context holds the same history are computed once; the unconditional branches are
  skipped outside ``cfg_interval`` (the batch then shrinks to the conditional blocks);
- everything that does not change between steps is computed once: the KV layout, positions, RoPE
  tables, routing, the time embeddings of every step, the latent position embeddings, the marker
  embeddings. The loop itself does not synchronise with the host.

Noisy latents never enter a context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from bagel_engine.model.bagel import Bagel
from bagel_engine.model.kv_cache import BranchKV
from bagel_engine.params import ImageParams
from bagel_engine.runtime import image_transforms as T
from bagel_engine.runtime.context import Context, block_routing
from bagel_engine.runtime.sampler import StepGuidance, combine, euler_step, step_guidance, timesteps
from bagel_engine.runtime.step_cache import TaylorSeerState
from bagel_engine.runtime.tokenizer import SpecialIds

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GuidanceContexts:
    full: Context
    text_uncond: Context
    img_uncond: Context


@dataclass
class BranchPlan:
    """Distinct (image, context) pairs to run; the conditional ones first, one per image."""

    contexts: list[Context]
    image_of: list[int]  # branch -> image index
    cond: list[int]
    text: list[int]
    img: list[int]


def plan_branches(images: Sequence[GuidanceContexts], guidance: StepGuidance, separate_roles: bool = False) -> BranchPlan:
    """``separate_roles``: never merge branches of different roles (needed when their step caches
    would see different step counts)."""
    contexts: list[Context] = []
    image_of: list[int] = []
    seen: dict[tuple, int] = {}

    def index(i: int, ctx: Context, role: str) -> int:
        key = (i, ctx.history, role if separate_roles else None)
        if key not in seen:
            seen[key] = len(contexts)
            contexts.append(ctx)
            image_of.append(i)
        return seen[key]

    cond = [index(i, g.full, "cond") for i, g in enumerate(images)]
    text = [index(i, g.text_uncond, "text") for i, g in enumerate(images)] if guidance.uses_text_branch else []
    img = [index(i, g.img_uncond, "img") for i, g in enumerate(images)] if guidance.uses_img_branch else []
    return BranchPlan(contexts, image_of, cond, text, img)


def denoise(
    model: Bagel,
    special: SpecialIds,
    contexts: GuidanceContexts | Sequence[GuidanceContexts],
    grid_hw: tuple[int, int],
    noise: torch.Tensor,
    params: ImageParams,
    device: torch.device,
    callback: StepCallback | None = None,
    trace: dict | None = None,
    decoder_fn: Callable | None = None,
    preview: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the flow from ``noise`` at t = 1 to t = 0 for one or several images of the same size.

    ``noise``: (n, p*p*C) for one image or (P, n, p*p*C) for ``P`` images, float32, on the device
    where the latent lives (the CPU in official-numerics mode). Returns the final latent tokens in
    the same shape. ``decoder_fn`` replaces ``model.decoder`` for the step (a compiled one).
    ``preview(step, total, x0)`` after each step gets the clean latent tokens the step predicts,
    ``x0 = x_t - t v`` (shape ``(P, n, p*p*C)``), for live previews.
    """
    single = isinstance(contexts, GuidanceContexts)
    images = [contexts] if single else list(contexts)
    x = noise.float().reshape(len(images), -1, noise.shape[-1])
    num_images = len(images)
    h, w = grid_hw
    n = h * w
    cfg = model.cfg.llm
    dtype = model.vae2llm.weight.dtype

    ts = timesteps(params.num_timesteps, params.timestep_shift)
    total = len(ts) - 1
    schedule = [step_guidance(ts[i], params.cfg_text_scale, params.cfg_img_scale, params.cfg_interval) for i in range(total)]
    active = next((g for g in schedule if g.uses_text_branch), StepGuidance(1.0, 1.0))
    guided_steps = [g.uses_text_branch for g in schedule]
    guided_prefix = guided_steps == sorted(guided_steps, reverse=True)
    # With a step cache, a branch's schedule follows its own step count: an unconditional branch
    # equals the conditional one only while both have run on the same steps (guided steps first).
    plan = plan_branches(images, active, separate_roles=params.enable_taylorseer and not guided_prefix)
    num_branches = len(plan.contexts)

    # Computed once for the whole loop.
    layout = BranchKV([c.kv for c in plan.contexts], [c.length for c in plan.contexts], n + 2,
                      cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, device, dtype)
    cond_layout = layout.first(num_images)
    positions = torch.cat([torch.full((n + 2,), c.rope, device=device) for c in plan.contexts])
    rope_all = model.decoder.rope(positions, dtype)
    rope_cond = tuple(t[: num_images * (n + 2)] for t in rope_all)
    routing_all = block_routing(n, device, num_branches)
    routing_cond = block_routing(n, device, num_images)
    branch_image = torch.tensor(plan.image_of, device=device)
    pos_embeds = model.latent_pos_embed(T.grid_position_ids(h, w, model.cfg.bagel.max_latent_size).to(device))
    time_embeds = model.time_embedder(ts[:-1].to(device))  # (steps, d)
    markers = model.embed_text(torch.tensor([special.start_of_image, special.end_of_image], device=device))
    dts = (ts[:-1] - ts[1:]).to(x.device)
    cond_idx = torch.tensor(plan.cond, device=device)
    text_idx = torch.tensor(plan.text, device=device) if plan.text else None
    img_idx = torch.tensor(plan.img, device=device) if plan.img else None
    caches = [TaylorSeerState() for _ in plan.contexts] if params.enable_taylorseer else None

    for i in range(total):
        guidance = schedule[i]
        guided = guidance.uses_text_branch
        body = model.embed_latents(x.to(device), time_embeds[i], pos_embeds)  # (P, n, d)
        query = torch.cat([markers[:1].expand(num_images, 1, -1), body.to(markers.dtype),
                           markers[1:].expand(num_images, 1, -1)], dim=1)
        if guided:
            q, rope, kv, routing, count = query[branch_image], rope_all, layout, routing_all, num_branches
        else:
            q, rope, kv, routing, count = query, rope_cond, cond_layout, routing_cond, num_images
        if caches is None:
            hidden = (model.decoder if decoder_fn is None else decoder_fn)(q.reshape(count * (n + 2), -1), rope, kv, False, routing)
            forwards = count
        else:
            hidden, forwards = _cached_step(model, caches[:count], q, rope, kv, routing)
        v_all = model.velocity(hidden.view(count, n + 2, -1)[:, 1 : n + 1])
        v_cond = v_all[cond_idx]
        u_text = v_all[text_idx] if guided and text_idx is not None else None
        u_img = v_all[img_idx] if guided and guidance.uses_img_branch and img_idx is not None else None
        v = combine(v_cond, u_text, u_img, guidance, params.cfg_renorm_type, params.cfg_renorm_min)
        if trace is not None:
            record = {"t": float(ts[i]), "x_t": x.clone(), "v": v, "forwards": forwards, "v_cond": v_cond}
            if u_text is not None:
                record["v_text"] = u_text
            if u_img is not None:
                record["v_img"] = u_img
            if num_images == 1:  # one image: records without the image dimension
                record = {k: (val[0] if isinstance(val, torch.Tensor) else val) for k, val in record.items()}
            trace.setdefault("steps", []).append(record)
        if preview is not None:
            preview(i + 1, total, x - float(ts[i]) * v)
        x = euler_step(x, v, dts[i])
        if callback is not None:
            callback(i + 1, total)
    return x[0] if single else x


def _cached_step(model: Bagel, caches: list[TaylorSeerState], q: torch.Tensor, rope, kv, routing):
    """One step with TaylorSeer: branches on a full step run the decoder (the whole batch runs if
    any does; the others' results are replaced), branches on a Taylor step are extrapolated."""
    count, width = q.shape[0], q.shape[1]
    full = [c.next_is_full() for c in caches]
    if any(full):
        layers_out = model.decoder.run_layers(q.reshape(count * width, -1), rope, kv, False, routing).view(count, width, -1)
        rows = []
        for j, c in enumerate(caches):
            if full[j]:
                c.record(layers_out[j])
                rows.append(layers_out[j])
            else:
                rows.append(c.predict())
    else:
        rows = [c.predict() for c in caches]
    for c in caches:
        c.advance()
    hidden = model.decoder.final_norm(torch.stack(rows).reshape(count * width, -1), routing)
    return hidden, count if any(full) else 0
