"""``bagel shapes``: the demo model's world: its data, and the one-command recipe of ``bagel-shapes``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bagel_engine.cli.main import app

shapes_app = typer.Typer(help="The shapes world of the demo model bagel-shapes: data and the training recipe.",
                         no_args_is_help=True)
app.add_typer(shapes_app, name="shapes")
RECIPE = "\\[default: the recipe's (--recipe)]"
ROWS = "\\[default: the v3 recipe's]"


@shapes_app.command("data", epilog="""
[bold]Examples[/bold]

  bagel shapes data data/shapes --t2i 20000 --edit 10000 --vqa 10000

  bagel shapes data data/pink --t2i 600 --edit 300 --vqa 300 --new-color pink --new-color-rows 1200

  bagel train data/shapes/train.jsonl -m bagel-shapes -o runs/more --steps 500   [dim]# train on it[/dim]
""")
def data(
    out: Annotated[Path, typer.Argument(help="Folder for train.jsonl, eval.jsonl and images/.", show_default=False)],
    t2i: Annotated[Optional[int], typer.Option("--t2i", min=0, help=f"Text-to-image rows. {ROWS}")] = None,
    edit: Annotated[Optional[int], typer.Option("--edit", min=0, help=f"Edit rows. {ROWS}")] = None,
    vqa: Annotated[Optional[int], typer.Option("--vqa", min=0, help=f"Question rows. {ROWS}")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    new_color: Annotated[str, typer.Option(
        "--new-color", help="An extra colour to teach (pink): --new-color-rows t2i rows name it.")] = "pink",
    new_color_rows: Annotated[int, typer.Option("--new-color-rows", min=0, help="Rows with the new colour.")] = 0,
) -> None:
    """Write rows of the shapes world (pictures as PNG) in the formats `bagel train` reads."""
    from bagel_engine.shapes.data import write_dataset
    from bagel_engine.shapes.recipe import Recipe

    t2i, edit, vqa = (Recipe.t2i_rows if t2i is None else t2i, Recipe.edit_rows if edit is None else edit,
                      Recipe.vqa_rows if vqa is None else vqa)
    try:
        path = write_dataset(out, t2i, edit, vqa, seed=seed, new_color=new_color, new_color_rows=new_color_rows)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path} ({t2i + edit + vqa + new_color_rows} rows) and {out / 'eval.jsonl'}")


@shapes_app.command("build", epilog="""
[bold]Stages[/bold] (each skipped when done; rerun the same command to resume): data -> tokenizer and configs ->
autoencoder (PSNR in WORK/ae_report.json) -> random init -> bagel train -> WORK/bagel-shapes.

[bold]Examples[/bold]

  bagel shapes build work/                      [dim]# the shipped model's recipe (v3), 2 CPU cores[/dim]

  bagel shapes build work/ --recipe v4          [dim]# the tokens-of-16-px experiment[/dim]

  bagel shapes build work/ --recipe v5          [dim]# position tables of contrast from the first step[/dim]

  bagel eval shapes -m work/bagel-shapes         [dim]# score what it made[/dim]
""")
def build(
    work: Annotated[Path, typer.Argument(help="Working folder (data, base model, run, result).", show_default=False)],
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help=f"Training steps of the model. {RECIPE}")] = None,
    ae_steps: Annotated[Optional[int], typer.Option(
        "--ae-steps", min=1, help=f"Training steps of the autoencoder. {RECIPE}")] = None,
    refine_steps: Annotated[Optional[int], typer.Option(
        "--refine-steps", min=0, help=f"Training steps of stage 2 (0: ship stage 1). {RECIPE}")] = None,
    recipe: Annotated[str, typer.Option(
        "--recipe", help="v3: the shipped model's (tokens of 8 px, two stages); v4: an experiment (tokens of "
                         "16 px, one stage; worse so far); v5: v3 with position tables of contrast from the "
                         "first step and a shorter stage 2 (docs/demo-model.md).")] = "v3",
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    threads: Annotated[int, typer.Option("--threads", min=0, help="torch CPU threads (0: torch's default).")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Make the demo model bagel-shapes from an empty folder (--recipe v3, the shipped model's, or v4)."""
    from bagel_engine.shapes.recipe import Recipe

    given = {k: v for k, v in (("steps", steps), ("ae_steps", ae_steps), ("refine_steps", refine_steps))
             if v is not None}
    try:
        made = Recipe.of(recipe, work, seed=seed, threads=threads or None, progress=progress, **given)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--recipe") from None
    out = made.run()
    typer.echo(f"done: bagel eval shapes --model {out}")
