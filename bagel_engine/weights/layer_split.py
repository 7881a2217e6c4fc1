"""The decoder's layers split over several devices of one process (``load(devices=["cuda:0", "cuda:1"])``,
``--devices 0,1``), as the official app's multi-GPU mode does: a model too big for one card, without
torch.distributed. The first device holds the embeddings, ``lm_head``, the norms, the ViT, the glue, the VAE and its
share of the layers; the others hold theirs; the activations move from card to card between layers, and each layer's
KV cache lives on its card (``Qwen2MoTModel.layer_devices``, ``model.kv_cache``). The cards run one after the other
(no overlap): it buys memory, not speed. By default the layers are shared as evenly as the first card's extra load
allows (it gets fewer); ``layer_split`` gives each card's count, or ``max_memory`` a weight budget per card
(``"20GB,24GB"``, or one for all), filled in order as ``device_map="auto"`` with ``max_memory`` fills them in the
official app: the first card holds the rest of the model and as many layers as its budget leaves room for, the next
card the next layers, and so on. The budget counts weights only: leave room below the card's size for the KV cache and
the activations (``bagel inspect --plan`` estimates them).
"""

from __future__ import annotations

import torch

from bagel_engine.model.bagel import Bagel
from bagel_engine.weights.sizes import fmt_bytes, parse_size


def parse_devices(text: str | list | tuple) -> list[torch.device]:
    """``"0,1"`` -> [cuda:0, cuda:1]; ``"cuda:0,cuda:2"`` and ``"cpu,cpu"`` as written."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if str(p).strip()]
    if len(parts) < 2:
        raise ValueError(f"devices: give two or more (e.g. 0,1), got {text!r}")
    return [torch.device(f"cuda:{p}" if str(p).isdigit() else str(p)) for p in parts]


def layer_counts(num_layers: int, devices: int, split: list[int] | tuple[int, ...] | None = None) -> list[int]:
    """Layers per device: ``split`` when given (it must add up), else even with the first device's share rounded
    down (it holds the rest of the model too)."""
    if split:
        if len(split) != devices or sum(split) != num_layers or min(split) < 0:
            raise ValueError(f"layer_split {list(split)}: one count per device ({devices}) adding up to the "
                             f"{num_layers} decoder layers")
        return list(split)
    base, extra = divmod(num_layers, devices)
    return [base + (1 if i >= devices - extra else 0) for i in range(devices)]  # the first ones get fewer


def parse_memory(text: str | int | list | tuple, devices: int) -> list[int]:
    """``"24GB"`` (every device), ``"20GB,24GiB"`` (one per device) or bytes -> bytes per device."""
    parts = list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
    out = [parse_size(part) for part in parts]
    if len(out) == 1:
        out *= devices
    if len(out) != devices:
        raise ValueError(f"max_memory: one size for every device or one per device ({devices}), got {len(out)}")
    return out


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def budget_counts(model: Bagel, budgets: list[int]) -> list[int]:
    """Layers per device when each device may hold ``budgets[i]`` bytes of weights, filled in order: the first
    holds everything but the decoder layers, then as many layers as fit; a ValueError says what is missing."""
    layers = list(model.language_model.model.layers)
    sizes = [_bytes(layer) for layer in layers]
    rest = _bytes(model) - sum(sizes)
    counts, k = [], 0
    for i, budget in enumerate(budgets):
        room, n = budget - (rest if i == 0 else 0), 0
        while k < len(layers) and sizes[k] <= room:
            room -= sizes[k]
            k, n = k + 1, n + 1
        counts.append(n)
    if k < len(layers) or rest > budgets[0]:
        raise ValueError(f"max_memory: {len(layers) - k} of the {len(layers)} decoder layers ({fmt_bytes(sizes[0])} "
                         f"each) do not fit in {', '.join(map(fmt_bytes, budgets))}; the first device also holds the rest "
                         f"of the model ({fmt_bytes(rest)}): raise the budgets or add a device")
    return counts


def split_layers(model: Bagel, devices: list[torch.device], split: list[int] | tuple[int, ...] | None = None,
                 max_memory: list[int] | tuple[int, ...] | None = None) -> Bagel:
    """Move ``model`` (on the CPU) to ``devices``: its layers by :func:`layer_counts` (or :func:`budget_counts`
    with ``max_memory``, bytes per device), the rest to the first."""
    first = devices[0]
    decoder = model.language_model.model
    counts = budget_counts(model, list(max_memory)) if max_memory else layer_counts(len(decoder.layers), len(devices),
                                                                                      split)
    for name, module in model.named_children():
        if name != "language_model":
            module.to(first)
    model.language_model.lm_head.to(first)
    for name, module in decoder.named_children():
        if name != "layers":
            module.to(first)
    placed: list[torch.device] = []
    for device, count in zip(devices, counts):
        placed += [device] * count
    for layer, device in zip(decoder.layers, placed):
        layer.to(device)
    decoder.layer_devices = placed
    return model
