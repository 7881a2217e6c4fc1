"""``bagel inspect``: what a model directory should hold and what it holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bagel_engine.cli.load_options import CacheDir, Revision, Token
from bagel_engine.cli.main import app


@app.command(
    "inspect",
    epilog=(
        "Examples:\n\n"
        "  bagel inspect ByteDance-Seed/BAGEL-7B-MoT   [dim]# configs, tokenizer and safetensors headers only[/dim]\n\n"
        "  bagel inspect multimodal-reasoning-lab/Bagel-Zebra-CoT@main --json\n\n"
        "  bagel inspect ./BAGEL-7B-MoT --tensors\n\n"
        "  bagel inspect ./my-finetune --json | jq '.files[\"ema.safetensors\"].missing'\n\n"
        "  bagel inspect ByteDance-Seed/BAGEL-7B-MoT --plan --gpu-memory 24GB\n\n"
        "  bagel inspect ./BAGEL-7B-MoT --plan --gpu-memory 12GB --height 768 --width 1024\n\n"
        "  bagel inspect ./BAGEL-7B-MoT --plan --gpus 2 --gpu-memory 24GB   # two cards: tensor parallel"
    ),
)
def inspect_command(
    model: Annotated[str, typer.Argument(help="Model directory in the official layout, or a hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (key 'expected': file -> {name: shape}).")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every expected tensor name and shape.")] = False,
    plan: Annotated[bool, typer.Option("--plan", help="Print the GPU memory plan: what each memory option (quantize, "
                                       "offload) needs at the requested size and which fits (JSON key 'plan').")] = False,
    gpu_memory: Annotated[str | None, typer.Option("--gpu-memory", help="GPU memory to plan for, e.g. 24GB, 24GiB, 12000MB "
                                                   "(implies --plan): recommends the options that fit.")] = None,
    gpus: Annotated[int, typer.Option("--gpus", min=1, help="Cards to plan for (--gpu-memory is per card): adds the "
                                      "tensor-parallel options (--tensor-parallel-size).")] = 1,
    height: Annotated[int, typer.Option("--height", help="Image height to plan for (pixels).")] = 1024,
    width: Annotated[int, typer.Option("--width", help="Image width to plan for (pixels).")] = 1024,
    fp8: Annotated[bool, typer.Option("--fp8", help="The GPU supports fp8 (compute capability >= 8.9): "
                                      "may recommend --quantize fp8.")] = False,
    weights_file: Annotated[str | None, typer.Option(
        "--weights-file", metavar="FILE", help="The decoder's weight file (or a shard index) to check. "
        "\\[default: the one the layout names]")] = None,
    base_config: Annotated[str | None, typer.Option(
        "--base-config", metavar="MODEL", help="Where configs missing from MODEL come from: a directory, a hub id "
        "or bagel-7b-mot (shipped).")] = None,
    revision: Revision = None,
    cache_dir: CacheDir = None,
    token: Token = None,
) -> None:
    """Report what the engine expects from MODEL (every tensor name and shape per file, parameter
    counts, bytes per dtype) and, where the weight files are present, what they hold: missing,
    unexpected and wrongly shaped tensors, with hints for known mistakes. Reads no weights: a hub
    model's weight files are judged by their safetensors headers, read over HTTP.
    Exits 1 when a present file does not match."""
    from bagel_engine.inspection import format_report, inspect_and_config
    from bagel_engine.weights.hub import HubOptions

    hub = HubOptions(revision=revision, cache_dir=None if cache_dir is None else str(cache_dir), token=token)
    try:
        report, cfg = inspect_and_config(model, weights_file, base_config, hub)  # the hub id is resolved once
        memory_plan = _plan(cfg, model, gpu_memory, height, width, fp8, gpus) if plan or gpu_memory else None
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        if memory_plan is not None:
            report["plan"] = memory_plan.as_dict()
        typer.echo(json.dumps(report))
    else:
        typer.echo(format_report(report, show_tensors=tensors))
        if memory_plan is not None:
            from bagel_engine.memory_plan import format_plan

            typer.echo("")
            typer.echo(format_plan(memory_plan))
    if any(f["present"] and not f["ok"] for f in report["files"].values()):
        raise typer.Exit(1)


def _plan(cfg, model: str, gpu_memory: str | None, height: int, width: int, fp8: bool, gpus: int = 1):
    from bagel_engine.memory_plan import parse_size, plan

    return plan(cfg, parse_size(gpu_memory) if gpu_memory else None, height, width, model=model, fp8=fp8, gpus=gpus)
