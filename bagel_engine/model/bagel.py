"""The Bagel model: the MoT decoder, the SigLIP encoder and the glue between them and the latents.

Attribute names reproduce the official state dict (``ema.safetensors``): ``language_model``,
``vit_model``, ``connector``, ``vit_pos_embed``, ``latent_pos_embed``, ``time_embedder``,
``vae2llm``, ``llm2vae``. The FLUX autoencoder is a separate module, as in the official code.

Only math lives here: embeddings of the three kinds of token (text, ViT patches, VAE latents),
the velocity head and the text head. Contexts, caches and loops live in ``bagel_engine.runtime``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bagel_engine.model.kv_cache import PackedKV
from bagel_engine.model.qwen2_mot import Qwen2MoTForCausalLM, Routing
from bagel_engine.model.siglip import SiglipVisionModel
from bagel_engine.model.config import ModelConfig

TIME_FREQUENCY_DIM = 256


class TimestepEmbedder(nn.Module):
    """Sinusoid of the flow time t in [0, 1] (cosine half first, no x1000), then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = TIME_FREQUENCY_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class PositionTable(nn.Module):
    """A fixed 2-D sin-cos table (stored in the checkpoint), indexed by ``row * side + col``."""

    def __init__(self, side: int, hidden: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


class Connector(nn.Module):
    def __init__(self, vit_hidden: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(vit_hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


@dataclass
class PackedInputs:
    """One packed training sequence of ``length`` tokens, ready for :meth:`Bagel.forward`: which
    rows hold text ids, ViT patches and latent tokens (already noised, with their flow times), the
    RoPE positions, the attention mask (a (T, T) bool tensor or a flex ``BlockMask``), the rows of
    the understanding expert, and the rows whose velocity and next-token logits are wanted."""

    length: int
    text_ids: torch.Tensor
    text_indexes: torch.Tensor
    position_ids: torch.Tensor
    vit_patches: torch.Tensor
    vit_position_ids: torch.Tensor
    vit_seqlens: list[int]
    vit_indexes: torch.Tensor
    latent_tokens: torch.Tensor  # (Nl, p*p*C)
    latent_times: torch.Tensor  # (Nl,)
    latent_position_ids: torch.Tensor
    vae_indexes: torch.Tensor
    und_indexes: torch.Tensor
    mask: object
    velocity_rows: torch.Tensor
    logit_rows: torch.Tensor


class Bagel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.bagel.connector_act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported connector_act {cfg.bagel.connector_act!r}")
        self.cfg = cfg
        d = cfg.llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(cfg.llm)
        self.time_embedder = TimestepEmbedder(d)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, d)
        self.llm2vae = nn.Linear(d, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionTable(cfg.bagel.max_latent_size, d)
        self.vit_model = SiglipVisionModel(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, d)
        self.vit_pos_embed = PositionTable(cfg.bagel.vit_max_num_patch_per_side, d)

    @property
    def decoder(self):
        return self.language_model.model

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(ids)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """ViT tokens as they enter the LLM: connector(SigLIP(patches)) + vit_pos_embed."""
        dtype = self.vit_model.vision_model.embeddings.patch_embedding.weight.dtype
        out = self.vit_model(patches.to(dtype), position_ids, seqlens)
        out = self.connector(out.to(self.connector.fc1.weight.dtype))
        return out + self.vit_pos_embed(position_ids)

    def embed_latents(self, tokens: torch.Tensor, time_embeds: torch.Tensor, pos_embeds: torch.Tensor) -> torch.Tensor:
        """Latent tokens (..., n, p*p*C) as they enter the LLM: ``vae2llm(x) + time + position``,
        given ``time_embedder(t)`` and ``latent_pos_embed(ids)`` (both broadcastable)."""
        return self.vae2llm(tokens.to(self.vae2llm.weight.dtype)) + time_embeds + pos_embeds

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def forward(self, x: PackedInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The training forward over one packed sequence: (velocities at ``velocity_rows``, logits at
        ``logit_rows``), float32; None where no row is asked for."""
        kind = x.text_ids.device.type
        # the residual stream in the autocast dtype under mixed precision, else in the weights' dtype
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.vae2llm.weight.dtype
        seq = torch.zeros(x.length, self.cfg.llm.hidden_size, device=x.text_ids.device, dtype=dtype)
        seq = seq.index_copy(0, x.text_indexes, self.embed_text(x.text_ids).to(dtype))
        if x.vit_seqlens:
            seq = seq.index_copy(0, x.vit_indexes, self.embed_vit(x.vit_patches, x.vit_position_ids, x.vit_seqlens).to(dtype))
        if x.vae_indexes.numel():
            latents = self.embed_latents(x.latent_tokens, self.time_embedder(x.latent_times),
                                         self.latent_pos_embed(x.latent_position_ids))
            seq = seq.index_copy(0, x.vae_indexes, latents.to(dtype))
        decoder = self.decoder
        hidden = decoder(seq, decoder.rope(x.position_ids, dtype), PackedKV(x.mask), False,
                         Routing(und=x.und_indexes, gen=x.vae_indexes))
        velocity = self.velocity(hidden.index_select(0, x.velocity_rows)).float() if x.velocity_rows.numel() else None
        logits = self.logits(hidden.index_select(0, x.logit_rows)).float() if x.logit_rows.numel() else None
        return velocity, logits
