"""The denoising loop: at every step the latent block is run against each guidance branch's
context, the velocities are combined (``sampler.combine``) and the latent takes an Euler step.

The three official branches are: the full context (conditional), the context without the last
text (text-unconditional) and the context without images (image-unconditional). Here:

- all branches of a step run in ONE batched forward, each block attending to its own context
  (``BranchKV``); several images (any sizes, any guidance settings, each at its own step) run in
  one forward too (``denoise_step`` over ``ImageDenoise`` states: the engine's scheduler);
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
import torch.distributed as dist

from bagel_engine.model.bagel import Bagel
from bagel_engine.model.kv_cache import BranchKV, MultiKV
from bagel_engine.params import BagelInputError, ImageParams
from bagel_engine.runtime import image_transforms
from bagel_engine.model.qwen2_mot import Routing
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


class ImageDenoise:
    """One image's flow from ``noise`` at t = 1 to t = 0, a step at a time: the state the scheduler
    keeps per image request. Everything that does not change between steps is computed here once.

    ``noise``: (n, p*p*C) float32 on the device where the latent lives (the CPU in official-numerics
    mode). ``preview(step, total, x0)`` after each step gets the clean latent tokens the step predicts,
    ``x0 = x_t - t v`` (shape ``(1, n, p*p*C)``); ``callback(step, total)`` after each step (it may raise
    to stop the image). ``trace`` records each step's tensors.
    """

    def __init__(self, model: Bagel, special: SpecialIds, contexts: GuidanceContexts, grid_hw: tuple[int, int],
                 noise: torch.Tensor, params: ImageParams, device: torch.device,
                 callback: StepCallback | None = None, trace: dict | None = None,
                 preview: Callable[[int, int, torch.Tensor], None] | None = None):
        self.model, self.params, self.device = model, params, device
        self.callback, self.trace, self.preview = callback, trace, preview
        self.x = noise.float().reshape(1, -1, noise.shape[-1])
        h, w = grid_hw
        self.n = n = h * w
        cfg = model.cfg.llm
        dtype = model.vae2llm.weight.dtype
        self.ts = ts = timesteps(params.num_timesteps, params.timestep_shift)
        self.total = len(ts) - 1
        self.step = 0
        self.schedule = [step_guidance(ts[i], params.cfg_text_scale, params.cfg_img_scale, params.cfg_interval)
                         for i in range(self.total)]
        active = next((g for g in self.schedule if g.uses_text_branch), StepGuidance(1.0, 1.0))
        guided_steps = [g.uses_text_branch for g in self.schedule]
        guided_prefix = guided_steps == sorted(guided_steps, reverse=True)
        # With a step cache, a branch's schedule follows its own step count: an unconditional branch
        # equals the conditional one only while both have run on the same steps (guided steps first).
        plan = plan_branches([contexts], active, separate_roles=params.enable_taylorseer and not guided_prefix)
        self.num_branches = len(plan.contexts)
        self.layout = BranchKV([c.kv for c in plan.contexts], [c.length for c in plan.contexts], n + 2,
                               cfg.num_hidden_layers, model.decoder.kv_heads, cfg.head_dim, model.decoder.kv_devices(device), dtype)
        self.cond_layout = self.layout.first(1)
        positions = torch.cat([torch.full((n + 2,), c.rope, device=device) for c in plan.contexts])
        self.rope_all = model.decoder.rope(positions, dtype)
        self.rope_cond = tuple(t[: n + 2] for t in self.rope_all)
        self.routing_all = block_routing(n, device, self.num_branches)
        self.routing_cond = block_routing(n, device, 1)
        self.pos_embeds = model.latent_pos_embed(image_transforms.grid_position_ids(h, w, model.cfg.bagel.max_latent_size).to(device))
        self.time_embeds = model.time_embedder(ts[:-1].to(device))  # (steps, d)
        self.markers = model.embed_text(torch.tensor([special.start_of_image, special.end_of_image], device=device))
        self.dts = (ts[:-1] - ts[1:]).to(self.x.device)
        self.cond, self.text, self.img = plan.cond, plan.text, plan.img
        self.caches = [TaylorSeerState() for _ in plan.contexts] if params.enable_taylorseer else None
        self._full: list[bool] | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.total

    @property
    def guided(self) -> bool:
        return self.schedule[self.step].uses_text_branch

    @property
    def count(self) -> int:
        """Blocks this step runs: every distinct branch on a guided step, else the conditional one."""
        return self.num_branches if self.guided else 1

    @property
    def rows(self) -> int:
        return self.count * (self.n + 2)

    def inputs(self):
        """This step's query rows ``(count * (n + 2), d)``, RoPE tables, KV layout and routing."""
        body = self.model.embed_latents(self.x.to(self.device), self.time_embeds[self.step], self.pos_embeds)
        query = torch.cat([self.markers[:1][None], body.to(self.markers.dtype), self.markers[1:][None]], dim=1)
        if self.guided:
            q, rope, kv, routing = query.expand(self.count, -1, -1), self.rope_all, self.layout, self.routing_all
        else:
            q, rope, kv, routing = query, self.rope_cond, self.cond_layout, self.routing_cond
        return q.reshape(self.rows, -1), rope, kv, routing

    def needs_forward(self) -> bool:
        """Whether this step runs the decoder (with a step cache: whether any branch is on a full step).
        Decides the cache's step type: call once per step, before ``inputs``."""
        if self.caches is None:
            return True
        self._full = [c.next_is_full() for c in self.caches[: self.count]]
        return any(self._full)

    def cached_rows(self, layers_out: torch.Tensor | None) -> torch.Tensor:
        """With a step cache: the last layer's output of every block (recorded on full steps,
        extrapolated on Taylor steps), ``(count * (n + 2), d)`` before the final norm."""
        width = self.n + 2
        out = None if layers_out is None else layers_out.view(self.count, width, -1)
        rows = []
        for j, c in enumerate(self.caches[: self.count]):
            if out is not None and self._full[j]:
                c.record(out[j])
                rows.append(out[j])
            else:
                rows.append(c.predict())
        for c in self.caches[: self.count]:
            c.advance()
        return torch.stack(rows).reshape(self.count * width, -1)

    def finish_step(self, hidden: torch.Tensor, forwards: int) -> None:
        """Combine the branches' velocities of this step (``hidden``: final-normed rows of every
        block) and take the Euler step."""
        i, n, params = self.step, self.n, self.params
        guidance, guided = self.schedule[i], self.guided
        v_all = self.model.velocity(hidden.view(self.count, n + 2, -1)[:, 1 : n + 1])
        v_cond = v_all[self.cond]
        u_text = v_all[self.text] if guided and self.text else None
        u_img = v_all[self.img] if guided and guidance.uses_img_branch and self.img else None
        v = combine(v_cond, u_text, u_img, guidance, params.cfg_renorm_type, params.cfg_renorm_min)
        if self.trace is not None:
            record = {"t": float(self.ts[i]), "x_t": self.x[0].clone(), "v": v[0], "forwards": forwards,
                      "v_cond": v_cond[0]}
            if u_text is not None:
                record["v_text"] = u_text[0]
            if u_img is not None:
                record["v_img"] = u_img[0]
            self.trace.setdefault("steps", []).append(record)
        if self.preview is not None:
            self.preview(i + 1, self.total, self.x - float(self.ts[i]) * v)
        self.x = euler_step(self.x, v, self.dts[i])
        self.step += 1
        if self.callback is not None:
            self.callback(i + 1, self.total)

    def result(self) -> torch.Tensor:
        """(n, p*p*C): the final latent tokens."""
        return self.x[0]


