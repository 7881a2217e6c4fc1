"""Named benchmark workloads: what request is sent, how often, with which knobs, and what it costs
in FLOPs. A workload only calls the public pipeline methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from bagel_engine.bench import flops as flop_model
from bagel_engine.params import EDIT_DEFAULTS, TEXT_TO_IMAGE_DEFAULTS
from bagel_engine.weights.config import ModelConfig

KINDS = ("t2i", "edit", "understand", "chat")
IMAGE_KINDS = ("t2i", "edit")

PROMPTS = {
    "t2i": "A photo of a red fox sitting in fresh snow at sunrise, soft light, shallow depth of field.",
    "edit": "Make it look like a watercolor painting.",
    "understand": "Describe this image in detail.",
    "chat": "Write a short story about a robot who learns to paint.",
}
TEXT_TOKENS_DEFAULT = 256  # "256 tokens of image understanding"


@dataclass(frozen=True)
class Workload:
    """One benchmark request, sent ``batch_size`` times per measured run.

    Unset knobs (None) take the pipeline's task defaults (the official app's); ``height``/``width``
    default to the model's largest side, at most 1024. For ``edit`` and ``understand`` they are the
    size of the synthetic input image (the edit output has its resized size).
    """

    kind: str = "t2i"
    height: int | None = None
    width: int | None = None
    num_timesteps: int | None = None
    cfg_text_scale: float | None = None
    cfg_img_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    timestep_shift: float | None = None
    enable_taylorseer: bool | None = None
    max_new_tokens: int = TEXT_TOKENS_DEFAULT
    batch_size: int = 1
    seed: int = 0
    prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more API knobs, passed as they are

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    # ------------------------------------------------------------------ resolution against a model
    def resolved(self, cfg: ModelConfig) -> "Workload":
        """The same workload with every knob that shapes the work set (sizes, steps, guidance)."""
        side = min(1024, cfg.max_image_side)
        defaults = EDIT_DEFAULTS if self.kind == "edit" else TEXT_TO_IMAGE_DEFAULTS
        out = replace(self, height=self.height or side, width=self.width or side,
                      prompt=self.prompt or PROMPTS[self.kind])
        if self.kind in IMAGE_KINDS:
            out = replace(
                out,
                num_timesteps=self.num_timesteps if self.num_timesteps is not None else defaults.num_timesteps,
                cfg_text_scale=self.cfg_text_scale if self.cfg_text_scale is not None else defaults.cfg_text_scale,
                cfg_img_scale=self.cfg_img_scale if self.cfg_img_scale is not None else defaults.cfg_img_scale,
                cfg_interval=tuple(self.cfg_interval) if self.cfg_interval is not None else defaults.cfg_interval,
                timestep_shift=self.timestep_shift if self.timestep_shift is not None else defaults.timestep_shift,
                enable_taylorseer=bool(self.enable_taylorseer),
            )
        return out

    def knobs(self) -> dict[str, Any]:
        """Keyword arguments of the pipeline call (only those set)."""
        names = ("num_timesteps", "cfg_text_scale", "cfg_img_scale", "cfg_interval", "timestep_shift")
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None} if self.kind in IMAGE_KINDS else {}
        if self.kind in IMAGE_KINDS and self.enable_taylorseer:
            out["enable_taylorseer"] = True
        if "cfg_interval" in out:
            out["cfg_interval"] = tuple(out["cfg_interval"])
        return {**out, **self.extra}

    def describe(self) -> str:
        w = self
        if w.kind == "t2i":
            text = f"t2i {w.width}x{w.height}, {w.num_timesteps} steps, cfg {w.cfg_text_scale:g}/{w.cfg_img_scale:g} " \
                   f"in [{w.cfg_interval[0]:g}, {w.cfg_interval[1]:g}]"
        elif w.kind == "edit":
            text = f"edit of a {w.width}x{w.height} image, {w.num_timesteps} steps, cfg {w.cfg_text_scale:g}/" \
                   f"{w.cfg_img_scale:g} in [{w.cfg_interval[0]:g}, {w.cfg_interval[1]:g}]"
        elif w.kind == "understand":
            text = f"understand a {w.width}x{w.height} image, up to {w.max_new_tokens} tokens"
        else:
            text = f"chat, up to {w.max_new_tokens} tokens"
        if w.enable_taylorseer:
            text += ", TaylorSeer"
        return text + (f", batch {w.batch_size}" if w.batch_size > 1 else "")

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["cfg_interval"] is not None:
            d["cfg_interval"] = list(d["cfg_interval"])
        if not d["extra"]:
            d.pop("extra")
        return d

    # ------------------------------------------------------------------ running
    def input_image(self) -> Image.Image:
        return synthetic_image(self.width, self.height, self.seed)

    def run(self, pipe, callback=None) -> tuple[list, int]:
        """Send the workload's ``batch_size`` requests; returns their outputs and the number of API
        calls made. Text-to-image batches go through ``pipe.generate([...])`` (denoised together) when
        the pipeline supports lists, else one request at a time. ``callback`` gets each denoising
        step (image workloads)."""
        w, b = self, self.batch_size
        if w.kind == "t2i":
            kw = dict(height=w.height, width=w.width, callback=callback, **w.knobs())
            if b > 1:
                try:
                    out = pipe.generate(self.prompts(), seed=[w.seed + k for k in range(b)], **kw)
                    if isinstance(out, list):
                        return out, 1
                except TypeError:
                    pass  # a pipeline without list prompts: one request at a time
            return [pipe.generate(p, seed=w.seed + k, **kw) for k, p in enumerate(self.prompts())], b
        if w.kind == "edit":
            image = self.input_image()
            return [pipe.edit(image, p, seed=w.seed + k, callback=callback, **w.knobs())
                    for k, p in enumerate(self.prompts())], b
        if w.kind == "understand":
            image = self.input_image()
            return [pipe.understand(image, p, max_new_tokens=w.max_new_tokens, seed=w.seed + k, **w.extra)
                    for k, p in enumerate(self.prompts())], b
        return [pipe.chat(p, max_new_tokens=w.max_new_tokens, seed=w.seed + k, **w.extra)
                for k, p in enumerate(self.prompts())], b

    def prompts(self) -> list[str]:
        """One prompt per request of a run: distinct ones in a batch (as real batches are, so that
        no context is shared), the plain prompt for a single request."""
        p = self.prompt or PROMPTS[self.kind]
        return [p] if self.batch_size == 1 else [f"{p} Variation {k + 1}." for k in range(self.batch_size)]

    # ------------------------------------------------------------------ FLOPs
    def flops(self, cfg: ModelConfig, new_tokens: int | None = None) -> flop_model.FlopCount:
        """FLOPs of ONE request of this (resolved) workload; ``new_tokens``: the answer length
        actually decoded (default ``max_new_tokens - 1``, the most the API generates)."""
        prompt_tokens = flop_model.estimate_text_tokens(self.prompt or PROMPTS[self.kind])
        if self.kind == "t2i":
            return flop_model.text_to_image_flops(cfg, height=self.height, width=self.width, prompt_tokens=prompt_tokens,
                                         num_timesteps=self.num_timesteps, cfg_text_scale=self.cfg_text_scale,
                                         cfg_img_scale=self.cfg_img_scale, cfg_interval=self.cfg_interval,
                                         timestep_shift=self.timestep_shift)
        if self.kind == "edit":
            return flop_model.edit_flops(cfg, image_width=self.width, image_height=self.height, prompt_tokens=prompt_tokens,
                                num_timesteps=self.num_timesteps, cfg_text_scale=self.cfg_text_scale,
                                cfg_img_scale=self.cfg_img_scale, cfg_interval=self.cfg_interval,
                                timestep_shift=self.timestep_shift)
        tokens = self.max_new_tokens - 1 if new_tokens is None else new_tokens
        if self.kind == "understand":
            return flop_model.understand_flops(cfg, image_width=self.width, image_height=self.height,
                                      prompt_tokens=prompt_tokens, new_tokens=tokens)
        return flop_model.chat_flops(cfg, prompt_tokens=prompt_tokens, new_tokens=tokens)


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic picture with structure (gradients, a disc, a bar and a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(width - 1, 1), y / max(height - 1, 1)
    img = np.stack([u, v, 1.0 - 0.5 * (u + v)], axis=-1)
    disc = (u - 0.35) ** 2 + (v - 0.4) ** 2 < 0.04
    img[disc] = (0.9, 0.2, 0.1)
    img[(v > 0.7) & (v < 0.78)] = (0.1, 0.6, 0.2)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    return Image.fromarray((img * 255).astype(np.uint8), "RGB")
