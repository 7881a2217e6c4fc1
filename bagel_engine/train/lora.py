"""LoRA adapters for the decoder's linear layers: fine-tune BAGEL-7B-MoT on one GPU.

``add_lora(model, rank, alpha, targets)`` turns the chosen ``nn.Linear`` layers into
``LoRALinear``: the same module with the same ``weight`` / ``bias`` (so the official key names
stay), frozen, plus ``lora_A`` (rank x in, Kaiming-uniform) and ``lora_B`` (out x rank, zeros)
kept in float32: ``y = x W^T + b + (alpha / rank) * x A^T B^T``, so training starts from the base
model exactly. ``merged_state_dict`` folds the adapters into the weights (the official layout,
for ``bagel_engine.load``); the trainer writes the adapters alone
in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``; ``bagel_engine.weights.adapters``).

Targets: ``gen`` (the generation expert's ``*_moe_gen`` projections: what image generation and
editing use), ``und`` (the understanding expert's: text and understanding), or ``all``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bagel_engine.weights.adapters import merged_weight

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = ("gen", "und", "all")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a low-rank update; ``lora_A`` / ``lora_B`` are float32."""

    rank: int
    scale: float

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float) -> "LoRALinear":
        linear.__class__ = cls  # same module, same parameters and names; new forward
        linear.rank, linear.scale = rank, alpha / rank
        device = linear.weight.device
        a = torch.empty(rank, linear.in_features, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        linear.lora_A = nn.Parameter(a)
        linear.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device, dtype=torch.float32))
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        update = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return base + (self.scale * update).to(base.dtype)

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)


def _selected(name: str, targets: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    base = leaf.removesuffix("_moe_gen")
    if base not in PROJECTIONS or not name.startswith("language_model.model.layers."):
        return False
    gen = "_moe_gen" in name  # q_proj_moe_gen, or mlp_moe_gen.up_proj
    return targets == "all" or (targets == "gen") == gen


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: str = "gen") -> list[str]:
    """Wrap the target layers; returns their names. Everything else is left as it is."""
    if targets not in TARGETS:
        raise ValueError(f"unknown LoRA targets {targets!r}; choose one of {', '.join(TARGETS)}")
    if rank < 1:
        raise ValueError("the LoRA rank must be >= 1")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
             and _selected(n, targets)]
    if not names:
        raise ValueError(f"no layer matches the LoRA targets {targets!r}")
    for name in names:
        LoRALinear.wrap(model.get_submodule(name), rank, float(alpha if alpha is not None else rank))
    return names


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def lora_scales(model: nn.Module) -> dict[str, float]:
    """``{layer name: alpha / rank}`` of every adapted layer."""
    return {name: m.scale for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_adapters(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A state dict with every adapter folded into its weight (``W + scale * B A``) and the adapter
    tensors left out: the official key names."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, scale in scales.items():
        out[f"{name}.weight"] = merged_weight(out[f"{name}.weight"], state[f"{name}.lora_A"], state[f"{name}.lora_B"], scale)
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return merge_adapters(model.state_dict(), lora_scales(model))
