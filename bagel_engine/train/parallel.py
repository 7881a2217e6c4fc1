"""Data parallelism for training, through torch.distributed (start the processes with torchrun).

Three strategies:

- ``ddp``: every process holds the whole model; after backward the gradients are averaged with
  one all-reduce per parameter (a parameter a rank's batch did not touch contributes zeros, so
  text-only and image-only batches mix freely). Replicas stay bit-identical (checked at every save).
- ``fsdp``: parameters, gradients and optimizer state are sharded over the processes with FSDP2
  (``torch.distributed.fsdp.fully_shard``): each decoder layer, each SigLIP layer and each piece the
  objective calls directly is one unit, all-gathered for its forward and backward and resharded
  after. This is what full fine-tuning of the 14.6 B-parameter model needs (291 GB of float32 weights,
  gradients and AdamW state: 36 GB per GPU over eight). Gradients are reduce-scattered as means.
- ``hsdp``: hybrid sharding, the official trainer's HYBRID_SHARD: the same units sharded over groups of
  ``num_shard`` processes (default: one node, torchrun's LOCAL_WORLD_SIZE) and replicated across the
  groups (a 2-D mesh, replicate x shard, FSDP2's HSDP): the all-gathers stay inside a node, one all-reduce
  of the gradient shards crosses nodes.

Both give each process its own packed sequence per step; the objective divides each loss by the
token count of all processes, so both compute the gradient of the global token mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp", "hsdp")
SHARDED = ("fsdp", "hsdp")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL needs CUDA tensors)

    @property
    def on(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            dist.barrier()


def init_distributed(device: str | None) -> tuple[Dist, torch.device]:
    """The process group from torchrun's environment (gloo on CPUs, NCCL on GPUs) and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev if dev.type == "cuda" else torch.device("cpu")), dev


# ----------------------------------------------------------------------------- ddp
def average_gradients(params: list[nn.Parameter], d: Dist) -> None:
    if not d.on:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(d.world)


# ----------------------------------------------------------------------------- fsdp
def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units, innermost first and the whole model (the root, whose forward
    is the packed training forward) last: every piece that forward calls on its own (each is
    all-gathered when called) and the layers that hold the bulk of the weights."""
    decoder = model.language_model.model
    vit = model.vit_model.vision_model
    units: list[nn.Module] = [*decoder.layers, *vit.encoder.layers, decoder.embed_tokens, decoder,
                              model.language_model.lm_head, model.vit_model, model.connector,
                              model.vit_pos_embed, model.latent_pos_embed, model.time_embedder,
                              model.vae2llm, model.llm2vae, model]
    return units


def shard_mesh_shape(world: int, num_shard: int | None) -> tuple[int, int]:
    """(replicas, shards) of a hybrid-sharding mesh: ``num_shard`` processes share one copy of the model
    (default: torchrun's LOCAL_WORLD_SIZE, the processes of one node)."""
    shards = num_shard or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if shards < 1 or world % shards:
        raise ValueError(f"--num-shard {shards} must divide the {world} processes (replicas x shards)")
    return world // shards, shards


def shard(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None,
          hybrid: bool = False, num_shard: int | None = None) -> None:
    """Shard ``model`` over all processes with FSDP2 (``param_dtype``: the all-gathered dtype, e.g.
    bfloat16 on GPUs; gradients are reduced in float32); ``hybrid``: over groups of ``num_shard`` processes,
    replicated across the groups (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size() if dist.is_initialized() else 1
    if hybrid:
        mesh = init_device_mesh(device.type, shard_mesh_shape(world, num_shard), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def full_model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU (sharded: a collective; rank 0 gets it, the others ``{}``)."""
    if not sharded:
        return dict(model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a parameter no batch has touched yet has no AdamW state, here as in the saved run
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Set a (possibly sharded) parameter from the whole tensor, present on every process."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
        param.copy_(full)
    else:
        param.copy_(full.to(param.device, param.dtype))
