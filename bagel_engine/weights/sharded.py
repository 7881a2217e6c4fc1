"""Inference with the decoder layers' weights sharded over the ranks (``load(..., shard_weights=True)``, ``bagel ...
--shard-weights`` under torchrun): FSDP2 (``torch.distributed.fsdp.fully_shard``) makes each decoder layer a unit
whose parameters are split over the ranks and all-gathered for its forward, then freed (``reshard_after_forward``).
Each rank holds 1/N of the layers' weights (BAGEL-7B-MoT: 26.1 GB of its 29.2 GB in bf16) plus one or two layers
gathered at a time, and runs every forward itself: the cards hold a model none of them could alone, at the cost of
all-gathering the layers' weights every forward (about 26 GB a forward over the ranks' links). For many small
cards; where the links are fast and the heads divide, tensor parallel moves far less.

The embeddings, ``lm_head``, the ViT, the glue and the VAE stay whole on every rank. Every rank must run the same
forwards (the lockstep of ``bagel_engine.distributed``). The result equals one process's (the same weights, the same
math; the gathered layers are exact copies). Quantized weights and offload do not combine with it (refused).
"""

from __future__ import annotations

import torch

from bagel_engine.model.bagel import Bagel


def shard_layers(model: Bagel, group, device: torch.device) -> Bagel:
    """Shard ``model``'s decoder layers over ``group`` (in place; returns ``model``)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device.type)
    for name, module in model.named_children():
        if name != "language_model":
            module.to(device)
    lm = model.language_model
    lm.lm_head.to(device)
    for name, module in lm.model.named_children():
        if name != "layers":
            module.to(device)
    for layer in lm.model.layers:  # one layer whole on the device at a time, then its shard stays
        layer.to(device)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return model


def held_fraction(model: Bagel) -> float:
    """The share of the decoder layers' parameters this rank holds."""
    held = total = 0
    for p in model.decoder.layers.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        held += local.numel()
        total += p.numel()
    return held / max(1, total)
