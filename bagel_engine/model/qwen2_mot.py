"""Qwen2 Mixture-of-Transformers decoder: every layer has an understanding expert and a
generation expert, and each token is routed to one of them.

Text, ViT tokens and the image marker tokens use the understanding weights; VAE latent tokens
(clean or noisy) use the ``*_moe_gen`` weights. Module names follow the official state dict
(``language_model.model.layers.{i}.self_attn.q_proj_moe_gen`` ...).

The decoder runs one *block* of new tokens at a time against KV caches held by a layout
(``bagel_engine.model.kv_cache``): the block attends to every cached token and, inside itself,
either causally (text) or fully (image blocks). Several blocks (guidance branches) can run in one
forward, each over its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from bagel_engine.model.kv_cache import KV, AppendKV  # noqa: F401  (KV re-exported)
from bagel_engine.model.config import LLMConfig


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
    """Which rows of a block use which expert (``None`` as routing means all-understanding).

    The generation expert runs densely on every row and the understanding expert on its few rows
    (the image markers), whose results overwrite the others: row-wise layers make that exact.
    """

    und: torch.Tensor  # (Nu,) long: rows of the understanding expert
    # (Ng,) long: rows of the generation expert, when they are a minority (packed training
    # sequences: mostly text); then each expert runs on its own rows only. None: all other rows.
    gen: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Routing":
        if self.und.device == device:
            return self
        return Routing(self.und.to(device), None if self.gen is None else self.gen.to(device))


def route(x: torch.Tensor, und_fn, gen_fn, routing: Routing | None) -> torch.Tensor:
    """Apply ``und_fn`` to the understanding rows of ``x`` and ``gen_fn`` to the others."""
    if routing is None:
        return und_fn(x)
    if routing.gen is not None:  # und and gen partition the rows
        out_u = und_fn(x.index_select(0, routing.und))
        out_g = gen_fn(x.index_select(0, routing.gen))
        out = out_u.new_zeros((x.shape[0], *out_u.shape[1:]))
        return out.index_copy(0, routing.und, out_u).index_copy(0, routing.gen, out_g.to(out.dtype))
    out = gen_fn(x)
    out_u = und_fn(x.index_select(0, routing.und))
    return out.index_copy(0, routing.und, out_u.to(out.dtype))


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

    def forward(self, h, rope, kv, layer: int, causal: bool, routing: Routing | None):
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
        out = kv.attend(layer, q, k, v.to(h.dtype), causal).reshape(n, self.num_heads * self.head_dim)
        return route(out, self.o_proj, self.o_proj_moe_gen, routing)


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

    def forward(self, x, rope, kv, layer: int, causal: bool, routing: Routing | None):
        h = route(x, self.input_layernorm, self.input_layernorm_moe_gen, routing)
        x = x + self.self_attn(h, rope, kv, layer, causal, routing)
        h = route(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen, routing)
        return x + route(h, self.mlp, self.mlp_moe_gen, routing)


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False
        # the layers split over devices (one per layer; None: all on the model's device): activations follow them
        self.layer_devices: list[torch.device] | None = None

    def kv_devices(self, device: torch.device):
        """Where each layer's KV cache lives: ``device``, or each layer's own when the layers are split."""
        return device if self.layer_devices is None else list(self.layer_devices)

    @property
    def kv_heads(self) -> int:
        """The KV heads this decoder holds: the config's, or a tensor-parallel rank's share."""
        return self.layers[0].self_attn.num_kv_heads

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def forward(self, x: torch.Tensor, rope, kv, causal: bool, routing: Routing | None = None) -> torch.Tensor:
        """Run a block of embeddings ``x`` (T, d) with RoPE tables ``rope`` (from ``self.rope``)
        against the KV layout ``kv``; returns the final-normed hidden states (T, d)."""
        return self.final_norm(self.run_layers(x, rope, kv, causal, routing), routing)

    def run_layers(self, x: torch.Tensor, rope, kv, causal: bool, routing: Routing | None = None) -> torch.Tensor:
        """The decoder layers without the final norm (what a step cache stores). With
        ``gradient_checkpointing`` (training), each layer's activations are recomputed in backward."""
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        home = x.device
        for i, layer in enumerate(self.layers):
            if self.layer_devices is not None and self.layer_devices[i] != x.device:  # the next card's layers
                here = self.layer_devices[i]
                x, rope = x.to(here), tuple(t.to(here) for t in rope)
                routing = None if routing is None else routing.to(here)
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, kv, i, causal, routing, use_reentrant=False)
            else:
                x = layer(x, rope, kv, i, causal, routing)
        return x.to(home)

    def final_norm(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        return route(x, self.norm, self.norm_moe_gen, routing)

    def extend(self, x: torch.Tensor, position_ids: torch.Tensor, past, causal: bool,
               routing: Routing | None = None) -> tuple[torch.Tensor, list[KV]]:
        """One block appended to a single cache ``past``: hidden states and the merged per-layer K/V."""
        kv = AppendKV(past)
        hidden = self(x, self.rope(position_ids, x.dtype), kv, causal, routing)
        return hidden, kv.merged


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = Qwen2MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
