"""Fine-tuning BAGEL on packed multimodal data: the loop, data parallelism, EMA and checkpoints.

    from bagel_engine.train import TrainConfig, train
    train(TrainConfig(model="ByteDance-Seed/BAGEL-7B-MoT", data="edits.jsonl", output_dir="runs/edit",
                      steps=1000, lr=2e-5, freeze=("vit", "und")))

One step: the next packed sequence of this rank (``DataStream``), the losses of
``training_losses``, each normalised by the token counts summed over all ranks (every token
weighs the same wherever it is), backward, gradients averaged over ranks
(``torch.distributed``: gloo on CPUs, NCCL on GPUs; start with ``torchrun``), clipping, AdamW with
warm-up and a constant or cosine schedule (the official defaults: betas 0.9 / 0.95, eps 1e-15),
then the EMA. Every ``save_every`` steps and at the end, rank 0 writes a checkpoint that
``bagel_engine.load`` reads as a model; a rerun of the same command resumes from the newest one
with the same data order, random draws and optimizer state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import bagel_engine
from bagel_engine.params import BagelInputError
from bagel_engine.train import checkpoint as checkpoints
from bagel_engine.train import parallel as DP
from bagel_engine.train.data import TASKS, DataStream, Prefetcher, pack_in_order
from bagel_engine.train.official_mix import MixedStream, is_official_config, read_official_config
from bagel_engine.train.lora import TARGETS as LORA_TARGETS
from bagel_engine.train.lora import add_lora, lora_parameter_names, lora_scales, merge_adapters
from bagel_engine.train.latent_cache import LatentCache, module_digest
from bagel_engine.train.objective import training_losses
from bagel_engine.train.packing import SequencePacker
from bagel_engine.train.reporters import CHOICES as REPORT_TO
from bagel_engine.train.reporters import Reporter, open_reporter
from bagel_engine.train.sample import Dropout
from bagel_engine.weights.hub import HubOptions
from bagel_engine.weights.layout import find_checkpoint
from bagel_engine.weights.loader import resolve_model_dir

log = logging.getLogger(__name__)

FREEZABLE = ("vit", "und", "gen", "connector")


@dataclass
class TrainConfig:
    model: str  # base model: a directory or a hub id (org/name[@revision])
    data: str  # a CSV / JSONL / Parquet file or a folder of them, or the official trainer's dataset YAML
    output_dir: str
    task: str = "auto"
    steps: int = 1000
    lr: float = 2e-5
    min_lr: float = 1e-7
    warmup_steps: int = 50
    schedule: str = "constant"  # or "cosine" (down to min_lr at the last step)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    max_grad_norm: float = 1.0
    max_tokens: int = 8192  # tokens per packed sequence, per rank and step
    grad_accum: int = 1  # packed sequences per rank and optimizer step (gradients accumulated)
    max_image_side: int | None = None  # cap the VAE input size (e.g. 512) to save memory
    timestep_shift: float = 1.0
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    ce_reweighting: bool = False  # the official ce_loss_reweighting: each answer's tokens weigh 1/sqrt(its length)
    dropout: Dropout = field(default_factory=Dropout)
    freeze: tuple[str, ...] = ()  # any of FREEZABLE; the VAE and the position tables are never trained
    dataset_info: str | None = None  # with an official dataset YAML: its DATASET_INFO registry (YAML / JSON)
    visual_gen: bool = True  # False: understanding only; the generation expert is frozen, no image is generated
    visual_und: bool = True  # False: no ViT tokens at all; the ViT and connector are frozen
    ema: float = 0.0  # EMA decay (0: off; the official pre-training used 0.9999)
    lora_rank: int = 0  # > 0: train LoRA adapters only (see bagel_engine.train.lora)
    lora_alpha: float | None = None  # default: the rank (scale 1)
    lora_targets: str = "gen"  # gen / und / all
    gradient_checkpointing: bool = False  # recompute each layer in backward: long sequences, less memory
    strategy: str = "ddp"  # data parallelism: "ddp" (replicated), "fsdp" (sharded) or "hsdp" (see train.parallel)
    num_shard: int | None = None  # hsdp: processes per shard group (default: torchrun's LOCAL_WORLD_SIZE)
    random_weights: bool = False  # build the model from the configs with random weights (benchmarks)
    latent_cache_mb: float = 0.0  # keep the frozen VAE's moments of each picture, up to this many MB (0: off)
    prefetch: int = 2  # sequences packed ahead in a background thread (0: in the loop)
    pad_to_max_tokens: bool | None = None  # pad every sequence to max_tokens (static shapes); default: on CUDA
    seed: int = 0
    save_every: int = 500
    eval_data: str | None = None  # rows to evaluate on (same formats), at fixed flow times and noise
    eval_every: int | None = None  # default: save_every
    keep: int = 2  # checkpoints kept (the newest)
    log_every: int = 10
    report_to: str = "none"  # also send the figures to "tensorboard" (OUTPUT/tensorboard) or "wandb"
    device: str | None = None
    dtype: str = "float32"  # parameter (master) dtype
    autocast: str | None = "auto"  # "bfloat16" / None; auto: bfloat16 on CUDA
    resume: bool = True  # continue from the newest checkpoint in output_dir
    progress: bool = True
    weights_file: str | None = None  # the base's decoder weight file or shard index (default: its layout's)
    base_config: str | None = None  # where configs, tokenizer and VAE the base lacks come from (weights.layout)
    revision: str | None = None  # the hub model's branch, tag or commit
    cache_dir: str | None = None  # hub downloads (default: the hub client's)
    token: str | None = field(default=None, repr=False)  # a hub token; never written with the run

    def public(self) -> dict[str, Any]:
        """The settings as written with a checkpoint and sent to dashboards: all but the hub token."""
        return {k: v for k, v in asdict(self).items() if k != "token"}

    def check(self) -> None:
        if self.task not in TASKS:
            raise BagelInputError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        bad = [f for f in self.freeze if f not in FREEZABLE]
        if bad:
            raise BagelInputError(f"cannot freeze {', '.join(bad)}: choose among {', '.join(FREEZABLE)}")
        if self.eval_every is not None and self.eval_every < 1:
            raise BagelInputError("eval_every must be >= 1")
        if self.prefetch < 0:
            raise BagelInputError("prefetch must be >= 0")
        if self.latent_cache_mb < 0:
            raise BagelInputError("latent_cache_mb must be >= 0 (0: off)")
        if self.grad_accum < 1:
            raise BagelInputError("grad_accum must be >= 1")
        if self.steps < 1 or self.max_tokens < 2 or self.save_every < 1 or self.log_every < 1 or self.keep < 1:
            raise BagelInputError("steps, save_every, log_every and keep must be >= 1 and max_tokens >= 2")
        if self.report_to not in REPORT_TO:
            raise BagelInputError(f"unknown report_to {self.report_to!r}; choose one of {', '.join(REPORT_TO)}")
        if self.warmup_steps > self.steps:
            log.warning("warmup_steps (%d) is more than steps (%d): the learning rate never reaches lr=%g, it stops "
                        "at %g", self.warmup_steps, self.steps, self.lr, self.lr * self.steps / self.warmup_steps)
        if self.schedule not in ("constant", "cosine"):
            raise BagelInputError(f"unknown schedule {self.schedule!r}; use constant or cosine")
        if self.strategy not in DP.STRATEGIES:
            raise BagelInputError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(DP.STRATEGIES)}")
        if self.num_shard is not None and (self.strategy != "hsdp" or self.num_shard < 1):
            raise BagelInputError("num_shard (>= 1) is the shard group size of --strategy hsdp")
        if self.lora_rank < 0 or (self.lora_rank and self.lora_targets not in LORA_TARGETS):
            raise BagelInputError(f"LoRA needs a rank >= 1 and targets among {', '.join(LORA_TARGETS)}")
        if not (self.visual_gen or self.visual_und):
            raise BagelInputError("--no-visual-gen and --no-visual-und together leave only text: drop one")
        if self.lora_rank and self.freeze:
            raise BagelInputError("with LoRA only the adapters learn: --freeze does not apply")
        if not 0.0 <= self.ema < 1.0:
            raise BagelInputError("ema must be in [0, 1)")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise BagelInputError("lr must be > 0 and warmup_steps >= 0")
        for name, p in (("text", self.dropout.text), ("vit", self.dropout.vit), ("vae", self.dropout.vae)):
            if not 0.0 <= p <= 1.0:
                raise BagelInputError(f"{name} dropout must be in [0, 1], got {p}")


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The rate for step ``step`` (0-based): linear warm-up, then constant or cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def trainable_names(model: torch.nn.Module, freeze: tuple[str, ...]) -> list[str]:
    """Parameters that learn: everything but the fixed position tables and the frozen parts.
    ``und``: the understanding expert (decoder weights without ``_moe_gen``, embeddings, final norm
    and LM head); ``gen``: the generation expert and the latent glue (``*_moe_gen``, ``vae2llm``,
    ``llm2vae``, ``time_embedder``); ``vit``: SigLIP; ``connector``: the ViT-to-LLM connector."""
    names = []
    for name, _ in model.named_parameters():
        if name.endswith("pos_embed.pos_embed"):
            continue
        if "vit" in freeze and name.startswith("vit_model."):
            continue
        if "connector" in freeze and name.startswith("connector."):
            continue
        is_llm = name.startswith("language_model.")
        is_gen = ("_moe_gen" in name) or name.startswith(("vae2llm.", "llm2vae.", "time_embedder."))
        if "gen" in freeze and is_gen:
            continue
        if "und" in freeze and is_llm and not is_gen:
            continue
        names.append(name)
    return names


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.check()
        self.cfg = cfg
        self.dist, self.device = DP.init_distributed(cfg.device)
        self.output_dir = Path(cfg.output_dir)
        hub = HubOptions(cfg.revision, cfg.cache_dir, cfg.token)
        self.base_dir = resolve_model_dir(cfg.model, hub, weights=not cfg.random_weights)
        self.base = find_checkpoint(self.base_dir, cfg.weights_file, cfg.base_config,  # any layout of the family
                                    need_weights=not cfg.random_weights, hub=hub)
        self.pipe = bagel_engine.load(str(self.base_dir), device=str(self.device), dtype=cfg.dtype,
                                      weights_file=cfg.weights_file, base_config=cfg.base_config,
                                      cache_dir=cfg.cache_dir, token=cfg.token,
                                      random_weights=cfg.random_weights, seed=cfg.seed)
        self.model, self.vae = self.pipe.model, self.pipe.vae
        self.vae.requires_grad_(False)
        self.model.decoder.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.lora_rank:
            torch.manual_seed(cfg.seed)  # the adapters' initial A (identical on every rank)
            add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
            names = set(lora_parameter_names(self.model))
        else:
            frozen = (*cfg.freeze, *(() if cfg.visual_gen else ("gen",)),
                      *(() if cfg.visual_und else ("vit", "connector")))
            names = set(trainable_names(self.model, frozen))
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in names)
        self.model.train()
        if cfg.autocast == "auto":
            self.autocast = torch.bfloat16 if self.device.type == "cuda" else None
        else:
            self.autocast = {None: None, "none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.autocast]
        self.sharded = cfg.strategy in DP.SHARDED
        if self.sharded:
            try:
                DP.shard(self.model, self.device, self.autocast, hybrid=cfg.strategy == "hsdp", num_shard=cfg.num_shard)
            except ValueError as e:
                raise BagelInputError(str(e)) from None
        self.params = {n: p for n, p in self.model.named_parameters() if n in names}
        # the fused kernel (one pass over every tensor): 3x faster than the per-tensor loop on a CPU, where the
        # optimizer step of a small model is a tenth of the training step; FSDP's sharded tensors take the loop
        self.fused = not self.sharded and self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, betas=tuple(cfg.betas),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay, fused=self.fused or None)
        self.ema = {n: p.detach().float().clone() for n, p in self.params.items()} if cfg.ema else None
        max_side = cfg.max_image_side
        packer = SequencePacker(self.pipe.config, self.pipe.tokenizer,
                                lambda image, key, resize=None: self.pipe.prepare_image(image, key, max_side, vit_from_original=True,
                                                                                   resize=resize),
                                cfg.dropout, random.Random(cfg.seed * 1000 + self.dist.rank),
                                visual_gen=cfg.visual_gen, visual_und=cfg.visual_und)
        if is_official_config(cfg.data):  # the official trainer's dataset YAML, as it is
            self.data = MixedStream(read_official_config(cfg.data, cfg.dataset_info), packer, cfg.max_tokens,
                                    task=cfg.task, seed=cfg.seed, rank=self.dist.rank, world=self.dist.world)
        else:
            self.data = DataStream.from_path(cfg.data, packer, cfg.max_tokens, task=cfg.task, seed=cfg.seed,
                                             rank=self.dist.rank, world=self.dist.world)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.dist.rank)
        self.latent_cache = LatentCache(cfg.latent_cache_mb) if cfg.latent_cache_mb > 0 else None
        self.latent_cache_dir = self.output_dir / "latent_cache" / f"rank{self.dist.rank}"
        self.vae_digest = module_digest(self.vae) if self.latent_cache is not None else ""
        self.batches: Prefetcher | None = None
        self.eval_batches, self.eval_bad = [], []
        if cfg.eval_data:
            eval_packer = SequencePacker(self.pipe.config, self.pipe.tokenizer, packer.prepare, Dropout(0, 0, 0),
                                         visual_gen=cfg.visual_gen, visual_und=cfg.visual_und)
            self.eval_batches, self.eval_bad = pack_in_order(cfg.eval_data, eval_packer, cfg.max_tokens, cfg.task)
        self.step = 0
        self.history: list[dict] = []
        self.reporter: Reporter | None = None  # rank 0, while run() runs
        if cfg.resume:
            self._resume()
            if self.latent_cache is not None and self.latent_cache_dir.exists():
                read = self.latent_cache.restore(self.latent_cache_dir, self.vae_digest,
                                                 next(self.vae.parameters()).device)
                log.info("latent cache: %d pictures' moments read back from %s", read, self.latent_cache_dir)
        elif self.dist.rank == 0:
            self._clear()

    # ------------------------------------------------------------------ checkpoints
    def _clear(self) -> None:
        """Start afresh (``resume=False``): remove the checkpoints and logs of an earlier run."""
        import shutil

        for path in checkpoints.list_checkpoints(self.output_dir) + list(self.output_dir.glob(checkpoints.PREFIX + "*.tmp")):
            shutil.rmtree(path, ignore_errors=True)
        for name in ("latest", "train_log.jsonl", "bad_rows.jsonl"):
            (self.output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.output_dir / "latent_cache", ignore_errors=True)

    def _resume(self) -> None:
        path = checkpoints.latest_checkpoint(self.output_dir)
        if path is None:
            return
        tensors, state = checkpoints.load_checkpoint(path)
        if state.get("trainable") != sorted(self.params):
            raise BagelInputError(f"{path} was trained with other frozen parts; use a new --output-dir or --overwrite")
        if state.get("strategy", "ddp") != self.cfg.strategy:
            raise BagelInputError(f"{path} was written with --strategy {state.get('strategy')}; resume it with the same")
        for n, p in self.params.items():
            DP.copy_full_into(p, tensors["model"][n])
            if self.ema is not None:
                DP.copy_full_into(self.ema[n], tensors["ema"][n])
        DP.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.sharded)
        for group in self.optimizer.param_groups:  # the saved options include the kernel choice: keep this run's
            group["fused"], group["foreach"] = self.fused or None, None
        self.step = int(state["step"])
        data_state = state["data"][self.dist.rank] if self.dist.rank < len(state["data"]) else None
        if data_state is None or len(state["data"]) != self.dist.world:
            raise BagelInputError(f"{path} was written by {len(state['data'])} ranks; resume it with as many")
        self.data.restore(data_state)
        rng = state["rng"][self.dist.rank]
        self.generator.set_state(rng.cpu() if self.device.type == "cpu" else rng.to("cpu"))
        self.history = list(state.get("history", []))
        train_log = self.output_dir / "train_log.jsonl"
        if self.dist.rank == 0 and train_log.exists():  # forget the steps done after this checkpoint
            kept = [line for line in train_log.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step]
            tmp = train_log.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, train_log)
        log.info("resumed from %s at step %d", path, self.step)
        if self.dist.rank == 0:
            print(f"resuming from {path} (step {self.step} of {self.cfg.steps})")

    @torch.no_grad()
    def published_weights(self) -> dict[str, torch.Tensor]:
        """The full state dict to publish (rank 0; a collective when sharded): the EMA values when
        EMA is on, adapters merged with LoRA."""
        backup = None
        if self.ema is not None:
            backup = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.ema[n].to(p.dtype))
        try:
            state = DP.full_model_state(self.model, self.sharded)
            state = {k: v.clone() if backup is not None and k in backup else v for k, v in state.items()}
        finally:
            if backup is not None:
                for n, p in self.params.items():
                    p.copy_(backup[n])
        if self.cfg.lora_rank and state:
            state = merge_adapters(state, lora_scales(self.model))
        return state

    def trained_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Float32 copies of the trained parameters (and their EMA) for resuming (a collective when sharded)."""
        out = {"model": {n: DP.full_tensor(p.detach()).float().cpu() for n, p in self.params.items()}}
        if self.ema is not None:
            out["ema"] = {n: DP.full_tensor(e).float().cpu() for n, e in self.ema.items()}
        return out

    def checksum(self) -> float:
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.params.values()))

    def _gather(self, obj):
        return self.dist.gather(obj)

    def save(self) -> Path | None:
        data_states = self._gather((self.batches or self.data).state())
        rngs = self._gather(self.generator.get_state())
        bad = [b for rank_bad in self._gather([(b.where, b.error) for b in self.data.bad]) for b in rank_bad]
        bad += [(f"{b.where} (eval)", b.error) for b in self.eval_bad]
        if not self.sharded:
            sums = self._gather(self.checksum())
            if any(s != sums[0] for s in sums):  # the gradient all-reduce keeps replicas bit-identical
                raise RuntimeError(f"data-parallel replicas diverged (parameter checksums {sums})")
        published = self.published_weights()
        tensors = self.trained_tensors()
        optimizer = DP.optimizer_state(self.model, self.optimizer, self.sharded)
        path = None
        if self.dist.rank == 0:
            state = {"step": self.step, "optimizer": optimizer, "data": data_states, "strategy": self.cfg.strategy,
                     "rng": rngs, "trainable": sorted(self.params), "history": self.history[-1000:],
                     "config": {k: v for k, v in self.cfg.public().items() if k != "dropout"} | {
                         "dropout": asdict(self.cfg.dropout)}}
            adapter = None
            if self.cfg.lora_rank:  # the adapters alone (the EMA's when EMA is on), for load(base, lora=...)
                source = tensors.get("ema", tensors["model"])
                adapter = {"tensors": source, "rank": self.cfg.lora_rank,
                           "alpha": float(self.cfg.lora_alpha if self.cfg.lora_alpha is not None else self.cfg.lora_rank),
                           "targets": self.cfg.lora_targets, "base_model": self.cfg.model}
            path = checkpoints.save_checkpoint(self.output_dir, self.step, self.base, published, state, tensors,
                                     keep=self.cfg.keep, adapter=adapter)
            if bad:
                (self.output_dir / "bad_rows.jsonl").write_text(
                    "".join(json.dumps({"where": w, "error": e}) + "\n" for w, e in bad))
            log.info("saved %s", path)
        if self.latent_cache is not None:  # each rank its own pictures' moments, kept for a resume
            self.latent_cache.spill(self.latent_cache_dir, self.vae_digest)
        self.dist.barrier()
        return path

    # ------------------------------------------------------------------ the loop
    def _next_batch(self):
        if self.cfg.prefetch and self.batches is None:  # started after any resume has set the position
            self.batches = Prefetcher(self.data, self.cfg.prefetch)
        batch = next(self.batches if self.batches is not None else self.data)
        pad = self.cfg.pad_to_max_tokens if self.cfg.pad_to_max_tokens is not None else self.device.type == "cuda"
        return batch, batch.padded(self.cfg.max_tokens, self.pipe.tokenizer.special.eos) if pad else batch

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` packed sequences per process."""
        cfg = self.cfg
        t0 = time.perf_counter()
        pairs = [self._next_batch() for _ in range(cfg.grad_accum)]
        real_tokens = sum(real.length for real, _ in pairs)
        batches = [b for _, b in pairs]
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        counts = self.dist.all_sum([float(sum(b.mse_tokens for b in batches)), float(sum(b.ce_tokens for b in batches)),
                                    float(sum(float(b.ce_weights.sum()) for b in batches)) if cfg.ce_reweighting else 0.0])
        world = self.dist.world
        self.optimizer.zero_grad(set_to_none=True)
        mse_sum = ce_sum = 0.0
        for batch in batches:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                losses = training_losses(self.model, self.vae, batch, timestep_shift=cfg.timestep_shift,
                                         generator=self.generator, latent_cache=self.latent_cache)
            # each micro-batch's share of the global token means: the accumulated gradient is theirs
            if cfg.ce_reweighting:  # the official ce_loss_reweighting: a weighted mean over every rank's tokens
                losses.total(cfg.mse_weight, cfg.ce_weight, counts[0] / world, counts[2] / world,
                             ce_token_weights=batch.ce_weights).backward()
            else:
                losses.total(cfg.mse_weight, cfg.ce_weight, counts[0] / world, counts[1] / world).backward()
            mse_sum += float(losses.mse.detach().sum()) if losses.mse is not None else 0.0
            ce_sum += float(losses.ce.detach().sum()) if losses.ce is not None else 0.0
        if not self.sharded:  # FSDP reduce-scatters the gradients (as means) in backward
            DP.average_gradients(list(self.params.values()), self.dist)
        grad_norm = DP.full_tensor(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm))
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.ema.values()), [p.detach().float() for p in self.params.values()],
                                     1 - cfg.ema)
        self.step += 1
        sums = self.dist.all_sum([mse_sum, ce_sum, float(real_tokens)])
        record = {"step": self.step, "lr": lr, "grad_norm": float(grad_norm),
                  "mse": sums[0] / counts[0] if counts[0] else None,
                  "ce": sums[1] / counts[1] if counts[1] else None,
                  "tokens": int(sums[2]), "seconds": time.perf_counter() - t0}
        record["tokens_per_s"] = record["tokens"] / record["seconds"]
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean losses over the evaluation data with the same flow times and noise at every
        evaluation (each sequence draws from its own fixed seed), so the figures form a curve.
        Sequences are spread over the processes; every process runs as many forwards (a process
        short of sequences repeats one and ignores it) so that sharded forwards stay in step."""
        cfg, d = self.cfg, self.dist
        batches = self.eval_batches
        per_rank = -(-len(batches) // d.world)
        sums = [0.0, 0.0, 0.0, 0.0]  # mse sum, mse tokens, ce sum, ce tokens
        for j in range(per_rank):
            index = d.rank + j * d.world
            real = index < len(batches)
            batch = batches[index if real else 0]
            generator = torch.Generator(self.device).manual_seed(10_000 + (index if real else 0))
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                losses = training_losses(self.model, self.vae, batch, timestep_shift=cfg.timestep_shift,
                                         generator=generator, latent_cache=self.latent_cache)
            if real:
                if losses.mse is not None:
                    sums[0] += float(losses.mse.sum())
                    sums[1] += losses.mse.numel()
                if losses.ce is not None:
                    sums[2] += float(losses.ce.sum())
                    sums[3] += losses.ce.numel()
        total = d.all_sum(sums)
        return {"step": self.step, "eval_mse": total[0] / total[1] if total[1] else None,
                "eval_ce": total[2] / total[3] if total[3] else None, "eval_tokens": int(total[1] + total[3])}

    def _log(self, log_path: Path, record: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.reporter is not None:
            self.reporter.log(record)

    def _loop_step(self, bar, log_path: Path) -> Path | None:
        """One step of ``run``: train, log, evaluate and save when due; the checkpoint if one was written."""
        cfg = self.cfg
        record = self.train_step()
        bar.update(1)
        shown = {k: f"{record[k]:.4g}" for k in ("mse", "ce") if record[k] is not None}
        bar.set_postfix(shown | {"lr": f"{record['lr']:.2g}", "tok/s": f"{record['tokens_per_s']:.0f}"})
        if self.dist.rank == 0 and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            self._log(log_path, record)
            log.info("step %d: %s", self.step, json.dumps(record))
        if self.eval_batches and (self.step % (cfg.eval_every or cfg.save_every) == 0 or self.step == cfg.steps):
            evaluation = self.evaluate()
            self.history[-1].update(evaluation)
            if self.dist.rank == 0:
                self._log(log_path, evaluation)
                shown = {k: f"{evaluation[k]:.4g}" for k in ("eval_mse", "eval_ce") if evaluation[k] is not None}
                bar.write(f"step {self.step}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
        if self.step % cfg.save_every == 0 or self.step == cfg.steps:
            return self.save()
        return None

    def run(self) -> Path | None:
        cfg = self.cfg
        if self.step >= cfg.steps:
            if self.dist.rank == 0:
                print(f"nothing to do: {checkpoints.latest_checkpoint(self.output_dir)} is at step {self.step} of {cfg.steps}")
            return checkpoints.latest_checkpoint(self.output_dir)
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step",
                   disable=not cfg.progress or self.dist.rank != 0, dynamic_ncols=True)
        log_path = self.output_dir / "train_log.jsonl"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.rank == 0:
            config = {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                      for k, v in cfg.public().items()}
            self.reporter = open_reporter(cfg.report_to, self.output_dir, config, resume_step=self.step)
        path = None
        try:
            while self.step < cfg.steps:
                path = self._loop_step(bar, log_path) or path
        finally:
            bar.close()
            if self.reporter is not None:
                self.reporter.close()
                self.reporter = None
            if self.batches is not None:  # stop the packing thread before the interpreter ends
                self.batches.close()
                self.batches = None
        return path


def train(cfg: TrainConfig) -> Path | None:
    """Train as ``cfg`` says; returns the newest checkpoint (a model directory)."""
    return Trainer(cfg).run()
