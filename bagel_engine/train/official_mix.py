"""The official trainer's dataset YAML, read as it is: ``bagel train CONFIG.yaml``.

The YAML names groups (``t2i_pretrain``, ``unified_edit``, ``vlm_sft``) with their ``dataset_names``,
``num_used_data`` (per dataset: parquet files to use, or JSONL lines), ``weight``, ``is_mandatory``,
``shuffle_lines`` / ``shuffle_seed`` (JSONL). The datasets' places are the official ``DATASET_INFO`` registry:
``{group: {dataset: {data_dir, num_files, num_total_samples, parquet_info_path, jsonl_path}}}``, given under a
``dataset_info:`` key of the same YAML or in a second file (``--dataset-info``, YAML or JSON). Parquet groups use
the first ``num_used_data`` files of ``data_dir`` (repeated when there are fewer, as the official code does; in
name order here); a JSONL group its first ``num_used_data`` lines (after a shuffle with ``shuffle_seed`` when
``shuffle_lines``), its images relative to ``data_dir``.

Mixing (``MixedStream``) follows the official packed dataset: every sequence starts with one sample of each
mandatory group, then each sample comes from a group drawn by weight. Every draw is fixed by the seed and the
sequence's number, and each group keeps its own epoch and cursor, so a resumed run continues exactly.

A group's ``image_transform_args`` (``max_image_size``, ``min_image_size``, ``image_stride``, ``max_pixels``) resize its
pictures instead of the model's rules, as the official datasets do: the VAE's for ``t2i_pretrain`` and
``unified_edit`` (whose ``vit_image_transform_args`` are the ViT's), the ViT's for ``vlm_sft`` (its pictures are
only seen by the ViT). A group without them takes the model's rules.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bagel_engine.batch.reader import Row, read_rows
from bagel_engine.params import BagelInputError
from bagel_engine.train.video import FrameSampling
from bagel_engine.train.data import BadRow, restore_rng, row_rng, usable_sample
from bagel_engine.train.packing import PackedBatch, SequencePacker
from bagel_engine.train.sample import ImageTransforms

PARQUET_GROUPS = ("t2i_pretrain", "unified_edit")
JSONL_GROUPS = ("vlm_sft",)


@dataclass
class Group:
    name: str
    rows: list[Row]
    weight: float
    mandatory: bool
    transforms: ImageTransforms | None = None
    frames: FrameSampling | None = None  # its frame_sampler_args (video rows)


TRANSFORM_KEYS = ("max_image_size", "min_image_size", "image_stride", "max_pixels")


def _resize_rule(group: str, key: str, args) -> tuple[int, int, int, int | None] | None:
    """``(max, min, stride, max_pixels)`` of an official ImageTransform's arguments (None when not given)."""
    if args is None:
        return None
    if not isinstance(args, dict) or not {"max_image_size", "min_image_size", "image_stride"} <= set(args):
        raise BagelInputError(f"group {group!r}: {key} needs max_image_size, min_image_size and image_stride")
    unknown = sorted(set(args) - set(TRANSFORM_KEYS))
    if unknown:
        raise BagelInputError(f"group {group!r}: {key} has {', '.join(unknown)}, not among {', '.join(TRANSFORM_KEYS)}")
    try:
        values = [int(args[k]) for k in TRANSFORM_KEYS[:3]] + [int(args["max_pixels"]) if "max_pixels" in args else None]
    except (TypeError, ValueError):
        raise BagelInputError(f"group {group!r}: {key} values must be integers") from None
    if min(v for v in values if v is not None) <= 0 or values[1] > values[0]:
        raise BagelInputError(f"group {group!r}: {key} needs positive sizes and min_image_size <= max_image_size")
    return tuple(values)


def group_transforms(name: str, args: dict) -> ImageTransforms | None:
    """A group's resize rules from its YAML arguments (see the module doc)."""
    if name in JSONL_GROUPS:
        vae, vit = None, _resize_rule(name, "image_transform_args", args.get("image_transform_args"))
    else:
        vae = _resize_rule(name, "image_transform_args", args.get("image_transform_args"))
        vit = _resize_rule(name, "vit_image_transform_args", args.get("vit_image_transform_args"))
    return None if vae is None and vit is None else ImageTransforms(vae, vit)


