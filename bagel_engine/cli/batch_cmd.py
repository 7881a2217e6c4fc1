"""``bagel batch``: one task over every row of a CSV, JSONL or Parquet input, resumable, data parallel
under torchrun. The work is done by :mod:`bagel_engine.batch`; this module is the command line."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bagel_engine.batch import dist
from bagel_engine.batch.runner import BatchJob, exit_code, run_batch
from bagel_engine.cli.jobs import (ANY_KNOBS, IMAGE_RUN, SAMPLING, THINK_TOKENS, Device, Dtype, Json, Model, Think, app,
                                   guidance, knob_values, with_knobs)
from bagel_engine.cli.load_options import with_load_options
from bagel_engine.params import BagelInputError


class Preset(str, Enum):
    auto = "auto"
    official = "official"
    diffgentor = "diffgentor"


class Task(str, Enum):
    t2i = "t2i"
    edit = "edit"
    understand = "understand"
    chat = "chat"


JOB = "Job"
TEXT = "Text knobs"

EPILOG = """
[bold]Input[/bold]: a CSV, JSONL or Parquet file, or a folder of them. Columns: [cyan]prompt[/cyan] (or
[cyan]instruction[/cyan]); input images as [cyan]image[/cyan] / [cyan]image_url[/cyan], [cyan]image_url_2[/cyan], ... or
[cyan]input_images[/cyan] (JSON list or comma list; paths relative to the input file, URLs, or bytes in Parquet);
optional [cyan]id[/cyan] (output {id}.png) or [cyan]index[/cyan] (output {index:06d}.png); any knob by its official
name (cfg_text_scale, num_timesteps, think, seed, ...) overrides the command line for that row. diffgentor's
BAGEL edit files and its DG_BAGEL_* variables work unchanged (flags beat variables, columns beat flags).

[bold]Output[/bold]: images in OUTPUT_DIR (or where --output-name-column says), manifest.jsonl + manifest.csv with
one row per input row: status, output, text, think, answer, error, seed, params, timings, finished_at (ISO-8601);
and results.csv, diffgentor's table: the input columns plus output_image. A row's seed is derived from --seed (the
base, default 0) and the row id, so rerunning a row gives the same image; a seed column sets it exactly.

[bold]Resume[/bold] is the default: run the same command again and finished rows are skipped, unfinished ones
redone. --retry-failed also redoes failed rows; --overwrite redoes everything. Exit status: 0 all rows ok,
3 some rows failed (see the summary and the manifest), 2 the job could not start or stopped (disk full:
free space and rerun to resume).

[bold]Examples[/bold]

  bagel batch edits.csv --task edit --output-dir out/ --model ByteDance-Seed/BAGEL-7B-MoT

  bagel batch prompts.jsonl --task t2i -o out/ --height 768 --width 768 --seed 1 --think

  bagel batch data/ --task understand -o answers/ --rows 0:100 --json

  torchrun --nproc-per-node 8 --no-python bagel batch bench.parquet --task edit -o out/

  bagel batch bench.parquet --task edit -o out/ --shard 0/4    [dim]# on 4 machines: 0/4 .. 3/4[/dim]
