"""Tensor parallel inference (``load(..., tensor_parallel_size=N)`` under torchrun): each rank keeps 1/N of
every big matrix, Megatron style, with explicit shards.

* Decoder, both experts (``*`` and ``*_moe_gen``): q / k / v projections split by heads (their biases too),
  so each rank attends with its own heads and keeps only their K/V in its caches (the KV cache shrinks N
  times per rank); the MLP's gate / up projections split by columns. ``o_proj`` and ``down_proj`` hold the
  matching input columns and sum their partial products over the group (one all-reduce each, per layer and
  expert used): every rank ends a layer with the full hidden state.
* SigLIP: the same for its heads (``out_proj``'s bias added once, after the sum) and its MLP; the connector's
  two layers as one MLP.
* Replicated: the embeddings, ``lm_head``, the norms, the position tables, the time embedder and the
  latent projections (small against the layers).

The shards are taken from the full weights after loading (and LoRA merging) and before quantization, so
every loading path and layout works; loading only each rank's slices is not done yet (each rank reads the
whole checkpoint into CPU memory once). Results equal one process within float rounding (the partial sums
add in another order); greedy text is the same.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bagel_engine.model.bagel import Bagel


class RowParallelLinear(nn.Module):
    """A linear layer holding this rank's slice of the input features: the partial product summed over the
    group, then the bias (whole) added once. ``linear`` (no bias) is an ``nn.Linear`` so quantization finds it."""

    def __init__(self, full: nn.Linear, rank: int, size: int, group):
        super().__init__()
        cols = full.in_features // size
        self.linear = nn.Linear(cols, full.out_features, bias=False, device=full.weight.device, dtype=full.weight.dtype)
        self.linear.weight = nn.Parameter(full.weight.detach()[:, rank * cols:(rank + 1) * cols].clone(),
                                          requires_grad=False)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone(), requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def column_slice(full: nn.Linear, rank: int, size: int) -> nn.Linear:
    """``full``'s output rows ``rank`` of ``size`` equal parts (with their bias): this rank's heads or columns."""
    rows = full.out_features // size
    part = nn.Linear(full.in_features, rows, bias=full.bias is not None, device=full.weight.device,
                     dtype=full.weight.dtype)
    part.weight = nn.Parameter(full.weight.detach()[rank * rows:(rank + 1) * rows].clone(), requires_grad=False)
    if full.bias is not None:
        part.bias = nn.Parameter(full.bias.detach()[rank * rows:(rank + 1) * rows].clone(), requires_grad=False)
    return part


def check_divisible(model: Bagel, size: int) -> None:
    """A clear error when the model's heads or widths do not split into ``size`` equal shards."""
    llm, vit = model.cfg.llm, model.cfg.vit
    counts = {"decoder attention heads": llm.num_attention_heads, "decoder KV heads": llm.num_key_value_heads,
              "decoder MLP width": llm.intermediate_size, "ViT heads": vit.num_attention_heads,
              "ViT MLP width": vit.intermediate_size, "connector width": llm.hidden_size}
    bad = [f"{name} {n}" for name, n in counts.items() if n % size]
    if bad:
        raise ValueError(f"tensor parallel over {size} ranks needs every one of these to divide by {size}: "
                         f"{', '.join(bad)}")


def shard_model(model: Bagel, group) -> Bagel:
    """Replace ``model``'s big matrices by this rank's shards of ``group`` (in place; returns ``model``)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    check_divisible(model, size)
    for layer in model.decoder.layers:
        attn = layer.self_attn
        for suffix in ("", "_moe_gen"):
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name + suffix, column_slice(getattr(attn, name + suffix), rank, size))
            setattr(attn, "o_proj" + suffix, RowParallelLinear(getattr(attn, "o_proj" + suffix), rank, size, group))
            mlp = getattr(layer, "mlp" + suffix)
            mlp.gate_proj, mlp.up_proj = column_slice(mlp.gate_proj, rank, size), column_slice(mlp.up_proj, rank, size)
            mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, size, group)
        attn.num_heads //= size
        attn.num_kv_heads //= size
    for layer in model.vit_model.vision_model.encoder.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, column_slice(getattr(attn, name), rank, size))
        attn.out_proj = RowParallelLinear(attn.out_proj, rank, size, group)
        attn.num_heads //= size
        layer.mlp.fc1 = column_slice(layer.mlp.fc1, rank, size)
        layer.mlp.fc2 = RowParallelLinear(layer.mlp.fc2, rank, size, group)
    model.connector.fc1 = column_slice(model.connector.fc1, rank, size)
    model.connector.fc2 = RowParallelLinear(model.connector.fc2, rank, size, group)
    return model

