"""The model's configuration dataclasses, beside the math they size (the defaults are the real
BAGEL-7B-MoT's). Reading them from a model directory's JSON files is ``bagel_engine.weights.config``'s job."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LLMConfig:
    """Qwen2 decoder with two experts per layer (Mixture-of-Transformers)."""

    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    vocab_size: int = 152064
    max_position_embeddings: int = 32768  # the context length (tokens)
    # The official app forces these two regardless of the json.
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ViTConfig:
    """SigLIP NaViT vision encoder, *after* the official load-time adjustment (one layer fewer)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 26
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class VAEConfig:
    """FLUX autoencoder parameters (the official ``load_ae`` hard-codes these values)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class BagelConfig:
    """The glue between the parts; values the official app passes to ``BagelConfig``."""

    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    # ImageTransform(max_size, min_size, stride) for the VAE and the ViT inputs.
    vae_transform: tuple[int, int, int] = (1024, 512, 16)
    vit_transform: tuple[int, int, int] = (980, 224, 14)


@dataclass(frozen=True)
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    bagel: BagelConfig = field(default_factory=BagelConfig)

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsample x latent patch size (16 for the real model)."""
        return self.vae.downsample * self.bagel.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.bagel.latent_patch_size**2 * self.vae.z_channels

    @property
    def max_image_side(self) -> int:
        """Largest generated side in pixels the latent position table allows (1024 for the real model)."""
        return self.bagel.max_latent_size * self.latent_downsample
