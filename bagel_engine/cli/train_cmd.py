"""``bagel train``: fine-tune BAGEL on packed multimodal data, resumable, data parallel under
torchrun. The work is done by :mod:`bagel_engine.train`; this module is the command line."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bagel_engine.cli.jobs import Device, Json, Model, app
from bagel_engine.cli.load_options import BaseConfig, CacheDir, Revision, Token, WeightsFile, hub_kwargs
from bagel_engine.params import BagelInputError

DATA = "Data"
OPT = "Optimisation"
RUN = "Run"


class Task(str, Enum):
    auto = "auto"
    t2i = "t2i"
    edit = "edit"
    understand = "understand"
    chat = "chat"
    conversation = "conversation"


class ReportTo(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


EPILOG = """
[bold]Data[/bold]: a CSV, JSONL or Parquet file, or a folder of them, one sample per row (columns as in batch jobs):
t2i [cyan]prompt[/cyan] + [cyan]image[/cyan]; edit [cyan]instruction[/cyan] + input [cyan]image[/cyan](s) +
[cyan]output_image[/cyan]; understand [cyan]image[/cyan](s) + [cyan]question[/cyan] + [cyan]answer[/cyan]; chat
[cyan]prompt[/cyan] + [cyan]answer[/cyan]; conversation [cyan]conversations[/cyan] (LLaVA) or [cyan]messages[/cyan]
with [cyan]<image>[/cyan] placeholders. --task auto picks per row. Samples are packed into sequences of at most
--max-tokens tokens with the official attention mask; a bad row (missing image, missing column, too long) is
written to OUTPUT_DIR/bad_rows.jsonl and skipped.

[bold]Objective[/bold]: flow-matching MSE on the latents of the images to generate (t = shifted sigmoid of a
normal draw, --timestep-shift) and cross-entropy on the answers, as in the official training. Conditions are
dropped at random (text 0.1, ViT 0.4, VAE 0.1) so that classifier-free guidance keeps working.

[bold]Output[/bold]: OUTPUT_DIR/checkpoint-NNNNNN/ is a model directory ([cyan]bagel generate -m[/cyan] it); OUTPUT_DIR/latest
names the newest; train_log.jsonl has the losses. [bold]Resume[/bold] is the default: the same command continues
from the newest checkpoint (same data order, random draws and optimizer state); --overwrite starts afresh.

[bold]Examples[/bold]

  bagel train pairs.jsonl -m ByteDance-Seed/BAGEL-7B-MoT -o runs/style --task t2i --steps 2000 --freeze und,vit

  bagel train edits.parquet -m ./BAGEL-7B-MoT -o runs/edit --lr 1e-5 --max-tokens 16384 --ema 0.999

  bagel train pairs.jsonl -m ./BAGEL-7B-MoT -o runs/lora --dtype bfloat16 --lora-rank 32 --lr 1e-4 --gradient-checkpointing

  torchrun --nproc-per-node 8 --no-python bagel train data/ -m ./BAGEL-7B-MoT -o runs/mix --strategy fsdp

  bagel train tests/data/train/tiny.jsonl -m tests/data/tiny-v1/model -o /tmp/tiny-run --steps 20   [dim]# any CPU[/dim]
