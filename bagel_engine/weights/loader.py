"""From a model directory or hub id to modules with their weights.

Modules are built on the meta device (no memory, no init cost) and the safetensors files are
streamed in tensor by tensor, cast to the requested dtype and placed on the requested device, so
peak host memory stays near one tensor. Key names are the official ones, unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch import nn

from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.model.bagel import Bagel
from bagel_engine.weights.config import ConfigError, ModelConfig
from bagel_engine.weights.hub import ALL_PATTERNS, SMALL_PATTERNS, HubOptions, looks_like_hub_id, snapshot, split_id

log = logging.getLogger("bagel_engine.weights")

MODEL_FILE, AE_FILE = "ema.safetensors", "ae.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """The weight files do not match what the configs describe."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


# Models shipped inside the package, by name (``bagel_engine.load("bagel-shapes")``).
EMBEDDED_MODELS = {"bagel-shapes": Path(__file__).resolve().parent.parent / "assets" / "bagel-shapes"}


def resolve_model_dir(model: str | os.PathLike, hub: HubOptions | None = None, weights: bool = True) -> Path:
    """A local directory as is; a name of ``EMBEDDED_MODELS`` (the demo model ``bagel-shapes``); otherwise
    a hub id (``owner/name``, ``owner/name@revision``) fetched through huggingface-hub (``weights=False``: its
    configs, tokenizer and indexes only), which honours ``HF_ENDPOINT``, ``HF_HUB_CACHE`` / ``HF_HOME``,
    ``HF_TOKEN`` and ``HF_HUB_OFFLINE``; ``hub`` gives the revision, cache folder and token."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if text in EMBEDDED_MODELS:
        embedded = EMBEDDED_MODELS[text]
        if not (embedded / MODEL_FILE).exists():
            raise ConfigError(f"the embedded model {text!r} is missing from this installation ({embedded})")
        return embedded
    if path.exists() or not looks_like_hub_id(text):
        raise ConfigError(f"model {text!r} is neither a model directory nor a hub id like 'owner/name'")
    repo, hub = split_id(text, hub)
    return snapshot(repo, hub, ALL_PATTERNS if weights else SMALL_PATTERNS)


def hub_repo(model: str | os.PathLike, hub: HubOptions | None = None) -> tuple[str, HubOptions] | None:
    """``(repo id, options)`` when ``model`` names a hub model (not a local directory nor an embedded one)."""
    text = str(model)
    if Path(text).expanduser().exists() or text in EMBEDDED_MODELS or not looks_like_hub_id(text):
        return None
    return split_id(text, hub)


def build_modules(cfg: ModelConfig, device: str | torch.device = "meta") -> tuple[Bagel, AutoEncoder]:
    with torch.device(device):
        return Bagel(cfg), AutoEncoder(cfg.vae)


def expected_tensors(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every tensor name and shape the engine expects in each weight file."""
    bagel, ae = build_modules(cfg, "meta")
    return {
        MODEL_FILE: {k: tuple(v.shape) for k, v in bagel.state_dict().items()},
        AE_FILE: {k: tuple(v.shape) for k, v in ae.state_dict().items()},
    }


@dataclass
class FileReport:
    missing: list[str]
    unexpected: list[str]
    wrong_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # name -> (expected, found)
    dtypes: dict[str, int]  # dtype name -> tensor count
    hints: list[str]
    wrong_dtype: dict[str, str] = field(default_factory=dict)  # name -> stored dtype, where a float is expected
    error: str | None = None  # the file cannot be read as safetensors at all

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype or self.error)


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _unreadable(path: Path, e: Exception) -> str:
    size = path.stat().st_size if path.exists() else 0
    return (f"{path.name} is not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"{size:,} bytes: truncated (an interrupted download?) or not safetensors. Download it again.")


TensorTable = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype as safetensors names it)


def read_headers(path: Path | Sequence[Path]) -> tuple[TensorTable, str | None]:
    """Every tensor's shape and stored dtype in ``path`` (a file, or the shards of one checkpoint), from the
    headers alone; the second value says why a file is unreadable."""
    found: TensorTable = {}
    for one in [path] if isinstance(path, (str, Path)) else list(path):
        try:
            with safe_open(str(one), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError: all "unreadable"
            return found, _unreadable(Path(one), e)
    return found, None


def compare_tensors(found: TensorTable, expected: dict[str, tuple[int, ...]], cfg: ModelConfig) -> FileReport:
    """How the tensors ``found`` (names, shapes, stored dtypes) match ``expected``, with hints."""
    dtypes: dict[str, int] = {}
    for _, dt in found.values():
        dtypes[dt] = dtypes.get(dt, 0) + 1
    shapes = {k: shape for k, (shape, _) in found.items()}
    wrong = {k: (expected[k], shapes[k]) for k in expected.keys() & shapes.keys() if expected[k] != shapes[k]}
    bad_dtype = {k: found[k][1] for k in expected.keys() & found.keys() if found[k][1] not in _FLOAT_DTYPES}
    report = FileReport(sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys()), wrong, dtypes,
                        [], wrong_dtype=bad_dtype)
    report.hints = _hints(report, cfg)
    return report