def denoise_step(model: Bagel, images: Sequence[ImageDenoise], decoder_fn: Callable | None = None) -> int:
    """One step of every image in ``images`` (each at its own step, any sizes and guidance settings)
    in ONE decoder forward: the blocks' rows are concatenated, each block attends to its own context
    (``MultiKV``). Returns the number of blocks the decoder ran. Each image's result is the one it gets
    alone, within float rounding. ``decoder_fn`` replaces ``model.decoder`` (a compiled one)."""
    runs = [im.needs_forward() for im in images]
    parts = [im.inputs() for im in images]
    ran = [(im, part) for im, part, r in zip(images, parts, runs) if r]
    cached = any(im.caches is not None for im in images)
    decoder = model.decoder
    layers_out: torch.Tensor | None = None
    if ran:
        q, rope, kv, routing = _concat([part for _, part in ran])
        if cached:
            layers_out = decoder.run_layers(q, rope, kv, False, routing)
        else:
            layers_out = (decoder if decoder_fn is None else decoder_fn)(q, rope, kv, False, routing)
    forwards = sum(im.count for im, _ in ran)
    pieces, offset = {}, 0
    for im, r in zip(images, runs):
        if r:
            pieces[id(im)] = layers_out[offset : offset + im.rows]
            offset += im.rows
    if cached:  # rows before the final norm: cached images take theirs from the cache, then one final norm
        rows = [im.cached_rows(pieces.get(id(im))) if im.caches is not None else pieces[id(im)] for im in images]
        routing = _concat_routing([part[3] for part in parts], [im.rows for im in images])
        normed = decoder.final_norm(torch.cat(rows) if len(rows) > 1 else rows[0], routing)
        offset = 0
        for im in images:
            pieces[id(im)] = normed[offset : offset + im.rows]
            offset += im.rows
    for im, r in zip(images, runs):
        im.finish_step(pieces[id(im)], im.count if r else 0)
    return forwards


