"""The process groups of one image's parallel modes under torchrun (``torch.distributed``: NCCL on GPUs, gloo on
the CPU): CFG-parallel (each step's guidance branches on their own ranks) and tensor parallel (every layer's
heads and MLP columns split over ranks), alone or together as a 2-D mesh.

Ranks are laid out tensor-parallel innermost, as Megatron and vLLM do (the ranks of a TP group are neighbours,
on one machine's fast links): with ``cfg`` x ``tp`` processes, rank ``c * tp + t`` holds TP shard ``t`` of guidance
slot ``c``. The TP group of a rank is ``{c * tp, ..., c * tp + tp - 1}``; its CFG group is ``{t, t + tp, ...}``.
Every rank runs the same requests in the same order (the CLI, batch jobs or the Python API under torchrun), so
``lockstep`` (all the ranks) is the group over which they agree on a drawn seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.distributed as dist

from bagel_engine.params import BagelInputError


@dataclass(frozen=True)
class ParallelGroups:
    cfg_size: int
    tp_size: int
    cfg: Any  # the group of this rank's CFG slots (None when cfg_size == 1)
    tp: Any  # the group of this rank's tensor-parallel shards (None when tp_size == 1)
    lockstep: Any  # every rank of the mesh
    vae: Any = None  # VAE patch parallel: every rank of the mesh, each a share of the VAE's tiles
    weights: Any = None  # sharded weights: every rank of the mesh, each a share of the decoder layers' weights

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp) if self.tp is not None else 0


_GROUPS: dict[tuple[int, int], ParallelGroups] = {}


def torchrun_command(size: int) -> str:
    return f"torchrun --nproc-per-node {size} --no-python bagel ..."


def rank_device(device: str | torch.device | None) -> torch.device | None:
    """Under torchrun on GPUs each rank takes its own card: None or a bare "cuda" become ``cuda:LOCAL_RANK``."""
    if device is None:
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return device


def parallel_groups(cfg_size: int, tp_size: int, device: torch.device, vae_size: int = 1,
                    shard_weights: bool = False) -> ParallelGroups:
    """The groups of a ``cfg_size`` x ``tp_size`` mesh over torchrun's world, the process group started here when
    torchrun's variables are set and none is (every rank must call this, in the same order). ``vae_size`` > 1:
    the VAE's tiles spread over that many ranks: the whole mesh (or, alone, a world of that many). ``shard_weights``:
    the decoder layers' weights sharded over torchrun's whole world (no CFG-parallel, no tensor parallel with it:
    every rank must run the same forwards)."""
    cfg_size, tp_size, vae_size = int(cfg_size or 1), int(tp_size or 1), int(vae_size or 1)
    shard_world = 1
    if shard_weights:
        if cfg_size > 1 or tp_size > 1:
            raise BagelInputError("--shard-weights runs the same forwards on every rank: not with --cfg-parallel-size "
                                  "or --tensor-parallel-size (tensor parallel already splits the weights)")
        if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
            raise BagelInputError("--shard-weights shards over the processes of torchrun: "
                                  f"{torchrun_command(2)} --shard-weights")
        shard_world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    if cfg_size != 1 and cfg_size not in (2, 3):
        raise BagelInputError(f"CFG-parallel runs over 2 or 3 ranks (one guidance branch each), not {cfg_size}")
    if tp_size < 1:
        raise BagelInputError(f"the tensor-parallel size must be >= 1, not {tp_size}")
    size = cfg_size * tp_size if cfg_size * tp_size > 1 else max(vae_size, shard_world)
    if vae_size not in (1, size):
        raise BagelInputError(f"VAE patch parallel spreads the tiles over every rank of the model: "
                              f"--vae-patch-parallel-size must be {size} (--cfg-parallel-size x --tensor-parallel-size)")
    what = " with ".join(p for p in ("CFG-parallel" if cfg_size > 1 else "",
                                     "tensor parallel" if tp_size > 1 else "",
                                     "VAE patch parallel" if vae_size > 1 else "",
                                     "sharded weights" if shard_weights else "") if p) or "one process"
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise BagelInputError(f"{what} over {size} processes runs under torchrun: {torchrun_command(size)}")
        if device.type == "cuda":  # this rank's card is the current one (NCCL, bitsandbytes, empty_cache use it)
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world != size:
        raise BagelInputError(f"{what} needs {size} processes (--cfg-parallel-size x --tensor-parallel-size), "
                              f"running {world}: {torchrun_command(size)}")
    key = (cfg_size, tp_size)
    if key not in _GROUPS:
        _GROUPS[key] = ParallelGroups(cfg_size, tp_size, _my_group(_cfg_ranks(cfg_size, tp_size), cfg_size > 1),
                                      _my_group(_tp_ranks(cfg_size, tp_size), tp_size > 1), dist.group.WORLD)
    groups = _GROUPS[key]
    if shard_weights:
        groups = replace(groups, weights=dist.group.WORLD)
    if vae_size > 1:
        groups = replace(groups, vae=dist.group.WORLD)
    return groups


def _tp_ranks(cfg_size: int, tp_size: int) -> list[list[int]]:
    return [[c * tp_size + t for t in range(tp_size)] for c in range(cfg_size)]


def _cfg_ranks(cfg_size: int, tp_size: int) -> list[list[int]]:
    return [[c * tp_size + t for c in range(cfg_size)] for t in range(tp_size)]


def _my_group(partition: list[list[int]], needed: bool):
    """This rank's group of ``partition`` (every rank creates every group, as ``new_group`` requires)."""
    if not needed:
        return None
    if len(partition) == 1:
        return dist.group.WORLD
    rank, mine = dist.get_rank(), None
    for ranks in partition:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


