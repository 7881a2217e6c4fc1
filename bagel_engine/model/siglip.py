"""SigLIP NaViT vision encoder (BAGEL's understanding path), written from the math.

BAGEL uses SigLIP-so400m with three load-time changes: the patch-embedding Conv2d is stored as an
equivalent ``Linear(3*p*p -> hidden)`` whose inputs are ordered (row-in-patch, col-in-patch, channel)
with the channel fastest; the learned absolute position table is indexed with "extrapolate" ids
``row * max_per_side + col`` (no 2-D RoPE); and the last encoder layer is dropped (the config this
module receives already has the reduced layer count). ``post_layernorm`` is still applied.

Several images can be packed along the token axis; each attends only to its own tokens. Parameter
names follow the official checkpoint with the ``vit_model.`` prefix removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bagel_engine.model.config import ViTConfig


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in float32 and returned in ``x``'s dtype.

    Matches the official bf16 path, where autocast runs ``layer_norm`` in float32 (its output is
    then rounded to bf16 by the next Linear); in float32 it is a plain LayerNorm.
    """
    out = F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
    return out.to(x.dtype)


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, packed_pixels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(packed_pixels) + self.position_embedding(position_ids)


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, seqlens: Sequence[int]) -> torch.Tensor:
        n = x.shape[0]
        # (N, d) -> (heads, N, head_dim)
        q, k, v = (
            proj(x).view(n, self.num_heads, self.head_dim).transpose(0, 1)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if len(seqlens) > 1 and len(set(seqlens)) == 1:  # images of one size: one batched call
            b, length = len(seqlens), seqlens[0]
            split = lambda t: t.reshape(self.num_heads, b, length, self.head_dim).transpose(0, 1)  # noqa: E731
            out = F.scaled_dot_product_attention(split(q), split(k), split(v))  # (B, heads, L, head_dim)
            return self.out_proj(out.permute(0, 2, 1, 3).reshape(n, -1))
        outs = []
        start = 0
        for length in seqlens:  # full (non-causal) attention inside each image only
            end = start + length
            outs.append(F.scaled_dot_product_attention(q[:, start:end], k[:, start:end], v[:, start:end]))
            start = end
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        return self.out_proj(out.transpose(0, 1).reshape(n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, seqlens: Sequence[int]) -> torch.Tensor:
        x = x + self.self_attn(_layer_norm(self.layer_norm1, x), seqlens)
        return x + self.mlp(_layer_norm(self.layer_norm2, x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """SigLIP NaViT encoder; ``state_dict()`` keys are the official ones minus ``vit_model.``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("vit hidden_size must be a multiple of num_attention_heads")
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(
        self,
        packed_pixels: torch.Tensor,
        position_ids: torch.Tensor,
        seqlens: Sequence[int] | torch.Tensor,
    ) -> torch.Tensor:
        """Encode packed images.

        Args:
            packed_pixels: (N, 3*p*p) patchified pixels in [-1, 1] of one or more images, concatenated.
            position_ids: (N,) flattened position ids ``row * max_per_side + col``.
            seqlens: tokens per image (sums to N).

        Returns:
            (N, hidden) hidden states after ``post_layernorm``, in the model's dtype.
        """
        seqlens = [int(s) for s in seqlens]
        n = packed_pixels.shape[0]
        if packed_pixels.dim() != 2 or position_ids.shape != (n,):
            raise ValueError(
                f"expected packed_pixels (N, 3*p*p) and position_ids (N,), got "
                f"{tuple(packed_pixels.shape)} and {tuple(position_ids.shape)}"
            )
        if sum(seqlens) != n or any(s <= 0 for s in seqlens):
            raise ValueError(f"seqlens {seqlens} must be positive and sum to the {n} packed tokens")
        vm = self.vision_model
        x = vm.embeddings(packed_pixels.to(vm.embeddings.patch_embedding.weight.dtype), position_ids)
        for layer in vm.encoder.layers:
            x = layer(x, seqlens)
        return _layer_norm(vm.post_layernorm, x)
