"""The decoder's layers split over several devices of one process (``load(devices=["cuda:0", "cuda:1"])``,
``--devices 0,1``), as the official app's multi-GPU mode does: a model too big for one card, without
torch.distributed. The first device holds the embeddings, ``lm_head``, the norms, the ViT, the glue, the VAE and its
share of the layers; the others hold theirs; the activations move from card to card between layers, and each layer's
KV cache lives on its card (``Qwen2MoTModel.layer_devices``, ``model.kv_cache``). The cards run one after the other
(no overlap): it buys memory, not speed. By default the layers are shared as evenly as the first card's extra load
allows (it gets fewer); ``layer_split`` gives each card's count.
"""

from __future__ import annotations

import torch

from bagel_engine.model.bagel import Bagel


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


def split_layers(model: Bagel, devices: list[torch.device], split: list[int] | tuple[int, ...] | None = None) -> Bagel:
    """Move ``model`` (on the CPU) to ``devices``: its layers by :func:`layer_counts`, the rest to the first."""
    first = devices[0]
    decoder = model.language_model.model
    counts = layer_counts(len(decoder.layers), len(devices), split)
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
