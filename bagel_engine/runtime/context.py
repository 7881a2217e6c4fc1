"""Contexts: what the model has seen so far (a KV cache per layer, its length and the next RoPE
position), and how text and images extend them.

A ``Context`` is immutable: extending one returns a new context and never touches the old one,
so forking a context for a guidance branch is free (the branches share the cached tensors).

Every context also carries its ``history``: the sequence of segments it was built from. Two
contexts with the same history hold the same numbers, so a ``ContextBuilder`` computes each
distinct extension once (the official code recomputes them) and the sampler runs a guidance branch
whose context equals another's only once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from bagel_engine.model.bagel import Bagel
from bagel_engine.model.qwen2_mot import KV, Routing
from bagel_engine.params import BagelInputError
from bagel_engine.runtime import image_transforms
from bagel_engine.runtime.tokenizer import BagelTokenizer


@dataclass(frozen=True)
class Context:
    kv: tuple[KV, ...] | None = None
    length: int = 0
    rope: int = 0
    history: tuple = ()

    @property
    def empty(self) -> bool:
        return self.length == 0


@dataclass
class PreparedImage:
    """An input image after the official resize rules, ready for the VAE and ViT streams."""

    key: object  # identifies the image inside one call (for context dedup)
    vae_image: Image.Image  # resized with the VAE transform; its size is the edit output size
    vae_pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    vit_pixels: torch.Tensor  # (3, H', W') in [-1, 1]

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.vae_pixels.shape[1], self.vae_pixels.shape[2]


def block_routing(n: int, device, blocks: int = 1) -> Routing:
    """Routing of ``blocks`` image blocks ``[start, n tokens, end]`` back to back: markers und, latents gen."""
    starts = torch.arange(blocks, device=device) * (n + 2)
    return Routing(und=torch.stack([starts, starts + n + 1], dim=1).reshape(-1))


def wrap_with_markers(model: Bagel, body: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """``[embed(start), body..., embed(end)]`` for an image block."""
    ids = torch.tensor([start_id, end_id], device=body.device)
    markers = model.embed_text(ids)
    return torch.cat([markers[:1], body.to(markers.dtype), markers[1:]], dim=0)


@dataclass
class ContextBuilder:
    """Extends contexts with text, ViT images and VAE images, computing each distinct extension once."""

    model: Bagel
    tokenizer: BagelTokenizer
    vae_encode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (1,3,H,W), eps -> latent
    device: torch.device
    trace: dict | None = None
    max_len: int | None = None  # tokens a context may hold (the model's context length); None: no limit
    forwards: int = 0  # blocks computed (not found in the memo): what a chunked prefill counts
    _memo: dict = field(default_factory=dict)

    @property
    def cfg(self):
        return self.model.cfg

    def check_room(self, ctx: Context, n: int, what: str) -> None:
        """:class:`BagelInputError` before any work when ``n`` more tokens would overflow ``max_len``."""
        if self.max_len is not None and ctx.length + n > self.max_len:
            raise BagelInputError(
                f"{what} of {n} tokens does not fit: the request would hold {ctx.length + n} tokens, more than "
                f"the limit of {self.max_len} (max_model_len)")

    def _run(self, ctx: Context, x: torch.Tensor, positions: torch.Tensor, causal: bool, routing, key) -> Context:
        history = ctx.history + (key,)
        if history in self._memo:
            return self._memo[history]
        _, kv = self.model.decoder.extend(x, positions, ctx.kv, causal, routing)
        self.forwards += 1
        n = x.shape[0]
        new = Context(kv=tuple(kv), length=ctx.length + n, rope=ctx.rope + (n if causal else 1), history=history)
        self._memo[history] = new
        return new

    def add_text(self, ctx: Context, text: str) -> Context:
        ids = self.tokenizer.frame(text)
        self.check_room(ctx, len(ids), "a text")
        key = ("text", tuple(ids))
        if ctx.history + (key,) in self._memo:
            return self._memo[ctx.history + (key,)]
        if self.trace is not None:
            self.trace.setdefault("text_ids", []).append(ids)
        ids_t = torch.tensor(ids, device=self.device)
        positions = torch.arange(ctx.rope, ctx.rope + len(ids), device=self.device)
        return self._run(ctx, self.model.embed_text(ids_t), positions, True, None, key)

    def add_vit_image(self, ctx: Context, image: PreparedImage) -> Context:
        key = ("vit", image.key)
        if ctx.history + (key,) in self._memo:
            return self._memo[ctx.history + (key,)]
        cfg = self.cfg
        p = cfg.vit.patch_size
        pixels = image.vit_pixels
        h, w = pixels.shape[1] // p, pixels.shape[2] // p
        self.check_room(ctx, h * w + 2, "an image (ViT)")
        patches = image_transforms.patchify_image(pixels, p).to(self.device)
        pos_ids = image_transforms.grid_position_ids(h, w, cfg.bagel.vit_max_num_patch_per_side).to(self.device)
        body = self.model.embed_vit(patches, pos_ids, [h * w])
        if self.trace is not None:
            self.trace.setdefault("vit_llm_embeds", []).append(body.detach())
        s = self.tokenizer.special
        x = wrap_with_markers(self.model, body, s.start_of_image, s.end_of_image)
        positions = torch.full((x.shape[0],), ctx.rope, device=self.device)
        return self._run(ctx, x, positions, False, None, key)

    def add_vae_image(self, ctx: Context, image: PreparedImage, eps: torch.Tensor | None) -> Context:
        """Add an input image as clean latents (t = 0). ``eps`` is the posterior draw (None: the mean)."""
        key = ("vae", image.key)
        if ctx.history + (key,) in self._memo:
            return self._memo[ctx.history + (key,)]
        cfg = self.cfg
        d = cfg.latent_downsample
        self.check_room(ctx, (image.size_hw[0] // d) * (image.size_hw[1] // d) + 2, "an image (VAE)")
        latent = self.vae_encode(image.vae_pixels.unsqueeze(0), eps)[0]  # (C, H/d, W/d)
        if self.trace is not None:
            self.trace.setdefault("vae_latents", []).append(latent.detach())
        ps = cfg.bagel.latent_patch_size
        h, w = latent.shape[1] // ps, latent.shape[2] // ps
        tokens = image_transforms.patchify_latent(latent, ps).to(self.device)
        pos_ids = image_transforms.grid_position_ids(h, w, cfg.bagel.max_latent_size).to(self.device)
        t0 = torch.zeros(1, device=self.device)
        body = self.model.embed_latents(tokens, self.model.time_embedder(t0), self.model.latent_pos_embed(pos_ids))
        s = self.tokenizer.special
        x = wrap_with_markers(self.model, body, s.start_of_image, s.end_of_image)
        positions = torch.full((x.shape[0],), ctx.rope, device=self.device)
        return self._run(ctx, x, positions, False, block_routing(h * w, self.device), key)
