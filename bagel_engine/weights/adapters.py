"""LoRA adapter files: a few hundred MB instead of a 29 GB checkpoint.

An adapter file (``lora_adapter.safetensors``, written by ``bagel train --lora-rank``) holds, for
each adapted linear layer ``NAME`` (official key names), ``NAME.lora_A`` (rank x in) and
``NAME.lora_B`` (out x rank), and in its metadata the ``lora_alpha`` and ``lora_rank`` that give
the scale ``alpha / rank``. Merging adds ``strength * scale * B @ A`` to ``NAME.weight``:
``bagel_engine.load(base, lora=FILE)`` gives the fine-tuned model from the base checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bagel_engine.weights.config import ConfigError

FORMAT = "bagel-engine-lora"
ADAPTER_FILE = "lora_adapter.safetensors"


def save_adapter(path: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float, targets: str) -> None:
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, "lora_rank": str(rank), "lora_alpha": str(alpha), "lora_targets": targets})


def read_adapter(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """``({layer: (A, B)}, scale)`` of an adapter file; a checkpoint directory means its adapter file."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.exists():
        raise ConfigError(f"LoRA adapter {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a bagel-engine LoRA adapter (metadata format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = float(meta["lora_alpha"]) / float(meta["lora_rank"])
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            if f"{name}.lora_B" not in tensors:
                raise ConfigError(f"{path}: {name}.lora_A has no lora_B")
            layers[name] = (tensors[key], tensors[f"{name}.lora_B"])
    if not layers:
        raise ConfigError(f"{path} holds no adapter")
    return layers, scale


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``weight + scale * B @ A``, computed in float32, in the weight's dtype and device."""
    return (weight.float() + scale * (b.to(weight.device).float() @ a.to(weight.device).float())).to(weight.dtype)


@torch.no_grad()
def merge_adapter(model: nn.Module, path: str | Path, strength: float = 1.0) -> int:
    """Add the adapter's low-rank updates to ``model``'s weights; returns the layers changed."""
    layers, scale = read_adapter(path)
    modules = dict(model.named_modules())
    for name, (a, b) in layers.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"the adapter targets {name!r}, which is not a linear layer of this model")
        w = module.weight
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ConfigError(f"the adapter for {name} is {b.shape[0]}x{a.shape[1]}, the layer {tuple(w.shape)}: "
                              "another base model?")
        w.copy_(merged_weight(w, a, b, strength * scale))
    return len(layers)
