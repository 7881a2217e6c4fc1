"""How the configuration (``bagel_engine.model.config``) is read from an official BAGEL model directory.

The official checkpoint ships only ``llm_config.json`` and ``vit_config.json``; the official app
hard-codes the rest (VAE parameters, latent sizes, image transforms) and applies a few overrides at
load time. This module reproduces exactly that, and lets two optional files (``ae_config.json``,
``bagel_config.json``) override the hard-coded values for other checkpoints such as tiny test models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bagel_engine.model.config import BagelConfig, LLMConfig, ModelConfig, VAEConfig, ViTConfig
from bagel_engine.params import ConfigError, TaskDefaults
from bagel_engine.weights.layout import Checkpoint

__all__ = ["BagelConfig", "ConfigError", "LLMConfig", "ModelConfig", "VAEConfig", "ViTConfig", "load_model_config"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path.name} not found in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _pick(cls, data: dict[str, Any], **forced: Any):
    """Build dataclass ``cls`` from the keys of ``data`` it knows, then apply ``forced`` values."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names}
    kwargs.update(forced)
    for f in dataclasses.fields(cls):
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    return cls(**kwargs)


def llm_config_from_json(data: dict[str, Any]) -> LLMConfig:
    # The official app forces qk_norm=True and untied embeddings whatever the file says.
    return _pick(LLMConfig, data, qk_norm=True, tie_word_embeddings=False)


def vit_config_from_json(data: dict[str, Any]) -> ViTConfig:
    if "num_hidden_layers" not in data:
        raise ConfigError("vit_config.json has no num_hidden_layers")
    # The official app drops the last SigLIP layer (it uses the penultimate layer's output)
    # and disables the ViT RoPE; the checkpoint holds num_hidden_layers - 1 layers.
    return _pick(ViTConfig, data, num_hidden_layers=int(data["num_hidden_layers"]) - 1)


def model_config_from(llm: dict[str, Any], vit: dict[str, Any], ae: dict[str, Any] | None = None,
                      bagel: dict[str, Any] | None = None, where: str = "") -> ModelConfig:
    """The model's configuration from the official config objects (llm_config, vit_config, optional
    ae_config and bagel_config)."""
    vae = VAEConfig()
    if ae is not None:
        vae = _pick(VAEConfig, ae)
        if "downsample" in ae and int(ae["downsample"]) != vae.downsample:
            raise ConfigError(
                f"{where}ae_config: downsample {ae['downsample']} does not match ch_mult {list(vae.ch_mult)} "
                f"(which gives {vae.downsample})"
            )
    cfg = ModelConfig(llm=llm_config_from_json(llm), vit=vit_config_from_json(vit), vae=vae,
                      bagel=_pick(BagelConfig, bagel) if bagel is not None else BagelConfig())
    validate(cfg)
    return cfg


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read the configuration of an official-layout model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    optional = {name: _read_json(model_dir / f"{name}.json") if (model_dir / f"{name}.json").exists() else None
                for name in ("ae_config", "bagel_config")}
    return model_config_from(_read_json(model_dir / "llm_config.json"), _read_json(model_dir / "vit_config.json"),
                             optional["ae_config"], optional["bagel_config"])


def checkpoint_config(ck: Checkpoint) -> ModelConfig:
    """The configuration of a checkpoint of any layout (``weights.layout``): from its directory, the
    metadata of its single weight file, or the base model's configs."""
    def read(name: str) -> dict[str, Any] | None:
        if name in ck.metadata_configs and (ck.config_dir is None or not (ck.config_dir / f"{name}.json").exists()):
            return ck.metadata_configs[name]
        if name in ("llm_config", "vit_config"):
            if ck.config_dir is None:
                raise ConfigError(f"{ck.weights[0].name}: its metadata has no {name}")
            return _read_json(ck.config_dir / f"{name}.json")
        path = ck.file(f"{name}.json")
        return _read_json(path) if path is not None else None

    return model_config_from(read("llm_config"), read("vit_config"), read("ae_config"), read("bagel_config"))


def read_task_defaults_file(path: str | Path) -> dict[str, Any]:
    """A ``task_defaults.json`` file's content (``{"t2i": {...}, "edit": {...}, ...}``)."""
    return _read_json(Path(path))


def checkpoint_task_defaults(ck: Checkpoint, given: str | Path | dict | None = None) -> TaskDefaults:
    """The given per-task defaults (a dict or a JSON file), else the model directory's ``task_defaults.json``
    (else the base's), else the official app's."""
    if isinstance(given, dict):
        return TaskDefaults.from_dict(given, "task_defaults")
    path = Path(given) if given is not None else ck.file("task_defaults.json")
    if path is None:
        return TaskDefaults()
    if not path.exists():
        raise ConfigError(f"task defaults file {path} not found")
    return TaskDefaults.from_dict(read_task_defaults_file(path), str(path))


def validate(cfg: ModelConfig) -> None:
    llm, vit = cfg.llm, cfg.vit
    if llm.hidden_size % llm.num_attention_heads:
        raise ConfigError("llm hidden_size must be a multiple of num_attention_heads")
    if llm.num_attention_heads % llm.num_key_value_heads:
        raise ConfigError("llm num_attention_heads must be a multiple of num_key_value_heads")
    if vit.hidden_size % vit.num_attention_heads:
        raise ConfigError("vit hidden_size must be a multiple of num_attention_heads")
    if cfg.bagel.vae_transform[2] % cfg.latent_downsample:
        raise ConfigError(
            f"vae_transform stride {cfg.bagel.vae_transform[2]} must be a multiple of the latent "
            f"downsample {cfg.latent_downsample}"
        )
    if cfg.bagel.vit_transform[2] % vit.patch_size:
        raise ConfigError("vit_transform stride must be a multiple of the ViT patch size")
