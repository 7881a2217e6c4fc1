"""LoRA adapters: a few hundred MB instead of a 29 GB checkpoint, in PEFT's layout.

``bagel train --lora-rank`` writes, beside each checkpoint's merged weights, the adapter as PEFT
(and every tool built on it: diffusers, the BAGEL RL trainers) writes one:

- ``adapter_config.json``: ``{"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": REGEX, ...}``,
  the target modules named as in the official model (``language_model.model.layers.N.self_attn.q_proj_moe_gen``,
  ``...mlp_moe_gen.up_proj``: the generation expert's projections);
- ``adapter_model.safetensors``: ``base_model.model.NAME.lora_A.weight`` (rank x in) and ``...lora_B.weight``
  (out x rank) for each adapted linear layer ``NAME``.

``bagel_engine.load(base, lora=DIR)`` merges ``scale * B @ A`` into each ``NAME.weight`` (``scale`` =
``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` per layer),
so the fine-tuned model runs at the base model's speed. PEFT adapters made elsewhere load the same way: on
the whole BAGEL model (keys ``base_model.model.language_model...``) or on its language model alone
(``base_model.model.model.layers...``). The older bagel-engine file (``lora_adapter.safetensors``, its
rank and alpha in the metadata) is still read.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bagel_engine.weights.config import ConfigError
from bagel_engine.weights.files import save_safetensors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
LEGACY_FORMAT = "bagel-engine-lora"
LEGACY_FILE = "lora_adapter.safetensors"
_KEY = re.compile(r"^(?P<name>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# {layer name: (A, B, scale)}
Layers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


# ----------------------------------------------------------------------------- writing
def target_modules(names: list[str]) -> str | list[str]:
    """PEFT's ``target_modules`` for exactly ``names``: a regex over the decoder layers' projections
    (``.*\\.layers\\.\\d+\\.(?:self_attn\\.q_proj_moe_gen|...)``), or the names themselves."""
    tails = set()
    for name in names:
        head, sep, rest = name.partition(".layers.")
        index, _, tail = rest.partition(".")
        if not sep or not index.isdigit() or not tail:
            return sorted(names)
        tails.add(tail)
    return r".*\.layers\.\d+\.(?:" + "|".join(re.escape(t) for t in sorted(tails)) + ")"


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], rank: int, alpha: float, targets: str,
                 base_model: str | None = None) -> None:
    """Write ``tensors`` (``NAME.lora_A`` / ``NAME.lora_B``) in PEFT's layout into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    state = {}
    for name in names:
        for ab in ("A", "B"):
            state[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"] = tensors[f"{name}.lora_{ab}"].detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": target_modules(names),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True,
    }
    save_safetensors(state, folder / PEFT_WEIGHTS, metadata={"format": "pt", "bagel_engine_lora_targets": targets})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------- reading
def read_adapter(path: str | Path) -> Layers:
    """``{layer: (A, B, scale)}`` of an adapter: a PEFT folder (or its ``adapter_model.safetensors``), a
    ``bagel train`` checkpoint folder, or an older bagel-engine ``lora_adapter.safetensors``."""
    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG).exists():
            return _read_peft(path)
        if (path / LEGACY_FILE).exists():
            return _read_legacy(path / LEGACY_FILE)
        raise ConfigError(f"no LoRA adapter in {path}: expected {PEFT_CONFIG} with {PEFT_WEIGHTS} (PEFT's layout) "
                          f"or {LEGACY_FILE}")
    if not path.exists():
        raise ConfigError(f"LoRA adapter {path} not found")
    if path.name == PEFT_CONFIG or (path.parent / PEFT_CONFIG).exists() and path.name in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN):
        return _read_peft(path.parent)
    with safe_open(str(path), framework="pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt == LEGACY_FORMAT:
        return _read_legacy(path)
    raise ConfigError(f"{path} is not a LoRA adapter this loader knows: give the folder with {PEFT_CONFIG} "
                      f"(PEFT's layout) or a bagel-engine {LEGACY_FILE}")


def _read_legacy(path: Path) -> Layers:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = float(meta["lora_alpha"]) / float(meta["lora_rank"])
    layers: Layers = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            if f"{name}.lora_B" not in tensors:
                raise ConfigError(f"{path}: {name}.lora_A has no lora_B")
            layers[name] = (tensors[key], tensors[f"{name}.lora_B"], scale)
    if not layers:
        raise ConfigError(f"{path} holds no adapter")
    return layers


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the first key matching the end of the layer's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def _read_peft(folder: Path) -> Layers:
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {folder / PEFT_CONFIG}: {e}") from None
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ConfigError(f"{folder} holds a {kind} adapter; only LoRA adapters can be merged into BAGEL's weights")
    for flag, why in (("use_dora", "DoRA adapters"), ("fan_in_fan_out", "fan_in_fan_out (Conv1D) adapters")):
        if config.get(flag):
            raise ConfigError(f"{folder}: {why} are not supported; merge it with PEFT (merge_and_unload) and load "
                              "the merged weights")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ConfigError(f"{folder}: adapters that also train biases or whole modules (bias / modules_to_save) "
                          "are not supported")
    tensors = _peft_tensors(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, value in tensors.items():
        m = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if m is None:
            raise ConfigError(f"{folder}: unexpected tensor {key!r} in the adapter (only lora_A / lora_B weights "
                              "of linear layers can be merged)")
        adapters.add(m["adapter"])
        pairs.setdefault(m["name"], {})[m["ab"]] = value
    if len(adapters) > 1:
        raise ConfigError(f"{folder} holds several adapters ({', '.join(sorted(map(str, adapters)))}): give one")
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    layers: Layers = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{folder}: {name} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        r = int(_pattern_value(config.get("rank_pattern"), name, rank))
        if ab["A"].shape[0] != r:
            raise ConfigError(f"{folder}: {name}.lora_A has rank {ab['A'].shape[0]}, the config says {r}")
        a = float(_pattern_value(config.get("alpha_pattern"), name, alpha))
        layers[name] = (ab["A"], ab["B"], a / math.sqrt(r) if config.get("use_rslora") else a / r)
    if not layers:
        raise ConfigError(f"{folder} holds no adapter weights")
    return layers


def _peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / PEFT_WEIGHTS).exists():
        with safe_open(str(folder / PEFT_WEIGHTS), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    if (folder / PEFT_WEIGHTS_BIN).exists():
        return torch.load(folder / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    raise ConfigError(f"{folder} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")


# ----------------------------------------------------------------------------- merging
def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``weight + scale * B @ A``, computed in float32, in the weight's dtype and device."""
    return (weight.float() + scale * (b.to(weight.device).float() @ a.to(weight.device).float())).to(weight.dtype)


def _module_for(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The layer an adapter's name means: the whole model's name, or the language model's alone."""
    for candidate in (name, f"language_model.{name}"):
        if candidate in modules:
            return modules[candidate]
    return None


@torch.no_grad()
def merge_adapter(model: nn.Module, path: str | Path, strength: float = 1.0) -> int:
    """Add the adapter's low-rank updates to ``model``'s weights; returns the layers changed."""
    layers = read_adapter(path)
    modules = dict(model.named_modules())
    for name, (a, b, scale) in layers.items():
        module = _module_for(modules, name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"the adapter targets {name!r}, which is not a linear layer of this model")
        w = module.weight
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ConfigError(f"the adapter for {name} is {b.shape[0]}x{a.shape[1]}, the layer {tuple(w.shape)}: "
                              "another base model?")
        w.copy_(merged_weight(w, a, b, strength * scale))
    return len(layers)
