"""Which files make a checkpoint: the BAGEL family does not name them all the same way.

:func:`find_checkpoint` looks at a model directory and returns a :class:`Checkpoint`: the decoder's weight
file(s), the VAE's, where the configs and the tokenizer come from, and the layout's name, which
``bagel inspect`` prints. In order:

- ``--weights-file FILE``: that file (a ``*.safetensors.index.json`` means its shards);
- ``ema.safetensors``: the official layout (ByteDance-Seed/BAGEL-7B-MoT and most fine-tunes);
- ``model_bf16.safetensors``: Bagel-Zebra-CoT's;
- ``model.safetensors``: what trainers write (FSDP checkpoints converted, merged with the base);
- ``*.safetensors.index.json``: sharded weights, ``{"weight_map": {tensor: file}}``;
- one other ``*.safetensors`` besides ``ae.safetensors``: a single-file conversion (ComfyUI's
  ``6chan/bagel_comfy``), its configs in the safetensors metadata (``llm_config`` and ``vit_config``, JSON
  text, or one ``config`` object holding both).

Configs (``llm_config.json``, ``vit_config.json``), the tokenizer, ``ae.safetensors`` and
``task_defaults.json`` missing from the directory (quantized uploads, bare trainer outputs) come from the
base model's, ``base_config``: a directory, a hub id (its small files, and its VAE when the directory has
none), or ``bagel-7b-mot``, the copy of
the real model's configs shipped in the package. Tensor names are the official ones in every layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from safetensors import safe_open

from bagel_engine.params import ConfigError
from bagel_engine.weights.hub import HubOptions, looks_like_hub_id, snapshot, split_id

log = logging.getLogger(__name__)

OFFICIAL, ZEBRA, TRAINER = "ema.safetensors", "model_bf16.safetensors", "model.safetensors"
AE = "ae.safetensors"
CONFIG_FILES = ("llm_config.json", "vit_config.json")
OPTIONAL_CONFIGS = ("ae_config.json", "bagel_config.json", "task_defaults.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
INDEX_SUFFIX = ".safetensors.index.json"
SHIPPED_CONFIGS = {"bagel-7b-mot": Path(__file__).resolve().parent.parent / "assets" / "bagel-7b-mot"}
LAYOUT_NAMES = {
    OFFICIAL: "official (ema.safetensors)",
    ZEBRA: "Bagel-Zebra-CoT (model_bf16.safetensors)",
    TRAINER: "trainer output (model.safetensors)",
}


@dataclass(frozen=True)
class Checkpoint:
    model_dir: Path
    layout: str  # how the weights were found, in words
    weights: tuple[Path, ...]  # the decoder's (ViT, connector, LLM) file(s)
    vae: Path
    config_dir: Path | None  # where llm_config.json / vit_config.json are read; None: from the metadata
    metadata_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # single-file layout
    tokenizer_dir: Path | None = None
    base_dir: Path | None = None  # the base model's files, for what the directory lacks
    filled_from: str | None = None  # the base model the missing files came from
    remote: tuple[str, ...] = ()  # names of files on the hub, not in model_dir (inspect reads their headers)

    def file(self, name: str) -> Path | None:
        """``name`` (ae_config.json, bagel_config.json, task_defaults.json) from the directory, else the base's."""
        for folder in (self.model_dir, self.base_dir):
            if folder is not None and (folder / name).exists():
                return folder / name
        return None

    def describe(self) -> str:
        files = ", ".join(p.name for p in self.weights)
        text = f"{self.layout}: {files}"
        if self.filled_from:
            text += f"; missing configs/tokenizer/VAE from {self.filled_from}"
        return text


class _Listing:
    """The file names of a model directory, plus those of its hub repo not downloaded (``remote``)."""

    def __init__(self, model_dir: Path, remote: Collection[str] = ()) -> None:
        local = {p.name for p in model_dir.iterdir()} if model_dir.is_dir() else set()
        self.names = local | set(remote)
        self.remote = set(remote) - local

    def has(self, path: Path) -> bool:
        return path.exists() or path.name in self.remote

    def matching(self, suffix: str) -> list[str]:
        return sorted(n for n in self.names if n.endswith(suffix) and not n.startswith("."))


def _index_shards(index: Path, listing: _Listing) -> tuple[Path, ...]:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
    shards = tuple(dict.fromkeys(index.parent / str(f) for f in weight_map.values()))
    missing = [p.name for p in shards if not listing.has(p)]
    if missing:
        raise ConfigError(f"{index.name} names shard(s) not in {index.parent}: {', '.join(missing[:4])}")
    return shards