def check_file(path: Path | Sequence[Path], expected: dict[str, tuple[int, ...]], cfg: ModelConfig) -> FileReport:
    """How the tensors in ``path`` (a file, or the shards of one checkpoint) match ``expected``."""
    found, error = read_headers(path)
    if error:
        return FileReport([], [], {}, {}, [], error=error)
    return compare_tensors(found, expected, cfg)


def _hints(report: FileReport, cfg: ModelConfig) -> list[str]:
    hints = []
    for name, (exp, got) in report.wrong_shape.items():
        side = round(got[0] ** 0.5) if got else 0
        if name == "latent_pos_embed.pos_embed" and side * side == got[0]:
            hints.append(
                f"{name} has {got[0]} = {side}^2 rows but max_latent_size={cfg.bagel.max_latent_size} expects {exp[0]}: "
                f"the checkpoint was trained with max_latent_size={side} (BAGEL-7B-MoT uses 64); "
                f"set it in bagel_config.json"
            )
        elif name == "vit_pos_embed.pos_embed" and side * side == got[0]:
            hints.append(f"{name}: set vit_max_num_patch_per_side={side} in bagel_config.json")
        elif name == "vit_model.vision_model.embeddings.patch_embedding.weight" and len(got) == 4:
            hints.append(f"{name} is a Conv2d weight {got}; the official checkpoint stores the Linear form (out, p*p*c)")
    vit_layers = {k.split(".")[4] for k in report.unexpected if k.startswith("vit_model.vision_model.encoder.layers.")}
    if vit_layers:
        hints.append(
            f"the file holds ViT layer(s) {sorted(vit_layers, key=int)} beyond the {cfg.vit.num_hidden_layers} the "
            "engine builds: vit_config.json's num_hidden_layers should be the checkpoint's layer count + 1 "
            "(the official app drops one)"
        )
    return hints


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def load_weights(module: nn.Module, path: Path | Sequence[Path], device: torch.device, dtype: torch.dtype,
                 cfg: ModelConfig, progress=None) -> None:
    """Stream ``path`` (one file, or the shards of one checkpoint) into ``module`` (built on meta): strict
    names and shapes, cast, placed."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    for one in paths:
        if not one.exists():
            raise CheckpointError(f"{one.name} not found in {one.parent}")
    path = paths[0] if len(paths) == 1 else paths[0].parent
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    report = check_file(paths, expected, cfg)
    if report.error:
        raise CheckpointError(f"{path}: {report.error}")
    if not report.ok:
        lines = [f"{path} does not match the model built from the configs:"]
        if report.missing:
            lines.append(f"  missing ({len(report.missing)}): {', '.join(report.missing[:8])}{' ...' if len(report.missing) > 8 else ''}")
        if report.unexpected:
            lines.append(f"  unexpected ({len(report.unexpected)}): {', '.join(report.unexpected[:8])}{' ...' if len(report.unexpected) > 8 else ''}")
        for k, (e, g) in list(report.wrong_shape.items())[:8]:
            lines.append(f"  {k}: expected {list(e)}, found {list(g)}")
        for k, dt in list(report.wrong_dtype.items())[:8]:
            lines.append(f"  {k}: stored as {dt}, a floating-point weight is expected")
        lines += [f"  hint: {h}" for h in report.hints]
        lines.append("  run `bagel inspect MODEL` for the full report")
        raise CheckpointError("\n".join(lines))
    for one in paths:
        try:
            with safe_open(str(one), framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if t.is_floating_point():
                        t = t.to(dtype)
                    _set_tensor(module, key, t.to(device))
                    if progress is not None:
                        progress(t.numel() * t.element_size())
        except torch.cuda.OutOfMemoryError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{one}: {_unreadable(one, e)}") from None
    module.eval().requires_grad_(False)


def sincos_table_2d(side: int, dim: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table BAGEL stores in ``*_pos_embed``: row ``r*side+c`` is
    ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_k = 10000^(-k/(dim/4))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def enc(pos: torch.Tensor) -> torch.Tensor:
        a = pos.reshape(-1, 1) * omega[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(cols), enc(rows)], dim=1).float()


@torch.no_grad()
def init_random(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Materialise a meta-built module with random weights (for benchmarks of the real architecture):
    normal(0, 0.02) matrices, zero biases, unit norm weights, the real sin-cos position tables."""
    module.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("pos_embed"):
            side = round(p.shape[0] ** 0.5)
            p.copy_(sincos_table_2d(side, p.shape[1]))
        elif leaf == "bias":
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    module.to(dtype=dtype).eval().requires_grad_(False)
