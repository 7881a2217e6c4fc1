"""``bagel eval SUITE``: benchmarks run through the public API: ``shapes`` (the demo model's world, judged
by a program) and the official benchmarks' generation (``geneval``, ``wise``; the others come next)."""

from __future__ import annotations

import json
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bagel_engine.cli.jobs import ANY_KNOBS, Device, Dtype, Json, Model, fail, guidance, load_pipeline, with_knobs
from bagel_engine.cli.load_options import CacheDir, refuse_parallel, with_fp32, with_load_options
from bagel_engine.cli.main import app

eval_app = typer.Typer(help="Evaluate a model on a benchmark suite (scores per category; pictures kept with -o).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _progress_bar(desc: str, unit: str, quiet: bool):
    """A bar on stderr and the ``progress(done, total)`` callback the suites report to."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=quiet)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, progress


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
@with_fp32
@with_knobs(guidance(ANY_KNOBS, leave_out=("cfg_renorm_min",)))
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
    enable_taylorseer: Annotated[bool, typer.Option(
        "--enable-taylorseer", help="The official TaylorSeer step cache (fewer forwards).")] = False,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """The shapes world's benchmark: draw, edit and answer, judged by a program (the demo model's eval)."""
    from bagel_engine.eval.shapes import SUITE_TASKS, run_shapes

    knobs = dict(knobs)  # the guidance knobs only: --seed draws the items
    if enable_taylorseer:
        knobs["enable_taylorseer"] = True
    tasks = SUITE_TASKS if task == ShapesTask.all else (task.value,)
    refuse_parallel(load_options, "bagel eval shapes", "every rank would write the same folder")
    pipe = load_pipeline(model, device, dtype, json_, **load_options)
    bar, progress = _progress_bar("evaluating", "item", json_)
    try:
        report = run_shapes(pipe, tasks, n=n, seed=seed, out_dir=output_dir, knobs=knobs, batch=batch,
                            progress=progress, new_color=new_color)
    except ValueError as e:  # BagelInputError included
        fail(str(e), json_)
    finally:
        bar.close()
    summary = report.summary()
    summary["params"]["load"] = {k: str(v) for k, v in load_options.items() if k != "token"} | {
        "dtype": str(pipe.dtype).replace("torch.", ""), "device": str(pipe.device)}
    if json_:
        print(json.dumps(summary))
        return
    typer.echo(report.table())
    if output_dir:
        typer.echo(f"pictures and results in {output_dir}", err=True)


@eval_app.command("geneval", epilog="""
[bold]What it does[/bold]: the official eval/gen/gen_images_mp.py (scripts/eval/run_geneval.sh): every line of
METADATA gets --n-samples pictures (4) at 1024x1024, cfg 4 text guidance only, interval 0-1, shift 3, 50
steps, renorm_min 0, each cropped to its bounding box, in OUT/{index:05}/samples/{k:05}.png beside
OUT/{index:05}/metadata.jsonl: the layout GenEval's scorer reads. Rerun the same command to resume; spread it
over GPUs with torchrun (contiguous prompt ranges per rank, as the official script). Picture k of prompt i
has seed --seed + 4i + k, whatever the ranks and resumes. Bad lines go to OUT/bad_rows.jsonl.

[bold]Examples[/bold]

  bagel eval geneval evaluation_metadata_long.jsonl -m ByteDance-Seed/BAGEL-7B-MoT -o out/geneval --fp32

  torchrun --nproc-per-node 8 --no-python bagel eval geneval evaluation_metadata.jsonl -m ./BAGEL-7B-MoT -o out/g

  bagel eval geneval prompts.jsonl -m bagel-shapes -o /tmp/g --resolution 64 --num-timesteps 25 --limit 5