"""


def _check(data: Path, model: str, task: str, max_tokens: int, max_image_side: int | None, as_json: bool,
           dataset_info: Path | None = None, hub: dict | None = None) -> None:
    import bagel_engine
    from bagel_engine.train.data import survey, survey_rows
    from bagel_engine.train.official_mix import is_official_config, read_official_config
    from bagel_engine.train.packing import SequencePacker

    pipe = bagel_engine.load(model, device="meta", **(hub or {}))  # configs and tokenizer only (a hub model too)
    packer = SequencePacker(pipe.config, pipe.tokenizer,
                            lambda image, key, resize=None: pipe.prepare_image(image, key, max_image_side,
                                                                               vit_from_original=True, resize=resize))
    if is_official_config(data):
        groups = read_official_config(data, dataset_info)
        report = survey_rows([row for g in groups for row in g.rows], packer, max_tokens, task,
                             [g.transforms for g in groups for _ in g.rows])
        report["groups"] = {g.name: {"rows": len(g.rows), "weight": g.weight, "mandatory": g.mandatory} for g in groups}
    else:
        report = survey(data, packer, max_tokens, task)
    if not as_json and report.get("groups"):
        for name, g in report["groups"].items():
            print(f"group {name}: {g['rows']} rows, weight {g['weight']:g}{', mandatory' if g['mandatory'] else ''}")
    if as_json:
        print(json.dumps(report))
        return
    tasks = ", ".join(f"{n} {t}" for t, n in sorted(report["tasks"].items())) or "none"
    print(f"{report['rows']} rows: {report['good']} good ({tasks}), {len(report['bad'])} bad")
    for b in report["bad"][:10]:
        print(f"  bad {b['where']}: {b['error']}")
    if len(report["bad"]) > 10:
        print(f"  ... and {len(report['bad']) - 10} more")
    if report["good"]:
        t = report["tokens_per_sample"]
        print(f"tokens: {report['tokens']} ({report['image_tokens']} image, {report['text_tokens']} text); "
              f"per sample min {t['min']}, median {t['median']}, max {t['max']}")
        print(f"at --max-tokens {max_tokens}: {report['sequences_per_epoch']} sequences per epoch, "
              f"packing efficiency {100 * report['packing_efficiency']:.1f} %")


@app.command(epilog=EPILOG)
def train(
    data: Annotated[Path, typer.Argument(
        help="CSV, JSONL or Parquet file, or a folder of them; or the official trainer's dataset YAML.",
        show_default=False)],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", rich_help_panel=RUN, help="Folder for checkpoints and logs.", show_default=False)],
    model: Model = None,
    task: Annotated[Task, typer.Option("--task", "-t", rich_help_panel=DATA, help="What every row teaches.")] = Task.auto,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", rich_help_panel=DATA, min=2, help="Tokens per packed sequence (per GPU and step).")] = 8192,
    grad_accum: Annotated[int, typer.Option(
        "--grad-accum", rich_help_panel=OPT, min=1,
        help="Packed sequences per GPU and optimizer step (gradients accumulated): a larger batch in the same memory.")] = 1,
    max_image_side: Annotated[Optional[int], typer.Option(
        "--max-image-side", rich_help_panel=DATA, min=16,
        help="Cap the long side of the images (a multiple of 16), e.g. 512. \\[default: the model's, 1024]")] = None,
    text_dropout: Annotated[float, typer.Option("--text-dropout", rich_help_panel=DATA, min=0, max=1,
                                                help="Chance of dropping a droppable text condition.")] = 0.1,
    vit_dropout: Annotated[float, typer.Option("--vit-dropout", rich_help_panel=DATA, min=0, max=1,
                                               help="Chance of dropping a conditioning image's ViT tokens.")] = 0.4,
    vae_dropout: Annotated[float, typer.Option("--vae-dropout", rich_help_panel=DATA, min=0, max=1,
                                               help="Chance of dropping a conditioning image's VAE latents.")] = 0.1,
    latent_cache_mb: Annotated[float, typer.Option(
        "--latent-cache-mb", rich_help_panel=DATA, min=0,
        help="Keep the frozen VAE's encoding of each picture (up to this many MB) instead of re-encoding it every "
             "epoch: the same latents, a faster step when pictures repeat. The real VAE's takes 128 KB a 256x256 "
             "picture. Kept on disk beside the checkpoints (OUTPUT/latent_cache), so a resumed run reads them back. "
             "\\[default: 0, off]")] = 0.0,
    eval_data: Annotated[Optional[Path], typer.Option(
        "--eval-data", rich_help_panel=DATA,
        help="Rows to evaluate on (same formats): losses at fixed flow times and noise, logged as eval_mse / eval_ce.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(
        "--eval-every", rich_help_panel=DATA, min=1, help="Evaluate every N steps. \\[default: --save-every]")] = None,
    steps: Annotated[int, typer.Option("--steps", rich_help_panel=OPT, min=1, help="Optimizer steps in all.")] = 1000,
    lr: Annotated[float, typer.Option("--lr", rich_help_panel=OPT, min=0, help="Peak learning rate (AdamW).")] = 2e-5,
    min_lr: Annotated[float, typer.Option("--min-lr", rich_help_panel=OPT, min=0, help="Final rate of the cosine schedule.")] = 1e-7,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", rich_help_panel=OPT, min=0, help="Linear warm-up steps.")] = 50,
    schedule: Annotated[Schedule, typer.Option("--schedule", rich_help_panel=OPT, help="After warm-up.")] = Schedule.constant,
    weight_decay: Annotated[float, typer.Option("--weight-decay", rich_help_panel=OPT, min=0)] = 0.0,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", rich_help_panel=OPT, min=0,
                                                 help="Clip the gradient's L2 norm.")] = 1.0,
    timestep_shift: Annotated[float, typer.Option("--timestep-shift", rich_help_panel=OPT, min=0.01,
                                                  help="Shift of the training flow times (1: none).")] = 1.0,
    mse_weight: Annotated[float, typer.Option("--mse-weight", rich_help_panel=OPT, min=0)] = 1.0,
    ce_weight: Annotated[float, typer.Option("--ce-weight", rich_help_panel=OPT, min=0)] = 1.0,
    ce_reweighting: Annotated[bool, typer.Option(
        "--ce-reweighting", rich_help_panel=OPT,
        help="The official ce_loss_reweighting: each learnt text's tokens weigh 1/sqrt(its length), so long "
             "answers do not drown short ones.")] = False,
    freeze: Annotated[Optional[str], typer.Option(
        "--freeze", rich_help_panel=OPT, metavar="PARTS",
        help="Comma list of parts to keep fixed: und (understanding expert, embeddings, LM head), gen (generation "
             "expert and latent glue), vit, connector. The VAE and the position tables are always fixed.")] = None,
    dataset_info: Annotated[Optional[Path], typer.Option(
        "--dataset-info", rich_help_panel=DATA, metavar="FILE",
        help="With an official dataset YAML: its DATASET_INFO registry (YAML or JSON: group -> dataset -> "
             "data_dir / jsonl_path), when the YAML has no dataset_info: section.")] = None,
    visual_gen: Annotated[bool, typer.Option(
        "--visual-gen/--no-visual-gen", rich_help_panel=OPT,
        help="--no-visual-gen: understanding only (the official visual_gen=False): the generation expert is "
             "frozen and rows with an image to generate are bad rows.")] = True,
    visual_und: Annotated[bool, typer.Option(
        "--visual-und/--no-visual-und", rich_help_panel=OPT,
        help="--no-visual-und: no ViT (the official visual_und=False, T2I-only fine-tuning): ViT conditions are "
             "left out, the ViT and connector frozen, rows that need the ViT are bad rows.")] = True,
    ema: Annotated[float, typer.Option("--ema", rich_help_panel=OPT, min=0, max=0.999999,
                                       help="EMA decay of the published weights (0: off).")] = 0.0,
    lora_rank: Annotated[int, typer.Option(
        "--lora-rank", rich_help_panel=OPT, min=0,
        help="Train LoRA adapters of this rank instead of the weights (0: full fine-tuning). The checkpoint "
             "publishes the merged weights.")] = 0,
    lora_alpha: Annotated[Optional[float], typer.Option(
        "--lora-alpha", rich_help_panel=OPT, min=0, help="LoRA scale numerator. \\[default: the rank]")] = None,
    lora_targets: Annotated[str, typer.Option(
        "--lora-targets", rich_help_panel=OPT,
        help="gen (generation expert: images), und (understanding expert: text) or all.")] = "gen",
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", rich_help_panel=OPT,
        help="Recompute each decoder layer in backward: much less activation memory, ~30% more time.")] = False,
    strategy: Annotated[str, typer.Option(
        "--strategy", rich_help_panel=RUN,
        help="Under torchrun: ddp (every GPU holds the model), fsdp (parameters, gradients and optimizer "
             "state sharded over the GPUs: full fine-tuning of the 7B model) or hsdp (sharded inside groups of "
             "--num-shard GPUs, one node by default, replicated across them: the official HYBRID_SHARD).")] = "ddp",
    num_shard: Annotated[Optional[int], typer.Option(
        "--num-shard", rich_help_panel=RUN, min=1,
        help="--strategy hsdp: processes that share one copy of the model (must divide the world). "
             "\\[default: the processes per node, torchrun's LOCAL_WORLD_SIZE]")] = None,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=RUN, min=0, help="Data order and random draws.")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", rich_help_panel=RUN, min=1, help="Checkpoint every N steps.")] = 500,
    keep: Annotated[int, typer.Option("--keep", rich_help_panel=RUN, min=1, help="Checkpoints to keep.")] = 2,
    log_every: Annotated[int, typer.Option("--log-every", rich_help_panel=RUN, min=1, help="Log every N steps.")] = 10,
    report_to: Annotated[ReportTo, typer.Option(
        "--report-to", rich_help_panel=RUN,
        help="Also send the losses, learning rate and speed to TensorBoard (event files in OUTPUT_DIR/tensorboard: "
             "tensorboard --logdir OUTPUT_DIR/tensorboard) or Weights & Biases (project $WANDB_PROJECT, default "
             "bagel-engine; pip install wandb). train_log.jsonl is always written.")] = ReportTo.none,
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=RUN,
                                            help="Start afresh, removing the checkpoints in OUTPUT_DIR.")] = False,
    device: Device = None,
    dtype: Annotated[str, typer.Option("--dtype", rich_help_panel=RUN,
                                       help="Parameter (master) dtype.")] = "float32",
    autocast: Annotated[str, typer.Option("--autocast", rich_help_panel=RUN,
                                          help="auto (bfloat16 on a GPU), bfloat16, float16 or none.")] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", rich_help_panel=RUN)] = True,
    check: Annotated[bool, typer.Option(
        "--check", rich_help_panel=DATA,
        help="Only read the data (no weights loaded, nothing trained): rows per task, bad rows and why, tokens "
             "per sample, sequences per epoch and packing efficiency at --max-tokens.")] = False,
    json_: Json = False,
    weights_file: WeightsFile = None,
    base_config: BaseConfig = None,
    revision: Revision = None,
    cache_dir: CacheDir = None,
    token: Token = None,
) -> None:
    """Fine-tune BAGEL on text-to-image, editing, understanding and chat data (packed, resumable)."""
    from bagel_engine.train import Dropout, TrainConfig, Trainer

    try:
        if not model:
            raise BagelInputError("no model: pass --model DIR_OR_HUB_ID or set BAGEL_MODEL")
        if check:
            layout = {k: v for k, v in (("weights_file", weights_file), ("base_config", base_config)) if v}
            _check(data, model, task.value, max_tokens, max_image_side, json_, dataset_info,
                   hub_kwargs({"revision": revision, "cache_dir": cache_dir, "token": token}) | layout)
            return
        parts = tuple(p.strip() for p in (freeze or "").split(",") if p.strip())
        cfg = TrainConfig(
            model=model, data=str(data), output_dir=str(output_dir), task=task.value, steps=steps, lr=lr,
            min_lr=min_lr, warmup_steps=warmup_steps, schedule=schedule.value, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, max_tokens=max_tokens, grad_accum=grad_accum, max_image_side=max_image_side,
            timestep_shift=timestep_shift, mse_weight=mse_weight, ce_weight=ce_weight, ce_reweighting=ce_reweighting, latent_cache_mb=latent_cache_mb,
            dropout=Dropout(text_dropout, vit_dropout, vae_dropout), freeze=parts, ema=ema, seed=seed,
            visual_gen=visual_gen, visual_und=visual_und, dataset_info=str(dataset_info) if dataset_info else None,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
            gradient_checkpointing=gradient_checkpointing, strategy=strategy, num_shard=num_shard,
            save_every=save_every, keep=keep, eval_data=str(eval_data) if eval_data else None, eval_every=eval_every, log_every=log_every, report_to=report_to.value, device=device, dtype=dtype,
            autocast=None if autocast == "none" else autocast, resume=not overwrite, progress=progress,
            weights_file=weights_file, base_config=base_config,
            revision=revision, cache_dir=str(cache_dir) if cache_dir else None, token=token)
        trainer = Trainer(cfg)
        path = trainer.run()
    except (BagelInputError, OSError, ValueError) as e:
        if json_:
            print(json.dumps({"error": str(e)}))
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    if trainer.dist.rank != 0:
        return
    last = trainer.history[-1] if trainer.history else {}
    summary = {"checkpoint": str(path) if path else None, "step": trainer.step,
               "mse": last.get("mse"), "ce": last.get("ce"), "bad_rows": len(trainer.data.bad)}
    if json_:
        print(json.dumps(summary))
        return
    print(f"trained {trainer.step} steps; checkpoint: {path}")
    if last:
        losses = ", ".join(f"{k} {last[k]:.4g}" for k in ("mse", "ce") if last.get(k) is not None)
        print(f"last step: {losses}")
    if trainer.data.bad:
        print(f"{len(trainer.data.bad)} bad rows skipped (see {output_dir / 'bad_rows.jsonl'})")