def is_official_config(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def _load(path: Path) -> dict:
    import yaml

    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise BagelInputError(f"{path}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise BagelInputError(f"{path}: expected a mapping of dataset groups")
    return data


def read_official_config(path: str | Path, dataset_info: str | Path | None = None) -> list[Group]:
    """The groups of an official dataset YAML with their rows (nothing is decoded yet)."""
    path = Path(path)
    config = _load(path)
    registry = config.pop("dataset_info", None)
    if dataset_info is not None:
        registry = _load(Path(dataset_info))
    if not isinstance(registry, dict):
        raise BagelInputError(f"{path}: no dataset registry: add a dataset_info: section (the official DATASET_INFO: "
                              "group -> dataset -> data_dir / jsonl_path ...) or pass --dataset-info FILE")
    groups, position = [], 0
    for name, args in config.items():
        if not isinstance(args, dict) or "dataset_names" not in args:
            raise BagelInputError(f"{path}: group {name!r} has no dataset_names")
        names = list(args["dataset_names"])
        used = list(args.get("num_used_data") or [None] * len(names))
        if len(used) != len(names):
            raise BagelInputError(f"{path}: group {name!r} has {len(names)} datasets and {len(used)} num_used_data")
        rows: list[Row] = []
        for dataset, count in zip(names, used):
            info = (registry.get(name) or {}).get(dataset)
            if not isinstance(info, dict):
                raise BagelInputError(f"dataset {dataset!r} of group {name!r} is not in the registry")
            base = (path.parent / str(info.get("data_dir", ""))).resolve() if info.get("data_dir") else path.parent
            if name in JSONL_GROUPS or "jsonl_path" in info:
                found = _jsonl_rows(path.parent / str(info["jsonl_path"]), base, count, args, position)
            else:
                found = _parquet_rows(base, count, position)
            position += len(found)
            rows += found
        if not rows:
            raise BagelInputError(f"group {name!r} has no rows")
        groups.append(Group(name, rows, float(args.get("weight", 1.0)), bool(args.get("is_mandatory", False)),
                            group_transforms(name, args), FrameSampling.from_args(args.get("frame_sampler_args"))))
    if not groups or sum(g.weight for g in groups) <= 0:
        raise BagelInputError(f"{path}: no group with a positive weight")
    return groups


def _parquet_rows(folder: Path, count: int | None, position: int) -> list[Row]:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise BagelInputError(f"no parquet files in {folder}")
    if count is not None:
        files = (files * (count // len(files) + 1))[:count]
    rows = []
    for file in files:
        for row in read_rows(file):
            rows.append(Row(position + len(rows), row.source, row.line, row.data, row.error))
    return rows


def _jsonl_rows(jsonl: Path, images: Path, count: int | None, args: dict, position: int) -> list[Row]:
    try:
        lines = jsonl.read_text().splitlines()
    except OSError as e:
        raise BagelInputError(f"cannot read {jsonl}: {e.strerror or e}") from None
    order = list(range(len(lines)))
    if args.get("shuffle_lines"):
        random.Random(args.get("shuffle_seed", 0)).shuffle(order)
    order = order[:count] if count is not None else order
    rows = []
    for k in order:
        if not lines[k].strip():
            continue
        try:
            data = json.loads(lines[k])
            error = None if isinstance(data, dict) else "the line is not a JSON object"
        except json.JSONDecodeError as e:
            data, error = {}, f"bad JSON: {e}"
        rows.append(Row(position + len(rows), jsonl, k + 1, data if isinstance(data, dict) else {}, error,
                        base=images))
    return rows


@dataclass
class MixedStream:
    """Packed sequences from several groups, mixed as the official packed dataset mixes them."""

    groups: list[Group]
    packer: SequencePacker
    max_tokens: int
    task: str = "auto"
    seed: int = 0
    rank: int = 0
    world: int = 1
    sequence: int = 0  # sequences made so far (fixes the draws of the next)
    cursors: dict = field(default_factory=dict)  # group -> [epoch, cursor]
    bad: list[BadRow] = field(default_factory=list)
    _bad_seen: set = field(default_factory=set)

    def _share(self, group: Group, epoch: int) -> list[Row]:
        order = list(range(len(group.rows)))
        random.Random(f"{self.seed}:{group.name}:{epoch}").shuffle(order)
        return [group.rows[i] for i in order[self.rank::self.world]]

    def _next(self, group: Group) -> tuple:
        epoch, cursor = self.cursors.setdefault(group.name, [0, 0])
        share = self._share(group, epoch)
        for _ in range(2 * len(group.rows) + 2):
            if cursor >= len(share):
                epoch, cursor = epoch + 1, 0
                share = self._share(group, epoch)
                if not share:
                    raise BagelInputError(f"group {group.name!r} has no rows for rank {self.rank} of {self.world}")
            row = share[cursor]
            cursor += 1
            self.cursors[group.name] = [epoch, cursor]
            if (group.name, row.position) in self._bad_seen:
                continue
            usable = usable_sample(row, self.packer, self.max_tokens, self.task, row_rng(row, self.seed, epoch),
                                   group.transforms, group.frames)
            if isinstance(usable, str):
                self._bad_seen.add((group.name, row.position))
                self.bad.append(BadRow(row.where(), usable))
                continue
            return usable
        raise BagelInputError(f"every row of group {group.name!r} is bad, e.g. {self.bad[-1].error if self.bad else '?'}")

    def state(self) -> dict:
        return {"sequence": self.sequence, "cursors": {k: list(v) for k, v in self.cursors.items()},
                "packer_rng": self.packer.rng.getstate()}

    def restore(self, state: dict) -> None:
        self.sequence = int(state["sequence"])
        self.cursors = {k: list(v) for k, v in state["cursors"].items()}
        restore_rng(self.packer.rng, state["packer_rng"])

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        draws = random.Random(f"{self.seed}:{self.rank}:sequence:{self.sequence}")
        self.sequence += 1
        total = sum(g.weight for g in self.groups)
        samples, used = [], 0
        for group in self.groups:  # one sample of each mandatory group first
            if group.mandatory:
                sample, n = self._next(group)
                samples.append(sample)
                used += n
        while True:
            pick, acc = draws.random() * total, 0.0
            group = self.groups[-1]
            for g in self.groups:
                acc += g.weight
                if pick < acc:
                    group = g
                    break
            before = dict((k, list(v)) for k, v in self.cursors.items())
            sample, n = self._next(group)
            if samples and used + n > self.max_tokens:
                self.cursors = before  # put it back: its group gives it again next time it is drawn
                break
            samples.append(sample)
            used += n
        return self.packer.pack(samples)
