"""Training checkpoints as model directories in the official layout.

``OUTPUT/checkpoint-000100/`` holds everything ``bagel_engine.load`` (and the official code) reads:
the configs and tokenizer files of the base model (from wherever its layout keeps them: its directory,
the base configs it was filled from, the metadata of a single-file checkpoint), its ``ae.safetensors``
(the VAE is not trained: a hard link where the file system allows, else a copy) and ``ema.safetensors``
with the
trained weights (the EMA weights when ``ema`` is on), in the base checkpoint's dtype and with the
official key names. ``trainer/`` beside them holds what resuming needs: the raw weights when they
differ from the EMA, the optimizer, the step, the data position and the random states.
``OUTPUT/latest`` names the newest complete checkpoint. A checkpoint is written under a temporary
name and renamed when complete, so a run killed while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bagel_engine.params import disk_full, is_disk_full
from bagel_engine.weights.files import save_safetensors
from bagel_engine.weights.layout import CONFIG_FILES, INDEX_SUFFIX, TOKENIZER_FILES, Checkpoint

WEIGHTS = ("ema.safetensors", "ae.safetensors")
PREFIX = "checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype of the floating tensors of a safetensors file (its first floating tensor)."""
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _state(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in tensors.items()}


def _as_checkpoint(base: Path | Checkpoint) -> Checkpoint:
    if isinstance(base, Checkpoint):
        return base
    return Checkpoint(model_dir=base, layout="official", weights=(base / WEIGHTS[0],), vae=base / WEIGHTS[1],
                      config_dir=base, tokenizer_dir=base)


def _is_weights(name: str) -> bool:
    """Weight files (and what describes them) of the base, which a checkpoint does not carry over: its own
    ``ema.safetensors`` replaces them, a LoRA run writes its own adapter."""
    return name.endswith(".safetensors") or name.endswith(INDEX_SUFFIX) or name == "adapter_config.json"


def _copy_base_files(base: Checkpoint, into: Path) -> None:
    """The base model's small files: everything in its directory but weights, then the configs and tokenizer
    files its layout found elsewhere (the base it was filled from, or a single file's metadata)."""
    for src in base.model_dir.iterdir():
        if src.is_file() and not _is_weights(src.name) and not src.name.startswith("."):
            shutil.copy2(src, into / src.name)
    for folder, names in ((base.config_dir, CONFIG_FILES), (base.tokenizer_dir, TOKENIZER_FILES)):
        for name in names:
            if folder is not None and not (into / name).exists() and (folder / name).exists():
                shutil.copy2(folder / name, into / name)
    for key, config in base.metadata_configs.items():
        if not (into / f"{key}.json").exists():
            (into / f"{key}.json").write_text(json.dumps(config, indent=2))
    for name in ("task_defaults.json", "ae_config.json", "bagel_config.json"):
        found = base.file(name)
        if found is not None and not (into / name).exists():
            shutil.copy2(found, into / name)


def save_checkpoint(output_dir: Path, step: int, base_dir: Path | Checkpoint, weights: dict[str, torch.Tensor],
                    trainer_state: dict, trainer_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    dtype: torch.dtype | None = None, keep: int | None = None,
                    adapter: dict | None = None) -> Path:
    """Write ``checkpoint-{step}`` (see the module doc) and point ``latest`` at it. ``weights``: the
    full state dict to publish; ``base_dir``: the base model's directory (official layout) or its
    :class:`Checkpoint` (any layout); ``trainer_tensors``: named float32 tensor sets for resuming (the
    trained parameters, their EMA), each stored as ``trainer/{name}.safetensors``. ``adapter``: the
    keyword arguments of ``weights.adapters.save_adapter`` (LoRA runs), written in PEFT's layout
    (``adapter_config.json``, ``adapter_model.safetensors``) beside the merged weights."""
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / checkpoint_name(step)
    tmp = output_dir / (final.name + ".tmp")
    try:
        _write_checkpoint(tmp, base_dir, weights, trainer_state, trainer_tensors, dtype, adapter)
    except BaseException as e:  # a crash or a full disk: no half checkpoint left, the previous one intact
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            before = latest_checkpoint(output_dir)
            raise disk_full(e, f"{final.name} in {output_dir}", (
                f"the previous checkpoint ({before.name}) is intact; free some space and rerun the same command "
                "to resume from it" if before else "free some space and rerun the same command")) from e
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = output_dir / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, output_dir / "latest")
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, base_dir: Path | Checkpoint, weights: dict[str, torch.Tensor], trainer_state: dict,
                      trainer_tensors: dict[str, dict[str, torch.Tensor]] | None, dtype: torch.dtype | None,
                      adapter: dict | None) -> None:
    base = _as_checkpoint(base_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _copy_base_files(base, tmp)
    _link_or_copy(base.vae, tmp / "ae.safetensors")
    dtype = dtype or (stored_dtype(base.weights[0]) if base.weights else torch.float32)
    save_safetensors(_state(weights, dtype), tmp / "ema.safetensors", metadata={"format": "pt"})
    if adapter is not None:
        from bagel_engine.weights.adapters import save_adapter

        save_adapter(tmp, **adapter)
    state_dir = tmp / "trainer"
    state_dir.mkdir()
    for name, tensors in (trainer_tensors or {}).items():
        save_safetensors(_state(tensors, torch.float32), state_dir / f"{name}.safetensors")
    torch.save(trainer_state, state_dir / "state.pt")
    (state_dir / "summary.json").write_text(json.dumps(
        {k: v for k, v in trainer_state.items() if isinstance(v, (int, float, str, bool, dict, list))
         and k not in ("optimizer", "data", "rng")}, indent=2, default=str))


def list_checkpoints(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob(PREFIX + "*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest_checkpoint(output_dir: Path) -> Path | None:
    marker = output_dir / "latest"
    if marker.exists():
        path = output_dir / marker.read_text().strip()
        if (path / "trainer" / "state.pt").exists():
            return path
    done = [p for p in list_checkpoints(output_dir) if (p / "trainer" / "state.pt").exists()]
    return done[-1] if done else None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(trainer tensor sets by name, trainer state) of a checkpoint written by :func:`save_checkpoint`.

    The state is read with ``weights_only=True``: tensors, numbers, strings and containers only, so
    resuming from a folder someone else made cannot run their code."""
    from bagel_engine.params import BagelInputError

    try:
        state = torch.load(path / "trainer" / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BagelInputError(f"{path / 'trainer' / 'state.pt'} holds more than tensors and plain values "
                              f"(refused, nothing of it was run): {str(e).splitlines()[0]}") from None
    tensors = {p.stem: load_file(str(p)) for p in sorted((path / "trainer").glob("*.safetensors"))}
    return tensors, state