""")
@with_load_options
@with_fp32
@with_knobs(guidance(ANY_KNOBS, leave_out=("cfg_img_scale", "cfg_renorm_min")))
def geneval(
    metadata: Annotated[Path, typer.Argument(
        help="GenEval's prompt metadata (JSONL: tag, include, prompt), e.g. evaluation_metadata_long.jsonl "
             "(the rewritten prompts: 0.88) or evaluation_metadata.jsonl (0.82).", exists=True, dir_okay=False)],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the pictures go (GenEval's layout).")],
    model: Model = None,
    n_samples: Annotated[int, typer.Option("--n-samples", min=1, help="Pictures per prompt.")] = 4,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Pictures of one prompt denoised together (run_geneval.sh: 1).")] = 1,
    resolution: Annotated[int, typer.Option("--resolution", min=16, help="Square side in pixels.")] = 1024,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the first picture (the official script's 42).")] = 42,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N prompts.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """GenEval's generation exactly as the official script runs it, resumable and data parallel."""
    from bagel_engine.eval.geneval import SCORER_HELP, GenEvalJob, run_geneval

    knobs = dict(knobs)
    _run_suite("geneval", lambda ranks: GenEvalJob(
        metadata, output_dir, n_samples=n_samples, batch_size=batch_size, resolution=resolution, seed=seed, knobs=knobs,
        limit=limit, rank=ranks.rank, world=ranks.world), run_geneval, SCORER_HELP, model, device, dtype, load_options,
        json_, extra={"n_samples": n_samples})


