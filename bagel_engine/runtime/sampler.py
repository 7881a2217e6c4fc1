"""Flow-matching sampling math, independent of the model: the shifted schedule, classifier-free
guidance with BAGEL's three branches and its renorm variants, and the Euler update.

Conventions (official): t = 1 is noise and t = 0 is data; the model predicts a velocity v that
points from data to noise, so a step is ``x <- x - v * (t_i - t_{i+1})``. ``num_timesteps = N``
gives N points and N - 1 model evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel_engine.params import RENORM_TYPES, BagelInputError

RENORM_EPS = 1e-8


def timesteps(num_timesteps: int, shift: float) -> torch.Tensor:
    """``t_i = shift*s / (1 + (shift-1)*s)`` for ``s = linspace(1, 0, N)`` (float32)."""
    s = torch.linspace(1, 0, num_timesteps)
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class StepGuidance:
    """Effective guidance of one step: scales are 1.0 outside ``cfg_interval``."""

    text_scale: float
    img_scale: float

    @property
    def uses_text_branch(self) -> bool:
        return self.text_scale > 1.0

    @property
    def uses_img_branch(self) -> bool:
        # The official code computes the image branch whenever its scale > 1, but ignores it when the
        # text scale is <= 1; we skip it then (same result, one forward fewer).
        return self.text_scale > 1.0 and self.img_scale > 1.0


def step_guidance(t: torch.Tensor, text_scale: float, img_scale: float, interval: tuple[float, float]) -> StepGuidance:
    """Guidance is active when ``interval[0] < t <= interval[1]`` (the shifted time).

    The comparison is made in float32, as the official code compares a float32 tensor with floats.
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    if bool(t > interval[0]) and bool(t <= interval[1]):
        return StepGuidance(text_scale, img_scale)
    return StepGuidance(1.0, 1.0)


def _row_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)


def combine(
    v: torch.Tensor,
    u_text: torch.Tensor | None,
    u_img: torch.Tensor | None,
    guidance: StepGuidance,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """The guided velocity from the conditional ``v`` and the unconditional branches, each
    (..., n, D): leading dimensions are independent images (a global norm is taken per image).

    ``global``: whole-tensor renorm of the combined velocity; ``channel``: per-token renorm of it;
    ``text_channel``: per-token renorm of the text-guided velocity, then plain image guidance.
    The renorm scale is ``clamp(|v| / |v_guided|, renorm_min, 1)``: it can only shrink.
    """
    if renorm_type not in RENORM_TYPES:
        raise BagelInputError(f"unknown cfg_renorm_type {renorm_type!r}; choose one of {', '.join(RENORM_TYPES)}")
    s_t, s_i = guidance.text_scale, guidance.img_scale
    if s_t <= 1.0:
        return v
    assert u_text is not None
    v_t = u_text + s_t * (v - u_text)
    if renorm_type == "text_channel":
        scale = (_row_norm(v) / (_row_norm(v_t) + RENORM_EPS)).clamp(min=renorm_min, max=1.0)
        v_t = v_t * scale
        if s_i > 1.0:
            assert u_img is not None
            return u_img + s_i * (v_t - u_img)
        return v_t
    v_c = u_img + s_i * (v_t - u_img) if s_i > 1.0 else v_t
    if renorm_type == "global":
        norm_v = torch.linalg.vector_norm(v.float(), dim=(-2, -1), keepdim=True)
        norm_c = torch.linalg.vector_norm(v_c.float(), dim=(-2, -1), keepdim=True)
        scale = (norm_v / (norm_c + RENORM_EPS)).clamp(min=renorm_min, max=1.0)
        # Official: a 0-dim float32 scale times a bf16 tensor stays bf16.
        return (v_c.float() * scale).to(v_c.dtype)
    norm_v, norm_c = _row_norm(v), _row_norm(v_c)  # channel: per token; the result promotes to float32
    return v_c * (norm_v / (norm_c + RENORM_EPS)).clamp(min=renorm_min, max=1.0)


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """``x - v*dt``; ``x`` float32, ``dt`` a 0-dim float32 tensor. ``v*dt`` keeps v's dtype (official)."""
    return x - (v.to(x.device) * dt.to(x.device))