"""


@app.command(epilog=EPILOG)
@with_load_options
@with_knobs(IMAGE_RUN, guidance(ANY_KNOBS), THINK_TOKENS, SAMPLING)
def batch(
    input: Annotated[Path, typer.Argument(
        help="CSV, JSONL or Parquet file, or a folder of them.", show_default=False)],
    task: Annotated[Task, typer.Option("--task", "-t", rich_help_panel=JOB, help="What to do with every row.")],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", rich_help_panel=JOB, help="Folder for the images and the manifest.", show_default=False)],
    model: Model = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", rich_help_panel=JOB, help="Redo every row, even finished ones.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", rich_help_panel=JOB, help="Redo rows that failed before (finished ok rows are kept).")] = False,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", metavar="K/N", rich_help_panel=JOB,
        help="Do only rows i % N == K (K from 0): split a job across machines.")] = None,
    rows: Annotated[Optional[str], typer.Option(
        "--rows", metavar="SPEC", rich_help_panel=JOB, help="Only these rows (0-based): 0:100, 100:, 0,5,10.")] = None,
    prompt_column: Annotated[Optional[str], typer.Option(
        "--prompt-column", rich_help_panel=JOB, help="Column holding the prompt. \\[default: prompt or instruction]")] = None,
    id_column: Annotated[Optional[str], typer.Option(
        "--id-column", rich_help_panel=JOB, help="Column naming each row's output. \\[default: id, else index]")] = None,
    output_name_column: Annotated[Optional[str], typer.Option(
        "--output-name-column", "--output_name_column", rich_help_panel=JOB,
        help="Column holding each row's output path inside OUTPUT_DIR, sub-folders allowed (shapes/combo.jpg); its "
             "suffix chooses the format (.png, .jpg, .jpeg, .webp; none: .png). Rows leaving it blank get the "
             "default name.")] = None,
    preset: Annotated[Preset, typer.Option(
        "--preset", rich_help_panel=JOB,
        help="Defaults under the variables and flags: official (the official app's), diffgentor (cfg 3.0 / 1.5, "
             "interval 0.4-1, global renorm, 50 steps, for every image task), or auto: diffgentor when a "
             "DG_BAGEL_* variable is set, else official.")] = Preset.auto,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", rich_help_panel=JOB, help="Show the progress bar.")] = True,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", rich_help_panel=JOB, min=1,
        help="t2i: denoise up to this many rows together when their size and knobs agree (faster on a GPU; "
             "each row keeps its own seed and image).")] = 1,
    join: Annotated[bool, typer.Option(
        "--join", rich_help_panel=JOB,
        help="When another job (one process) is writing to --output-dir, share its rows instead of stopping: "
             "this one works from the end of the list, each row claimed by one job only.")] = False,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", rich_help_panel=JOB, min=0, max=2**32 - 1,
        help="Base seed; each row's seed is derived from it and the row id. \\[default: 0]")] = None,
    think: Think = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", rich_help_panel=TEXT, min=1,
        help="understand / chat: most tokens of the answer. \\[default: 512, or --max-think-tokens]")] = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """Run one task over every row of a table: resumable, atomic, data parallel under torchrun."""
    try:
        job = BatchJob(
            input=input, task=task.value, output_dir=output_dir, model=model, knobs=knob_values(locals()) | knobs,
            device=device, dtype=dtype, overwrite=overwrite, retry_failed=retry_failed, shard=dist.parse_shard(shard),
            rows=rows, prompt_column=prompt_column, id_column=id_column, output_column=output_name_column,
            preset=preset.value, progress=progress, batch_size=batch_size,
            load_options=load_options, join=join,
        )
        summary = run_batch(job)
    except (BagelInputError, OSError) as e:
        if json_:
            print(json.dumps({"error": str(e)}))
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    code = exit_code(summary)  # every rank exits alike, so torchrun reports the job's outcome
    if dist.current_rank() != 0:
        raise typer.Exit(code)
    if json_:
        print(json.dumps(summary.to_dict(), ensure_ascii=False))
    else:
        _print_summary(summary)
    raise typer.Exit(code)


def _print_summary(s) -> None:
    mark = typer.style("done", fg="green") if s.failed == 0 and s.unfinished == 0 else typer.style("done", fg="yellow")
    typer.echo(
        f"{mark}: {s.rows} rows: {s.ok} ok, {s.failed} failed"
        + (f", {s.unfinished} unfinished" if s.unfinished else "")
        + f" ({s.processed} this run, {s.skipped} from earlier runs) in {s.elapsed_s:.1f} s"
        + (f" on {s.processes} processes" if s.processes > 1 else ""), err=True)
    for f in s.failures:
        typer.echo(f"  failed {f['id']}: {f['error']}", err=True)
    if s.failed > len(s.failures):
        typer.echo(f"  ... and {s.failed - len(s.failures)} more (see the manifest)", err=True)
    typer.echo(f"manifest: {s.manifest} (+ .csv)", err=True)
