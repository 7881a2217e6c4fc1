"""Qwen2 Mixture-of-Transformers decoder: every layer has an understanding expert and a
generation expert, and each token is routed to one of them.

Text, ViT tokens and the image marker tokens use the understanding weights; VAE latent tokens
(clean or noisy) use the ``*_moe_gen`` weights. Module names follow the official state dict
(``language_model.model.layers.{i}.self_attn.q_proj_moe_gen`` ...).

The decoder runs one *block* of new tokens at a time against a per-context KV cache (see
``bagel_engine.runtime.context``): the block attends to every cached token and, inside itself,
either causally (text) or fully (image blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bagel_engine.model.attention import block_attention
from bagel_engine.weights.config import LLMConfig

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (L, Hkv, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class Routing:
    """Which rows of a block use which expert. ``None`` as routing means all-understanding."""

    und: torch.Tensor  # (Nu,) long
    gen: torch.Tensor  # (Ng,) long


def route(x: torch.Tensor, und_fn, gen_fn, routing: Routing | None) -> torch.Tensor:
    """Apply ``und_fn`` to the understanding rows of ``x`` and ``gen_fn`` to the generation rows."""
    if routing is None:
        return und_fn(x)
    out_u = und_fn(x[routing.und])
    out_g = gen_fn(x[routing.gen])
    out = out_g.new_zeros((x.shape[0],) + out_g.shape[1:], dtype=torch.promote_types(out_u.dtype, out_g.dtype))
    out[routing.und] = out_u.to(out.dtype)
    out[routing.gen] = out_g.to(out.dtype)
    return out


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos / sin tables (N, 1, D) for the rotate-half RoPE, computed in float32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    angles = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(d, self.num_heads * hd, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(d, self.num_kv_heads * hd, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(d, self.num_kv_heads * hd, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(self.num_heads * hd, d, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(hd, cfg.rms_norm_eps))

    def forward(self, h, rope, past: KV | None, causal: bool, routing: Routing | None):
        n = h.shape[0]
        q = route(h, self.q_proj, self.q_proj_moe_gen, routing).view(n, self.num_heads, self.head_dim)
        k = route(h, self.k_proj, self.k_proj_moe_gen, routing).view(n, self.num_kv_heads, self.head_dim)
        v = route(h, self.v_proj, self.v_proj_moe_gen, routing).view(n, self.num_kv_heads, self.head_dim)
        if routing is not None:  # the official gen mode normalises q/k and applies RoPE in float32
            q, k = q.float(), k.float()
        q = route(q, self.q_norm, self.q_norm_moe_gen, routing)
        k = route(k, self.k_norm, self.k_norm_moe_gen, routing)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin).to(h.dtype), apply_rope(k, cos, sin).to(h.dtype)
        if past is not None and past[0].shape[0] > 0:
            k = torch.cat([past[0], k], dim=0)
            v = torch.cat([past[1], v], dim=0)
        out = block_attention(q, k, v, causal).reshape(n, self.num_heads * self.head_dim)
        return route(out, self.o_proj, self.o_proj_moe_gen, routing), (k, v)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.mlp_moe_gen = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, past: KV | None, causal: bool, routing: Routing | None):
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen, routing)
        a, kv = self.self_attn(h, rope, past, causal, routing)
        x = x + a
        h = route(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, routing)
        x = x + route(h, self.mlp, self.mlp_moe_gen, routing)
        return x, kv


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV] | None,
        causal: bool,
        routing: Routing | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """Run a block of embeddings ``x`` (N, d) at RoPE ``position_ids`` (N,) over the cache ``past``.

        Returns the final-normed hidden states (N, d) and, per layer, the merged ``[past ; new]``
        keys and values (the caller decides whether to keep them).
        """
        rope = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        new_kv: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope, past[i] if past else None, causal, routing)
            new_kv.append(kv)
        return route(x, self.norm, self.norm_moe_gen, routing), new_kv


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
