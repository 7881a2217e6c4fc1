"""Data parallel batch jobs: torchrun ranks, ``--shard K/N`` splits, and the few collectives a job needs.

Under ``torchrun --nproc-per-node N`` every process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``, loads its own copy of the model (on ``cuda:LOCAL_RANK`` when there are GPUs) and
takes the rows ``i % WORLD_SIZE == RANK`` of its share. ``torch.distributed`` is initialized only
when ``WORLD_SIZE > 1``: NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

from bagel_engine.params import BagelInputError

T = TypeVar("T")
# Ranks wait for each other only at the start and at the end; the end can be hours apart.
BARRIER_TIMEOUT = timedelta(hours=48)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False  # we called init_process_group
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if not self.initialized:
            return
        import torch.distributed as td

        if self.backend == "nccl":
            td.barrier(device_ids=[self.local_rank])
        else:
            td.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.initialized:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as td

            td.destroy_process_group()
            self.initialized = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise BagelInputError(f"environment variable {name}={value!r} is not an integer") from None


def current_rank() -> int:
    return _env_int("RANK", 0)


def setup(device: str | None) -> Dist:
    """Read the torchrun variables and join the process group when there is more than one process."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise BagelInputError(f"bad RANK={rank} / WORLD_SIZE={world}")
    dist = Dist(rank, world, local_rank)
    if world > 1:
        import torch
        import torch.distributed as td

        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not td.is_initialized():
            td.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
            dist.initialized = True
        dist.backend = backend
    return dist


def rank_device(device: str | None, dist: Dist) -> str | None:
    """The device this process loads the model on: ``cuda:LOCAL_RANK`` for a bare ``cuda`` (or no
    choice on a GPU machine) when several processes run; otherwise what the user said."""
    if dist.world == 1:
        return device
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return device


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (0-based K) -> ``(K, N)``."""
    if text is None or not str(text).strip():
        return None
    try:
        k, n = (int(p) for p in str(text).split("/"))
    except ValueError:
        raise BagelInputError(f"--shard must look like K/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise BagelInputError(f"--shard {text}: need 0 <= K < N (shards are numbered from 0)")
    return k, n


def take_share(items: Sequence[T], shard: tuple[int, int] | None, dist: Dist) -> tuple[list[T], list[T]]:
    """(the shard's items, this process's items): shard ``K/N`` keeps ``i % N == K``, then rank ``r``
    of ``W`` keeps the shard's ``j % W == r``."""
    selected = list(items) if shard is None else [x for i, x in enumerate(items) if i % shard[1] == shard[0]]
    mine = [x for j, x in enumerate(selected) if j % dist.world == dist.rank]
    return selected, mine


def parse_rows(text: str | None, count: int) -> list[int]:
    """``--rows`` spec (positions, 0-based): ``"0:100"``, ``"100:"``, ``"0,5,10"``, ``"3"``, or a mix."""
    if text is None or not str(text).strip():
        return list(range(count))
    chosen: list[int] = []
    seen = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                lo, hi = part.split(":", 1)
                indices = range(count)[slice(int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)]
            else:
                i = int(part)
                if not 0 <= i < count:
                    raise BagelInputError(f"--rows: row {i} is out of range (the input has {count} rows)")
                indices = [i]
        except ValueError:
            raise BagelInputError(f"--rows must look like 0:100, 100: or 0,5,10 (got {text!r})") from None
        for i in indices:
            if i not in seen:
                seen.add(i)
                chosen.append(i)
    return chosen