@eval_app.command("wise", epilog="""
[bold]What it does[/bold]: the official eval/gen/gen_images_mp_wise.py as scripts/eval/run_wise.sh runs it: every
entry of METADATA (final_data.json: prompt_id, Prompt) gets one picture at 1024x1024, cfg 4 text guidance only,
interval 0.4-1, shift 3, 50 steps, renorm_min 0, cropped to its bounding box, in OUT/{prompt_id}.png: the layout
WISE's GPT scorer reads. Think is on (run_wise.sh's --think): the planning system prompt, think text sampled at
temperature 0.3 (at most 2,048 tokens) saved as OUT/{prompt_id}.txt and put before the picture; the
unconditional branch holds no context, as in that script. Rerun to resume; spread over GPUs with torchrun.
Prompt i (its place in the file) has seed --seed + i. Bad entries go to OUT/bad_rows.jsonl.

[bold]Examples[/bold]

  bagel eval wise eval/gen/wise/final_data.json -m ByteDance-Seed/BAGEL-7B-MoT -o out/wise/images  [dim]# 0.70[/dim]

  bagel eval wise final_data.json -m ./BAGEL-7B-MoT -o out/wise-nothink --no-think                  [dim]# 0.52[/dim]

  torchrun --nproc-per-node 8 --no-python bagel eval wise final_data.json -m ./BAGEL-7B-MoT -o out/wise/images
""")
@with_load_options
@with_fp32
@with_knobs(guidance(ANY_KNOBS, leave_out=("cfg_img_scale", "cfg_renorm_min")))
def wise(
    metadata: Annotated[Path, typer.Argument(
        help="WISE's prompts: a JSON list of {prompt_id, Prompt} (eval/gen/wise/final_data.json).",
        exists=True, dir_okay=False)],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the pictures go ({prompt_id}.png).")],
    model: Model = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Plan in text first (run_wise.sh: on).")] = True,
    simple_think: Annotated[bool, typer.Option(
        "--simple-think", help="Only the think text after </think> conditions the picture (the script's "
                               "simple_think; off in the official run).")] = False,
    resolution: Annotated[int, typer.Option("--resolution", min=16, help="Square side in pixels.")] = 1024,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the first prompt (the official script's 42).")] = 42,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N prompts.")] = None,
    max_think_token_n: Annotated[Optional[int], typer.Option(
        "--max-think-tokens", min=1, help="Most think tokens (the script's max_length: 2048).")] = None,
    text_temperature: Annotated[Optional[float], typer.Option(
        "--temperature", min=0.0, help="Think sampling temperature (the script's 0.3).")] = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """WISE's generation exactly as the official script runs it (think on), resumable and data parallel."""
    from bagel_engine.eval.wise import SCORER_HELP, WiseJob, run_wise

    knobs = dict(knobs)
    for name, value in (("max_think_token_n", max_think_token_n), ("text_temperature", text_temperature)):
        if value is not None:
            knobs[name] = value
    _run_suite("wise", lambda ranks: WiseJob(
        metadata, output_dir, think=think, simple_think=simple_think, resolution=resolution, seed=seed, knobs=knobs,
        limit=limit, rank=ranks.rank, world=ranks.world), run_wise, SCORER_HELP, model, device, dtype, load_options,
        json_, extra={"think": think, "simple_think": simple_think})


@eval_app.command("gedit", epilog="""
[bold]What it does[/bold]: the official eval/gen/gedit/gen_images_gedit.py as scripts/eval/run_gedit.sh runs it: every
row of GEdit-Bench (the hub dataset stepfun-ai/GEdit-Bench, or --data FILE_OR_FOLDER of its parquet files) is edited
once with seed 42, cfg_text 4, cfg_img 1.5, interval 0.4-1, text_channel renorm, renorm_min 0, shift 3, 50 steps,
and written as OUT/fullset/{task_type}/{language}/{key}.png beside {key}_SRCIMG.png: the layout GEdit's VIEScore
judge reads. Rerun to resume; spread over GPUs with torchrun (rows interleaved over ranks, as the official shards).
Bad rows go to OUT/bad_rows.jsonl.

[bold]Examples[/bold]

  bagel eval gedit -m ByteDance-Seed/BAGEL-7B-MoT -o out/gedit/gen_image --fp32   [dim]# O 6.52 (EN)[/dim]

  torchrun --nproc-per-node 8 --no-python bagel eval gedit -m ./BAGEL-7B-MoT -o out/gedit/gen_image

  bagel eval gedit --data gedit-parquet/ --language en --limit 10 -m ./BAGEL-7B-MoT -o /tmp/gedit
""")
@with_load_options
@with_fp32
@with_knobs(guidance(ANY_KNOBS, leave_out=("cfg_renorm_min",)))
def gedit(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the edits go (OUT/fullset/...).")],
    data: Annotated[str, typer.Option(
        "--data", help="GEdit-Bench: a hub dataset id, or a parquet file or folder in its columns.")] = "stepfun-ai/GEdit-Bench",
    model: Model = None,
    think: Annotated[bool, typer.Option("--think/--no-think", help="Plan in text first (run_gedit.sh: off).")] = False,
    language: Annotated[Optional[str], typer.Option(
        "--language", help="Only the rows of one instruction language (en or cn; the official run does both).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="The seed set before every edit (the script's 42).")] = 42,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N rows.")] = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """GEdit-Bench's edits exactly as the official script makes them, resumable and data parallel."""
    from bagel_engine.eval.gedit import SCORER_HELP, GEditJob, run_gedit

    knobs = dict(knobs)
    if language is not None and language not in ("en", "cn"):
        fail(f"--language must be en or cn, not {language!r}", json_)
    _run_suite("gedit", lambda ranks: GEditJob(
        data, output_dir, think=think, seed=seed, knobs=knobs, language=language, limit=limit, rank=ranks.rank,
        world=ranks.world, cache_dir=load_options.get("cache_dir"), token=load_options.get("token")), run_gedit,
        SCORER_HELP.replace("{parent}", str(output_dir.parent).replace("{", "{{").replace("}", "}}")), model, device,
        dtype, load_options, json_,
        extra={"think": think, "data": data, "language": language})


_EDIT_SUITES = {
    "imgedit": ("ImgEdit", "eval/gen/gen_images_mp_imgedit.py (run_imgedit.sh: no think)",
                "Benchmark/singleturn/singleturn.json", "{key}.png", "3.28 overall (../shared/EVAL.md)"),
    "kris": ("KRIS-Bench", "eval/gen/gen_images_mp_kris.py (run_kris.sh: think on)", "eval/gen/kris/final_data.json",
             "{type}/{id}.png", "KRIS-Bench's published BAGEL-Think figure"),
    "rise": ("RISEBench", "eval/gen/gen_images_mp_rise.py (run_rise.sh: think on)",
             "eval/gen/rise/data/datav2_total_w_subtask.json", "{category}/{index}.png", "RISEBench's published figure"),
}


def _edit_suite_command(suite: str):
    title, script, meta, layout, figure = _EDIT_SUITES[suite]

    epilog = f"""
[bold]What it does[/bold]: the official {script}: every item of METADATA is edited once (every input image through the
VAE and the ViT, the output at the first image's size), cfg_text 4, cfg_img 1.5, interval 0-1, shift 3, 50 steps,
text_channel renorm, renorm_min 0, cropped to its bounding box, as OUT/{layout}: the layout {title}'s judge reads.
With think, the think text (temperature 0.3, at most 2,048 tokens) goes beside it as .txt and into both guidance
contexts, as in the script. Images are read from --images (default: where the script looks, beside METADATA).
Rerun to resume; spread over GPUs with torchrun. Item i has seed --seed + i. Bad items go to OUT/bad_rows.jsonl.

[bold]Examples[/bold]

  bagel eval {suite} {meta} -m ByteDance-Seed/BAGEL-7B-MoT -o out/{suite}/bagel --fp32

  torchrun --nproc-per-node 8 --no-python bagel eval {suite} {meta} -m ./BAGEL-7B-MoT -o out/{suite}/bagel
"""
    def command(
        metadata: Annotated[Path, typer.Argument(help=f"{title}'s metadata ({meta}).", exists=True, dir_okay=False)],
        output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help=f"Where the edits go (OUT/{layout}).")],
        model: Model = None,
        images: Annotated[Optional[Path], typer.Option(
            "--images", help="The benchmark's image folder (default: where the official script looks).",
            file_okay=False)] = None,
        think: Annotated[Optional[bool], typer.Option(
            "--think/--no-think", help="Plan in text first (default: as the official shell script).",
            show_default=False)] = None,
        seed: Annotated[int, typer.Option("--seed", min=0, help="Seed of the first item (the script's 42).")] = 42,
        limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N items.")] = None,
        device: Device = None,
        dtype: Dtype = None,
        load_options: Optional[dict] = None,
        knobs: Optional[dict] = None,
        json_: Json = False,
    ) -> None:
        from bagel_engine.eval.edit_suites import EditSuiteJob, run_edit_suite

        knobs = dict(knobs)
        probe = EditSuiteJob(suite, metadata, output_dir, images=images, think=think)
        _run_suite(suite, lambda ranks: EditSuiteJob(
            suite, metadata, output_dir, images=images, think=think, seed=seed, knobs=knobs, limit=limit,
            rank=ranks.rank, world=ranks.world), run_edit_suite, probe.scorer_help().replace("{", "{{").replace("}", "}}"),
            model, device, dtype, load_options, json_, extra={"think": probe.thinks, "images": str(probe.image_root)})

    command.__doc__ = f"{title}'s edits exactly as the official script makes them, resumable and data parallel."
    # the annotations name this function's locals (the suite's help texts): resolved here, for typer
    command.__annotations__ = typing.get_type_hints(command, localns=locals(), include_extras=True)
    knob_options = with_knobs(guidance(ANY_KNOBS, leave_out=("cfg_renorm_min",)))
    return eval_app.command(suite, epilog=epilog)(with_load_options(with_fp32(knob_options(command))))


for _suite in _EDIT_SUITES:
    _edit_suite_command(_suite)


def _run_suite(name: str, make_job, run, scorer_help: str, model, device, dtype, load_options: dict, json_: bool,
               extra: dict) -> None:
    """An official suite's generation on this rank (torchrun spreads it), its bar, its summary, the scorer's command."""
    from bagel_engine.batch import dist as DP

    refuse_parallel(load_options, f"bagel eval {name}", "under torchrun its ranks share out the items (data parallel)")
    try:
        ranks = DP.setup(device)
    except ValueError as e:
        fail(str(e), json_)
    pipe = load_pipeline(model, DP.rank_device(device, ranks), dtype, json_, **load_options)
    job = make_job(ranks)
    bar, progress = _progress_bar(f"{name} (rank {ranks.rank})" if ranks.world > 1 else name, "prompt", json_)
    try:
        counts = run(pipe, job, progress=progress)
    except (ValueError, OSError) as e:  # BagelInputError included
        fail(str(e), json_)
    finally:
        bar.close()
    summary = {"suite": name, "counts": counts, "settings": job.settings(), **extra,
               "resolution": getattr(job, "resolution", None), "seed": job.seed, "rank": ranks.rank, "world": ranks.world, "output_dir": str(job.out_dir)}
    if json_:
        print(json.dumps(summary))
    else:
        total = counts.get("prompts", counts.get("rows"))
        typer.echo(f"{counts['generated']} drawn, {counts['skipped']} already there, {counts['failed']} failed "
                   f"(of {total}{' on this rank' if ranks.world > 1 else ''}); pictures in {job.out_dir}")
    typer.echo(scorer_help.format(out=job.out_dir), err=True)


score_app = typer.Typer(help="Score a suite's outputs with its judge (the official scoring scripts' steps).",
                        no_args_is_help=True)
eval_app.add_typer(score_app, name="score")

# The judge's options, declared once for every scoring command.
JudgeUrl = Annotated[str, typer.Option("--judge-url", help="OpenAI-compatible API base, e.g. https://api.openai.com/v1.")]
JudgeKeyEnv = Annotated[str, typer.Option("--judge-key-env", help="Environment variable holding the key.")]
JudgeMaxRequests = Annotated[Optional[int], typer.Option(
    "--judge-max-requests", min=1, help="At most this many new requests this run (a rerun goes on).")]
JudgeWorkers = Annotated[int, typer.Option("--judge-workers", min=1, help="Requests in flight at once.")]


def _judged(suite: str, unit: str, json_: bool, cache: Path, config: dict, score) -> dict:
    """A scoring command's run: its judge (``config``: JudgeConfig's fields, verdicts cached in ``cache``), a
    progress bar, ``score(judge, progress)``; a bad input or judge setting exits 2 with its message."""
    from bagel_engine.eval.judge import Judge, JudgeConfig

    try:
        judge = Judge(JudgeConfig(**config), cache)
        bar, progress = _progress_bar(f"{suite} judge", unit, json_)
        try:
            return score(judge, progress)
        finally:
            bar.close()
    except (ValueError, OSError) as e:  # BagelInputError included
        fail(str(e), json_)


def _judge_report(report: dict, things: str, missing: str, json_: bool, suite: str) -> None:
    """A scoring command's scores and counts (JSON or a table); exit 1 when a request failed."""
    if json_:
        print(json.dumps({"suite": suite, **report}))
    else:
        for name, value in report["scores"].items():
            typer.echo(f"{name:>12}  {value:.2f}")
        typer.echo(f"{report['judged']} {things} judged ({report['asked']} asked this run), {len(report['failed'])} failed, "
                   f"{report['left_by_cap']} left by --judge-max-requests, {report[missing]} without a picture yet")
    if report["failed"] or report["left_by_cap"]:
        raise typer.Exit(1 if report["failed"] else 0)


@score_app.command("imgedit", epilog="""
[bold]What it does[/bold]: the official eval/gen/imgedit/basic_bench.py, step1_get_avgscore.py and step2_typescore.py
through any OpenAI-compatible judge: each edit in OUT (made by bagel eval imgedit) is sent with its original picture
and the benchmark's judge prompt for its edit type; the verdicts go to OUT/result.jsonl and result.json, the scores
to OUT/average_score.json and typescore.json (per edit type and overall), as the official steps write them.
Verdicts are cached (OUT/judge_cache.jsonl): a rerun asks only what is missing. The key comes from the environment.

[bold]Examples[/bold]

  OPENAI_API_KEY=... bagel eval score imgedit Benchmark/singleturn/singleturn.json -o out/imgedit/bagel \\
      --judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-11-20            [dim]# the published judge[/dim]

  bagel eval score imgedit singleturn.json -o out/imgedit/bagel --judge-url http://127.0.0.1:8000/v1 \\
      --judge-model Qwen/Qwen2.5-VL-72B-Instruct --judge-max-requests 100              [dim]# a local vLLM[/dim]
""")
def score_imgedit_command(
    metadata: Annotated[Path, typer.Argument(help="ImgEdit's singleturn.json.", exists=True, dir_okay=False)],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="The edits (bagel eval imgedit -o).",
                                             exists=True, file_okay=False)],
    judge_url: JudgeUrl,
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name (official: gpt-4o-2024-11-20).")],
    judge_prompts: Annotated[Optional[Path], typer.Option(
        "--judge-prompts", help="ImgEdit's judge_prompt.json. [default: beside METADATA]", dir_okay=False)] = None,
    images: Annotated[Optional[Path], typer.Option(
        "--images", help="The original pictures' folder. [default: METADATA's folder]", file_okay=False)] = None,
    judge_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    judge_max_requests: JudgeMaxRequests = None,
    judge_workers: JudgeWorkers = 4,
    json_: Json = False,
) -> None:
    """ImgEdit's GPT scores of the edits in OUT, as the official scoring scripts compute them."""
    from bagel_engine.eval.imgedit_score import score_imgedit

    report = _judged("imgedit", "edit", json_, output_dir / "judge_cache.jsonl",
                     dict(url=judge_url, model=judge_model, key_env=judge_key_env, max_requests=judge_max_requests),
                     lambda judge, progress: score_imgedit(
                         output_dir, metadata, images or metadata.parent,
                         judge_prompts or metadata.parent / "judge_prompt.json", judge, judge_workers, progress))
    _judge_report(report, "edits", "no_edit_yet", json_, "imgedit")


@score_app.command("gedit", epilog="""
[bold]What it does[/bold]: the official eval/gen/gedit/test_gedit_score.py (VIEScore, task "tie") and
calculate_statistics.py through any OpenAI-compatible judge: for each edit in OUT/fullset (made by bagel eval gedit),
a semantic-consistency request (the source picture and the edit) and a perceptual-quality one (the edit), with
VIEScore's prompts read from your copy of vie_prompts.py (--judge-prompts; parsed, not run); SC and PQ the minimum of
each verdict's score list, O = sqrt(SC x PQ). The rows go to RESULTS/bagel_{group}_gpt_score.csv (the script's files:
calculate_statistics.py runs on them), the means per task group and their average per language (all rows and the
intersection subset) to RESULTS/gedit_scores.json. Verdicts are cached (RESULTS/judge_cache.jsonl): a rerun asks only
what is missing. The key comes from the environment.

[bold]Examples[/bold]

  OPENAI_API_KEY=... bagel eval score gedit -o out/gedit/gen_image --language en \\
      --judge-prompts Bagel/eval/gen/gedit/viescore/vie_prompts.py \\
      --judge-url https://api.openai.com/v1 --judge-model gpt-4.1-2025-04-14           [dim]# the published judge[/dim]
""")
def score_gedit_command(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="The edits (bagel eval gedit -o): holds fullset/.",
                                             exists=True, file_okay=False)],
    judge_prompts: Annotated[Path, typer.Option(
        "--judge-prompts", help="VIEScore's vie_prompts.py (eval/gen/gedit/viescore/): its prompts are read from it.",
        exists=True, dir_okay=False)],
    judge_url: JudgeUrl,
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name (official: gpt-4.1-2025-04-14).")],
    data: Annotated[str, typer.Option("--data", help="GEdit-Bench: a hub dataset id, a parquet file or a folder of them "
                                      "(the one bagel eval gedit read).")] = "stepfun-ai/GEdit-Bench",
    language: Annotated[Optional[str], typer.Option("--language", help="en or cn: only those rows. [default: both]")] = None,
    results: Annotated[Optional[Path], typer.Option(
        "--results", help="Where the CSVs go. [default: OUT/../gpt4o/eval_results_new, as the scripts lay it out]",
        file_okay=False)] = None,
    judge_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    judge_max_requests: JudgeMaxRequests = None,
    judge_workers: JudgeWorkers = 4,
    cache_dir: CacheDir = None,
    json_: Json = False,
) -> None:
    """GEdit-Bench's VIEScore SC / PQ / O of the edits in OUT, as the official scoring scripts compute them."""
    from bagel_engine.eval.gedit_score import judging_rows, score_gedit

    if language not in (None, "en", "cn"):
        fail(f"--language {language!r}: en or cn", json_)
    try:
        rows = judging_rows(data, None, None if cache_dir is None else str(cache_dir))  # a token: HF_TOKEN
    except (ValueError, OSError) as e:  # BagelInputError included
        fail(str(e), json_)
    where = results or output_dir.parent / "gpt4o" / "eval_results_new"
    report = _judged("gedit", "edit", json_, where / "judge_cache.jsonl",
                     dict(url=judge_url, model=judge_model, key_env=judge_key_env, max_requests=judge_max_requests,
                          max_tokens=1400),
                     lambda judge, progress: score_gedit(output_dir, rows, judge_prompts, judge, where, language,
                                                         judge_workers, progress))
    _judge_report(report, "edits", "no_edit_yet", json_, "gedit")
    if not json_ and report["unparsed"]:
        typer.echo(f"{len(report['unparsed'])} verdicts without a readable score list were left out (the official "
                   "code guesses a random score for them)", err=True)


@score_app.command("wise", epilog="""
[bold]What it does[/bold]: the official eval/gen/wise/gpt_eval_mp.py and cal_score.py through any OpenAI-compatible
judge: each picture OUT/{prompt_id}.png (made by bagel eval wise) is sent with WISE's judge protocol, read from your
copy of gpt_eval_mp.py (--judge-script; parsed, not run), at temperature 0; the verdicts go to OUT/{stem}_full.jsonl
and {stem}_scores.jsonl, the WiScores per category (Cultural, Time, Space, Biology, Physics, Chemistry) and Overall to
OUT/results.txt and wise_scores.json, as cal_score.py computes them. Verdicts are cached (OUT/judge_cache.jsonl): a
rerun asks only what is missing. The key comes from the environment.

[bold]Examples[/bold]

  OPENAI_API_KEY=... bagel eval score wise Bagel/eval/gen/wise/final_data.json -o out/wise/bagel \\
      --judge-script Bagel/eval/gen/wise/gpt_eval_mp.py --judge-url https://api.openai.com/v1 \\
      --judge-model gpt-4o-2024-11-20                                                  [dim]# the published judge[/dim]
""")
def score_wise_command(
    metadata: Annotated[Path, typer.Argument(help="WISE's metadata: final_data.json, or one of its three files.",
                                             exists=True, dir_okay=False)],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="The pictures (bagel eval wise -o).",
                                             exists=True, file_okay=False)],
    judge_script: Annotated[Path, typer.Option(
        "--judge-script", help="WISE's eval/gen/wise/gpt_eval_mp.py: its judge protocol is read from it.",
        exists=True, dir_okay=False)],
    judge_url: JudgeUrl,
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name (official: gpt-4o-2024-11-20).")],
    images: Annotated[Optional[Path], typer.Option(
        "--images", help="The pictures' folder. [default: OUT]", file_okay=False)] = None,
    judge_key_env: JudgeKeyEnv = "OPENAI_API_KEY",
    judge_max_requests: JudgeMaxRequests = None,
    judge_workers: JudgeWorkers = 4,
    json_: Json = False,
) -> None:
    """WISE's GPT scores (WiScore per category and overall) of the pictures in OUT, as the official scripts compute them."""
    from bagel_engine.eval.wise_score import score_wise

    report = _judged("wise", "picture", json_, output_dir / "judge_cache.jsonl",
                     dict(url=judge_url, model=judge_model, key_env=judge_key_env, max_requests=judge_max_requests,
                          max_tokens=2000, temperature=0.0),
                     lambda judge, progress: score_wise(output_dir, metadata, judge_script, judge, images,
                                                        judge_workers, progress))
    _judge_report(report, "pictures", "no_image_yet", json_, "wise")
    if not json_ and not report["complete"]:
        typer.echo("not the official figure: " + (f"{report['unscored']} verdicts without a score; " if report["unscored"]
                                                  else "") + (f"files short of WISE's counts: {report['short_files']}"
                                                              if report["short_files"] else ""), err=True)
