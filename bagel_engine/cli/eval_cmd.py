"""``bagel eval SUITE``: benchmarks run through the public API. The first suite is ``shapes`` (the
demo model's world, judged by a program); the official benchmarks come next."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bagel_engine.cli.jobs import (CfgImgScale, CfgInterval, CfgRenormType, CfgTextScale, Device, Dtype, Json, Model,
                                   NumTimesteps, TimestepShift, fail, knob_values, load_pipeline)
from bagel_engine.cli.load_options import with_load_options
from bagel_engine.cli.main import app

eval_app = typer.Typer(help="Evaluate a model on a benchmark suite (scores per category; pictures kept with -o).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


class ShapesTask(str, Enum):
    all = "all"
    t2i = "t2i"
    edit = "edit"
    vqa = "vqa"


@eval_app.command("shapes", epilog="""
[bold]What is scored[/bold]: t2i (single, position, count, two objects, relation; held-out colour-shape pairs
apart), edit (recolour, move, remove, add), vqa (colour, shape, count, where, yes/no). A program judges every
picture (connected components, nearest palette colour, shape from the fill of the box, position of the centre)
and every answer (the right word and no competing one).

[bold]Examples[/bold]

  bagel eval shapes --model bagel-shapes                        [dim]# all tasks, 20 per category[/dim]

  bagel eval shapes -m bagel-shapes --task vqa --n 50 --seed 7 --json

  bagel eval shapes -m bagel-shapes --quantize int8 -o out/int8  [dim]# pictures and results.jsonl in out/int8[/dim]

  bagel eval shapes -m runs/pink/checkpoint-000400 --task t2i --enable-taylorseer
""")
@with_load_options
def shapes(
    model: Model = None,
    task: Annotated[ShapesTask, typer.Option("--task", "-t", help="Which part of the suite.")] = ShapesTask.all,
    n: Annotated[int, typer.Option("--n", min=1, help="Items per category.")] = 20,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Draws the items and the generation seeds.")] = 1234,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "-o", help="Write the judged pictures, results.jsonl and summary.json here.")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Text-to-image prompts denoised together.")] = 16,
    new_color: Annotated[Optional[str], typer.Option(
        "--new-color", help="Also score t2i prompts naming this extra colour (pink), judged with it in the palette.")] = None,
    cfg_text_scale: CfgTextScale = None,
    cfg_img_scale: CfgImgScale = None,
    cfg_interval: CfgInterval = None,
    cfg_renorm_type: CfgRenormType = None,
    timestep_shift: TimestepShift = None,
    num_timesteps: NumTimesteps = None,
    enable_taylorseer: Annotated[bool, typer.Option(
        "--enable-taylorseer", help="The official TaylorSeer step cache (fewer forwards).")] = False,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """The shapes world's benchmark: draw, edit and answer, judged by a program (the demo model's eval)."""
    from bagel_engine.eval.shapes import SUITE_TASKS, run_shapes

    values = dict(locals())
    from bagel_engine.params import IMAGE_PARAM_NAMES

    knobs = {k: v for k, v in knob_values(values).items() if k in IMAGE_PARAM_NAMES}  # --seed draws the items
    if enable_taylorseer:
        knobs["enable_taylorseer"] = True
    tasks = SUITE_TASKS if task == ShapesTask.all else (task.value,)
    pipe = load_pipeline(model, device, dtype, json_, **load_options)
    from tqdm import tqdm

    bar = tqdm(desc="evaluating", unit="item", file=sys.stderr, dynamic_ncols=True, disable=json_)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = run_shapes(pipe, tasks, n=n, seed=seed, out_dir=output_dir, knobs=knobs, batch=batch,
                            progress=progress, new_color=new_color)
    except ValueError as e:  # BagelInputError included
        fail(str(e), json_)
    finally:
        bar.close()
    summary = report.summary()
    summary["params"]["load"] = {k: str(v) for k, v in load_options.items()} | {
        "dtype": str(pipe.dtype).replace("torch.", ""), "device": str(pipe.device)}
    if json_:
        print(json.dumps(summary))
        return
    typer.echo(report.table())
    if output_dir:
        typer.echo(f"pictures and results in {output_dir}", err=True)
