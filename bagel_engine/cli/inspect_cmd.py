"""``bagel inspect``: what a model directory should hold and what it holds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bagel_engine.cli.main import app


@app.command(
    "inspect",
    epilog=(
        "Examples:\n\n"
        "  bagel inspect ByteDance-Seed/BAGEL-7B-MoT\n\n"
        "  bagel inspect ./BAGEL-7B-MoT --tensors\n\n"
        "  bagel inspect ./my-finetune --json | jq '.files[\"ema.safetensors\"].missing'"
    ),
)
def inspect_command(
    model: Annotated[str, typer.Argument(help="Model directory in the official layout, or a hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (key 'expected': file -> {name: shape}).")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every expected tensor name and shape.")] = False,
) -> None:
    """Report what the engine expects from MODEL (every tensor name and shape per file, parameter
    counts, bytes per dtype) and, where the weight files are present, what they hold: missing,
    unexpected and wrongly shaped tensors, with hints for known mistakes. Reads no weights.
    Exits 1 when a present file does not match."""
    from bagel_engine import inspect_model
    from bagel_engine.inspection import format_report

    try:
        report = inspect_model(model)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(format_report(report, show_tensors=tensors))
    if any(f["present"] and not f["ok"] for f in report["files"].values()):
        raise typer.Exit(1)
