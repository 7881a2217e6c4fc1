"""Where the modules go and how they get their weights: ``Placement`` (device, dtypes, quantization,
offload, adapters) and ``load_modules(model_dir, cfg, placement)``, the one place that builds the decoder
and the VAE, reads or draws their weights, merges LoRA adapters, quantizes and offloads."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.model.bagel import Bagel
from bagel_engine.model.config import ModelConfig
from bagel_engine.weights.layout import Checkpoint
from bagel_engine.weights.loader import build_modules, init_random, load_weights

log = logging.getLogger("bagel_engine")

QUANTIZE_METHODS = ("fp8", "int8", "nf4")
OFFLOAD_MODES = ("model", "layer")


@dataclass(frozen=True)
class Placement:
    """``device`` and ``dtype`` of the decoder; the VAE runs on the device (bf16 on a GPU) unless
    ``official_numerics`` keeps it on the CPU in float32. ``offload`` keeps the decoder's weights in CPU
    memory and streams them to ``device``. ``tensor_parallel``: a process group over which every big matrix is
    split (``weights.tensor_parallel``). ``device.type == "meta"``: build only, read nothing."""

    device: torch.device
    dtype: torch.dtype
    official_numerics: bool = False
    quantize: str | None = None
    offload: str | None = None
    lora: tuple[str | os.PathLike, ...] = ()
    lora_strength: float = 1.0
    random_weights: bool = False  # draw the weights (seeded by ``seed``) instead of reading them
    seed: int = 0
    tensor_parallel: Any = None
    shard_weights: Any = None  # a process group the decoder layers' weights are sharded over (``weights.sharded``)
    devices: tuple[torch.device, ...] = ()  # the decoder's layers split over these (``weights.layer_split``)
    layer_split: tuple[int, ...] = ()  # layers per device (default: even, the first device fewer)
    max_memory: tuple[int, ...] = ()  # or: weight bytes per device, filled in order (``weights.layer_split``)

    def __post_init__(self):
        if self.tensor_parallel is not None and self.offload:
            raise ValueError("offload does not run with tensor parallel: each rank already holds a share of the weights")
        if self.devices and (self.offload or self.tensor_parallel is not None or self.shard_weights is not None):
            raise ValueError("devices (a layer split over cards) does not run with offload, tensor parallel or sharded "
                             "weights")
        if self.shard_weights is not None and (self.offload or self.quantize or self.tensor_parallel is not None):
            raise ValueError("shard_weights runs with bf16 / fp32 weights alone: not with offload, quantize or tensor "
                             "parallel (each already splits or streams the weights)")
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise ValueError(f"unknown quantize {self.quantize!r}; choose one of {', '.join(QUANTIZE_METHODS)}")
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise ValueError(f"unknown offload {self.offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")

    @staticmethod
    def adapters(lora: str | os.PathLike | Sequence[str | os.PathLike] | None) -> tuple:
        return () if lora is None else (lora,) if isinstance(lora, (str, os.PathLike)) else tuple(lora)

    @property
    def weights_device(self) -> torch.device:
        # tensor parallel: the whole weights on the CPU first, this rank's shards to the device
        sharded = self.tensor_parallel is not None or self.shard_weights is not None or bool(self.devices)
        return torch.device("cpu") if self.offload or sharded else self.device

    @property
    def vae_device(self) -> torch.device:
        return torch.device("cpu") if self.official_numerics and self.device.type != "meta" else self.device

    @property
    def vae_dtype(self) -> torch.dtype:
        # The VAE runs in bf16 on a GPU (fast path) and in float32 on the CPU (official path).
        return torch.bfloat16 if self.vae_device.type == "cuda" else torch.float32


def load_modules(checkpoint: Checkpoint, cfg: ModelConfig, placement: Placement,
                 progress: Callable[[int], None] | None = None) -> tuple[Bagel, AutoEncoder]:
    """The decoder and the VAE of ``checkpoint`` (``weights.layout``), placed; ``progress(bytes)`` as the
    weights are read."""
    p = placement
    bagel, vae = build_modules(cfg, "meta")
    if p.device.type == "meta":
        return bagel, vae
    if p.random_weights:
        init_random(bagel, p.weights_device, p.dtype, p.seed)
        init_random(vae, p.vae_device, p.vae_dtype, p.seed + 1)
    else:
        load_weights(bagel, checkpoint.weights, p.weights_device, p.dtype, cfg, progress=progress)
        load_weights(vae, checkpoint.vae, p.vae_device, p.vae_dtype, cfg, progress=progress)
    for adapter in p.lora:
        from bagel_engine.weights.adapters import merge_adapter

        count = merge_adapter(bagel, adapter, p.lora_strength)
        log.info("merged the LoRA adapter %s (%d layers, strength %g)", adapter, count, p.lora_strength)
    if p.tensor_parallel is not None:
        from bagel_engine.weights.tensor_parallel import shard_model

        shard_model(bagel, p.tensor_parallel).to(p.device)
    if p.devices:
        from bagel_engine.weights.layer_split import split_layers

        split_layers(bagel, list(p.devices), p.layer_split or None, p.max_memory or None)
    if p.shard_weights is not None:
        from bagel_engine.weights.sharded import shard_layers

        shard_layers(bagel, p.shard_weights, p.device)
    if p.quantize:
        from bagel_engine.weights.quantize import quantize_model

        quantize_model(bagel, p.quantize)
    if p.offload:
        from bagel_engine.weights.offload import apply_offload

        apply_offload(bagel, p.offload, p.device)
    return bagel, vae


def weight_bytes_bar(checkpoint: Checkpoint):
    """A progress bar over the bytes of the weight files (``bar.update(n)`` as they are read)."""
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in (*checkpoint.weights, checkpoint.vae) if f.exists())
    return tqdm(total=total, unit="B", unit_scale=True, desc="loading weights")