def _metadata_configs(path: Path, remote_metadata: Callable[[str], dict[str, str]] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """``{"llm_config": {...}, "vit_config": {...}, ...}`` from a safetensors file's metadata, if it has them
    (``remote_metadata(name)``: the metadata of a file on the hub, not downloaded)."""
    if not path.exists() and remote_metadata is not None:
        meta = remote_metadata(path.name)
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - not safetensors: the loader reports it later
            return {}
    out: dict[str, dict[str, Any]] = {}
    raw = dict(meta)
    if "config" in raw:
        try:
            bundle = json.loads(raw["config"])
            if isinstance(bundle, dict):
                raw.update({k: json.dumps(v) for k, v in bundle.items() if isinstance(v, dict)})
        except ValueError:
            pass
    for key in ("llm_config", "vit_config", "ae_config", "bagel_config"):
        if key in raw:
            try:
                value = json.loads(raw[key])
            except ValueError:
                raise ConfigError(f"{path.name}: its metadata {key!r} is not JSON") from None
            if isinstance(value, dict):
                out[key] = value
    return out


def _weights(model_dir: Path, weights_file: str | Path | None, listing: _Listing) -> tuple[str, tuple[Path, ...]]:
    if weights_file is not None:
        path = Path(weights_file)
        path = path if path.is_absolute() else model_dir / path
        if not listing.has(path):
            raise ConfigError(f"--weights-file {weights_file}: {path} not found")
        if path.name.endswith(INDEX_SUFFIX):
            shards = _index_shards(path, listing)
            return f"sharded ({len(shards)} files, {path.name})", shards
        return f"chosen file ({path.name})", (path,)
    for name in (OFFICIAL, ZEBRA, TRAINER):
        if listing.has(model_dir / name):
            return LAYOUT_NAMES[name], (model_dir / name,)
    indexes = listing.matching(INDEX_SUFFIX)
    if len(indexes) == 1:
        shards = _index_shards(model_dir / indexes[0], listing)
        return f"sharded ({len(shards)} files, {indexes[0]})", shards
    if len(indexes) > 1:
        raise ConfigError(f"{model_dir} has several weight indexes ({', '.join(indexes)}): "
                          "choose one with --weights-file")
    others = [n for n in listing.matching(".safetensors") if n != AE]
    if len(others) == 1:
        return f"single file ({others[0]})", (model_dir / others[0],)
    if others:
        raise ConfigError(f"{model_dir} has no {OFFICIAL} and several weight files ({', '.join(others)}): "
                          "choose one with --weights-file")
    raise ConfigError(f"no weights in {model_dir}: expected {OFFICIAL} (or {ZEBRA}, {TRAINER}, a sharded "
                      f"*{INDEX_SUFFIX}, or --weights-file FILE)")


def resolve_base(base_config: str | Path, hub: HubOptions | None = None, with_vae: bool = False) -> Path:
    """The directory a ``base_config`` names: a directory, ``bagel-7b-mot`` (shipped), or a hub id
    (``org/name[@rev]``: its small files only, and its ``ae.safetensors`` if ``with_vae``)."""
    text = str(base_config)
    if text.lower() in SHIPPED_CONFIGS:
        return SHIPPED_CONFIGS[text.lower()]
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not looks_like_hub_id(text):
        raise ConfigError(f"--base-config {text!r} is neither a model directory, a hub id, nor one of "
                          f"{', '.join(SHIPPED_CONFIGS)}")
    repo, options = split_id(text, HubOptions(cache_dir=hub.cache_dir, token=hub.token) if hub else None)
    return snapshot(repo, options, [*CONFIG_FILES, *OPTIONAL_CONFIGS, *TOKENIZER_FILES, *([AE] if with_vae else [])])


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()


def find_checkpoint(model_dir: str | Path, weights_file: str | Path | None = None,
                    base_config: str | Path | None = None, need_weights: bool = True, *,
                    remote_files: Collection[str] = (),
                    remote_metadata: Callable[[str], dict[str, str]] | None = None,
                    hub: HubOptions | None = None) -> Checkpoint:
    """The files of the checkpoint in ``model_dir`` (see the module doc). ``need_weights=False``: the
    configs alone (random weights, a memory plan). ``remote_files``: the names of its hub repo's files that
    were not downloaded, ``remote_metadata(name)`` their safetensors metadata (``bagel inspect HUB_ID``
    reads headers, not weights); ``hub``: how to reach a ``base_config`` hub id."""
    model_dir = Path(model_dir)
    listing = _Listing(model_dir, remote_files)
    try:
        layout, weights = _weights(model_dir, weights_file, listing)
    except ConfigError:
        if need_weights:
            raise
        layout, weights = "configs only", ()
    metadata = (_metadata_configs(weights[0], remote_metadata)
                if len(weights) == 1 and weights[0].name != OFFICIAL else {})
    with_vae = need_weights and not listing.has(model_dir / AE)
    base = resolve_base(base_config, hub, with_vae) if base_config is not None else None
    have_configs = all((model_dir / f).exists() for f in CONFIG_FILES)
    if have_configs:
        config_dir = model_dir
    elif {"llm_config", "vit_config"} <= metadata.keys():
        config_dir = None
        layout += ", configs in its metadata"
    elif base is not None:
        config_dir = base
    else:
        missing = [f for f in CONFIG_FILES if not (model_dir / f).exists()]
        raise ConfigError(f"{model_dir} has no {' / '.join(missing)}: give the base model's with --base-config "
                          "(a directory, a hub id such as ByteDance-Seed/BAGEL-7B-MoT, or bagel-7b-mot for the "
                          "real model's configs shipped in the package)")
    tokenizer_dir = model_dir if _has_tokenizer(model_dir) or base is None else base
    vae = model_dir / AE
    if not listing.has(vae) and base is not None and (base / AE).exists():
        vae = base / AE
    filled = base is not None and (config_dir == base or tokenizer_dir == base or vae.parent == base)
    return Checkpoint(model_dir=model_dir, layout=layout, weights=weights, vae=vae, config_dir=config_dir,
                      metadata_configs=metadata, tokenizer_dir=tokenizer_dir, base_dir=base,
                      filled_from=str(base_config) if filled else None,
                      remote=tuple(sorted(p.name for p in (*weights, vae) if p.name in listing.remote
                                          and p.parent == model_dir)))