@dataclass(frozen=True)
class Parallelism:
    """How one model spreads over several devices (``load``'s options): CFG-parallel, tensor parallel, VAE patch
    parallel and sharded weights over torchrun's processes, or the layers split over the devices of one process."""

    cfg_parallel_size: int | None = None
    tensor_parallel_size: int | None = None
    vae_patch_parallel_size: int | None = None
    shard_weights: bool = False
    devices: str | Sequence[str] | None = None
    layer_split: Sequence[int] | None = None
    max_memory: str | int | Sequence | None = None

    @property
    def multi_process(self) -> bool:
        return self.shard_weights or any((n or 1) > 1 for n in (self.cfg_parallel_size, self.tensor_parallel_size,
                                                                  self.vae_patch_parallel_size))

    def resolve(self, device: str | torch.device | None, compile: bool = False,
                default: torch.device | None = None) -> tuple[torch.device, ParallelGroups | None, dict]:
        """(this process's main device, the process groups or None, the Placement fields they set)."""
        if self.multi_process:
            device = rank_device(device)
            if compile and ((self.tensor_parallel_size or 1) > 1 or self.shard_weights):
                raise BagelInputError("compile does not run with tensor parallel or sharded weights yet (their "
                                      "collectives inside CUDA graphs are not checked on GPUs): drop one of them")
        split_over: tuple = ()
        if self.devices is not None:
            from bagel_engine.weights.layer_split import parse_devices

            try:
                split_over = tuple(parse_devices(self.devices))
            except ValueError as e:
                raise BagelInputError(str(e)) from None
            device = split_over[0]
        budgets: tuple = ()
        if self.max_memory is not None:
            from bagel_engine.weights.layer_split import parse_memory

            if not split_over:
                raise BagelInputError("max_memory is the weight budget per device of a layer split: give devices too "
                                      "(--devices 0,1 --max-memory 24GB)")
            if self.layer_split:
                raise BagelInputError("give layer_split or max_memory, not both")
            try:
                budgets = tuple(parse_memory(self.max_memory, len(split_over)))
            except ValueError as e:
                raise BagelInputError(str(e)) from None
        main = torch.device(device) if device is not None else (default or torch.device("cpu"))
        groups = parallel_groups(self.cfg_parallel_size or 1, self.tensor_parallel_size or 1, main,
                                 self.vae_patch_parallel_size or 1, self.shard_weights) if self.multi_process else None
        fields = {"tensor_parallel": groups.tp if groups is not None else None,
                  "shard_weights": groups.weights if groups is not None else None,
                  "devices": split_over, "layer_split": tuple(self.layer_split or ()), "max_memory": budgets}
        return main, groups, fields

    @staticmethod
    def attach(pipe, groups: ParallelGroups | None) -> bool:
        """Tell a loaded pipeline its groups (every rank in lockstep; the VAE's tiles over the ranks); True when VAE
        tiling must be on."""
        if groups is None:
            return False
        pipe.tensor_parallel_size, pipe.engine.lockstep = groups.tp_size, groups.lockstep
        if groups.vae is not None:
            pipe.engine.vae_group = groups.vae
        return groups.vae is not None
