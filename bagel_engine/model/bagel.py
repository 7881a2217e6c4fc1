"""The Bagel model: the MoT decoder, the SigLIP encoder and the glue between them and the latents.

Attribute names reproduce the official state dict (``ema.safetensors``): ``language_model``,
``vit_model``, ``connector``, ``vit_pos_embed``, ``latent_pos_embed``, ``time_embedder``,
``vae2llm``, ``llm2vae``. The FLUX autoencoder is a separate module, as in the official code.

Only math lives here: embeddings of the three kinds of token (text, ViT patches, VAE latents),
the velocity head and the text head. Contexts, caches and loops live in ``bagel_engine.runtime``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bagel_engine.model.qwen2_mot import Qwen2MoTForCausalLM
from bagel_engine.model.siglip import SiglipVisionModel
from bagel_engine.weights.config import ModelConfig

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