def denoise_step_cfg_parallel(model: Bagel, image: ImageDenoise, group, decoder_fn: Callable | None = None) -> int:
    """One step of ONE image with its guidance branches spread over the ranks of a process ``group``
    (CFG-parallel): on a guided step rank r runs branches r, r + world, ... (each over its own context), the
    final rows are all-gathered and every rank combines the same velocities, so every rank holds the same
    latent; an unguided step runs the conditional branch on every rank. Equal to :func:`denoise_step` within
    float rounding (a branch alone instead of in a batch). Returns the blocks this rank ran."""
    if image.caches is not None:
        raise BagelInputError("the step cache (enable_taylorseer) does not run with CFG-parallel yet")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q, rope, kv, routing = image.inputs()
    decoder = model.decoder if decoder_fn is None else decoder_fn
    count, width = image.count, image.n + 2
    if count == 1 or world == 1:
        image.finish_step(decoder(q, rope, kv, False, routing), count)
        return count
    per_rank = -(-count // world)
    mine = torch.zeros(per_rank, width, q.shape[-1], dtype=q.dtype, device=q.device)
    for slot, j in enumerate(range(rank, count, world)):
        rows = slice(j * width, (j + 1) * width)
        mine[slot] = decoder(q[rows], tuple(t[rows] for t in rope), kv.only(j), False, image.routing_cond)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    hidden = torch.stack([gathered[j % world][j // world] for j in range(count)])  # branch order
    image.finish_step(hidden.reshape(count * width, -1), count)
    return len(range(rank, count, world))


def _concat(parts):
    """One forward's inputs from several blocks' ``(q, rope, kv, routing)``."""
    if len(parts) == 1:
        return parts[0]
    q = torch.cat([p[0] for p in parts])
    rope = tuple(torch.cat([p[1][k] for p in parts]) for k in range(len(parts[0][1])))
    kv = MultiKV([(p[2], p[0].shape[0]) for p in parts])
    return q, rope, kv, _concat_routing([p[3] for p in parts], [p[0].shape[0] for p in parts])


def _concat_routing(routings: list[Routing], rows: list[int]) -> Routing:
    if len(routings) == 1:
        return routings[0]
    offsets = torch.tensor([0, *rows[:-1]]).cumsum(0).tolist()
    return Routing(und=torch.cat([r.und + o for r, o in zip(routings, offsets)]))


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
    """Run the flow from ``noise`` at t = 1 to t = 0 for one or several images of the same size
    (stepped together, one forward per step).

    ``noise``: (n, p*p*C) for one image or (P, n, p*p*C) for ``P`` images, float32, on the device
    where the latent lives. Returns the final latent tokens in the same shape. ``preview(step, total,
    x0)`` gets the predicted clean latents ``(P, n, p*p*C)``; ``callback(step, total)`` after each step.
    """
    single = isinstance(contexts, GuidanceContexts)
    images = [contexts] if single else list(contexts)
    x = noise.float().reshape(len(images), -1, noise.shape[-1])
    steps: list[torch.Tensor | None] = [None] * len(images)

    def keep(j):
        def on_preview(step, total, x0):
            steps[j] = x0
            if all(s is not None for s in steps):
                preview(step, total, torch.cat(steps))
                steps[:] = [None] * len(images)
        return on_preview

    states = [ImageDenoise(model, special, g, grid_hw, x[j], params, device,
                           trace=trace if single else None, preview=keep(j) if preview else None)
              for j, g in enumerate(images)]
    total = states[0].total
    for i in range(total):
        denoise_step(model, states, decoder_fn)
        if callback is not None:
            callback(i + 1, total)
    out = torch.stack([s.result() for s in states])
    return out[0] if single else out
