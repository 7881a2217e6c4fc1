"""``bagel bench``: time a named workload through the public API and set it against the device's
floor; with ``--compare``, also what each loading option costs in speed, memory and quality.
The work is done by :mod:`bagel_engine.bench`; this module is the command line."""

from __future__ import annotations

import json
import shlex
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from bagel_engine.cli.main import app

RUN = "Model and device"
WORK = "Workload"
MEASURE = "Measurement and output"
TRAIN = "Training workload (-w train)"
SERVE = "Serving workload (-w serve)"


class Kind(str, Enum):
    t2i = "t2i"
    edit = "edit"
    understand = "understand"
    chat = "chat"
    train = "train"
    serve = "serve"


EPILOG = """
[bold]Output[/bold]: load time, prefill, ms per denoising step (guided and plain steps apart), seconds per image,
VAE decode, text tokens/s, peak memory (GPU: torch max_memory_allocated; CPU: RSS high-water mark, the load
included), the workload's FLOPs, its floor on this device (FLOPs over the measured matmul rate; one-token text
decoding is bounded by weight + KV bytes over the measured memory bandwidth) and our ratio to it. Timings are
medians of --repeat runs after --warmup runs, with the device synchronised.

[bold]--compare[/bold] SET [SET ...]: each SET is load options as KEY=VALUE[,KEY=VALUE] (quantize=int8,
offload=layer, dtype=bfloat16, compile=true, attention=sdpa, official_numerics=true; image knobs such as
enable_taylorseer=true go to the call). Each is loaded and run like the baseline with the same seeds and
prompts and reported with seconds per request, peak memory, latent cosine similarity and PSNR of the images
(text: same answer). A set that fails to load or run is reported as failed.

[bold]Examples[/bold]

  bagel bench --model tests/data/tiny-v1/model --height 64 --width 64

  bagel bench --random-weights benchmarks/configs/mid --height 128 --width 128 --record benchmarks

  bagel bench --random-weights tests/data/bagel-7b-mot --dtype bfloat16 --cfg-img-scale 1 --json

  bagel bench -w understand --model ByteDance-Seed/BAGEL-7B-MoT --max-new-tokens 257

  bagel bench -m ByteDance-Seed/BAGEL-7B-MoT --compare quantize=int8 quantize=nf4 offload=layer enable_taylorseer=true

  bagel bench -w train --random-weights benchmarks/configs/mid --max-tokens 2048 --repeat 5   [dim]# training throughput, MFU[/dim]

  bagel bench -w serve -m tests/data/tiny-v1/model --max-new-tokens 64 --concurrency 1 4 8   [dim]# a real server, batched against --max-batch 1[/dim]

  bagel bench -w serve -m bagel-shapes --server-process   [dim]# the server as its own process (no GIL shared with the clients)[/dim]

  bagel bench -w serve -m ./BAGEL-7B-MoT --replicas 2    [dim]# two replicas on Ray (a GPU each) behind the server[/dim]
"""


def _serve_bench(model, random, device, dtype, load_options, height, width, num_timesteps, max_new_tokens,
                 concurrency, max_batch, seed, record, date, as_json, server_process=False, replicas=0) -> None:
    import datetime
    import functools

    import bagel_engine
    from bagel_engine.bench.runner import json_safe
    from bagel_engine.bench.serving import (ServeBench, format_serve, run_serve_benchmark, run_serve_benchmark_on,
                                            server_process as serve_in_process)
    from bagel_engine.cli.load_options import load_flags

    def bench_config(side: int, own) -> ServeBench:  # the model's own size when it is small (bagel-shapes), else 64 px
        w = width or (own.width if own.width <= 256 else 64)
        h = height or (own.height if own.height <= 256 else 64)
        sizes = ((w, h), (w, max(side, h // 2 // side * side)))
        return ServeBench(sizes=sizes, num_timesteps=num_timesteps or 25, max_new_tokens=max_new_tokens,
                          concurrency=tuple(concurrency or (1, 4, 8)), max_batch=max_batch, seed=seed)

    try:
        if server_process:
            from bagel_engine.inspection import checkpoint_of
            from bagel_engine.weights.config import checkpoint_task_defaults

            ck, model_cfg = checkpoint_of(model)
            cfg = bench_config(model_cfg.latent_downsample, checkpoint_task_defaults(ck))
            args = [*(["--device", device] if device else []), *(["--dtype", dtype] if dtype else []),
                    *load_flags(load_options), *(["--replicas", str(replicas)] if replicas else [])]
            result = run_serve_benchmark_on(functools.partial(serve_in_process, model, cfg=cfg, serve_args=args), cfg,
                                            log=lambda m: typer.echo(m, err=True))
            where = {"device": device or "default", "server": "process"} | ({"replicas": replicas} if replicas else {})
        else:
            from bagel_engine.serve.threaded import in_fresh_thread

            pipe = in_fresh_thread(lambda: bagel_engine.load(model, device=device, dtype=dtype, random_weights=random,
                                                             **load_options))
            cfg = bench_config(pipe.config.latent_downsample, pipe.task_defaults)
            result = run_serve_benchmark(pipe, cfg, log=lambda m: typer.echo(m, err=True))
            where = {"device": str(pipe.device), "server": "thread"}
    except (ValueError, OSError, RuntimeError) as e:
        _fail(str(e), as_json)
    result |= {"model": model, "date": date or datetime.date.today().isoformat(), **where,
               "threads": __import__("torch").get_num_threads()}
    if record is not None:
        slug = "-".join(part for part in Path(model).parts[-2:] if part not in ("/", "model")) or "model"
        out = Path(record) / "results" / f"serve-{result['date']}-{slug}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe(result), indent=2))
        typer.echo(f"recorded {out}", err=True)
    if as_json:
        print(json.dumps(json_safe(result)))
    else:
        typer.echo(format_serve(result))


def _train_bench(model, random, height, width, max_tokens, repeat, warmup, lora_rank, freeze, checkpointing,
                 device, dtype, matmul_tflops, as_json) -> None:
    from bagel_engine.bench.runner import json_safe
    from bagel_engine.bench.training import TrainBench, format_training, run_training_benchmark
    from bagel_engine.inspection import checkpoint_of

    try:  # the configs alone (a hub model's small files, any layout of the family)
        side = min(512, checkpoint_of(model)[1].max_image_side)
        tb = TrainBench(model=model, random_weights=random, height=height or side, width=width or side,
                        max_tokens=max_tokens, steps=repeat, warmup=warmup, lora_rank=lora_rank,
                        freeze=tuple(p.strip() for p in (freeze or "").split(",") if p.strip()),
                        gradient_checkpointing=checkpointing, device=device, dtype=dtype or "float32",
                        matmul_tflops=matmul_tflops)
        result = run_training_benchmark(tb, log=lambda m: typer.echo(m, err=True))
    except (ValueError, OSError) as e:
        _fail(str(e), as_json)
    if as_json:
        print(json.dumps(json_safe(result)))
    else:
        typer.echo(format_training(result))


def _fail(message: str, as_json: bool, code: int = 2) -> None:
    if as_json:
        print(json.dumps({"error": message}))
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _command_line(ctx: typer.Context) -> str:
    """The command as a reproducible line: every option that differs from its default."""
    words = ["bagel", "bench"]
    extra: list[str] = []  # option sets given as arguments
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        kind = getattr(param, "param_type_name", "")
        if kind == "argument":
            extra += [str(v) for v in value or ()]
            continue
        if value is None or value == param.default or value in ((), []) or kind != "option":
            continue
        if isinstance(value, Enum):
            value = value.value
        if param.name == "compare":
            continue  # all option sets go last, after --compare
        if getattr(param, "is_flag", False):
            if param.secondary_opts and not value:
                words.append(param.secondary_opts[0])
            elif value:
                words.append(param.opts[0])
            continue
        flag = max(param.opts, key=len)
        if param.multiple:
            for v in value:
                words += [flag, str(v)]
        elif isinstance(value, (tuple, list)):
            words += [flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            words += [flag, str(value)]
    sets = list(ctx.params.get("compare") or []) + extra
    return shlex.join(words + (["--compare", *sets] if sets else []))


@app.command(epilog=EPILOG)
def bench(
    ctx: typer.Context,
    more_sets: Annotated[Optional[list[str]], typer.Argument(
        metavar="SET", help="More option sets for --compare.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", envvar="BAGEL_MODEL", show_envvar=True, rich_help_panel=RUN,
        help="Model directory in the official layout, or a hub id.")] = None,
    random_weights: Annotated[Optional[Path], typer.Option(
        "--random-weights", metavar="CONFIG_DIR", rich_help_panel=RUN,
        help="Build the model from the configs in CONFIG_DIR with random weights (e.g. tests/data/bagel-7b-mot "
             "for the full size, benchmarks/configs/mid for a CPU-sized one).")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", rich_help_panel=RUN, help="cuda, cuda:1 or cpu. \\[default: cuda when available]")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", rich_help_panel=RUN, help="bfloat16, float16 or float32. \\[default: bfloat16 on a GPU, float32 on the CPU]")] = None,
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", rich_help_panel=RUN, help="Quantize the decoder's linear layers: fp8, int8 or nf4.")] = None,
    offload: Annotated[Optional[str], typer.Option(
        "--offload", rich_help_panel=RUN, help="Keep weights in CPU memory and stream them: model or layer.")] = None,
    compile_: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile", rich_help_panel=RUN, show_default=False,
        help="Compile the denoising and decoding steps (torch.compile). \\[default: the engine's]")] = None,
    attention: Annotated[Optional[str], typer.Option(
        "--attention", rich_help_panel=RUN, help="Attention backend: auto, sdpa, flex or flash.")] = None,
    official_numerics: Annotated[bool, typer.Option(
        "--official-numerics", rich_help_panel=RUN, help="VAE and Euler update on the CPU in float32, as the official app.")] = False,
    revision: Annotated[Optional[str], typer.Option(
        "--revision", rich_help_panel=RUN, metavar="REV",
        help="The hub model's branch, tag or commit (also MODEL@REV). A token comes from HF_TOKEN only: "
             "the command line is recorded with the figures.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(
        "--cache-dir", rich_help_panel=RUN, metavar="DIR", help="Where hub downloads are kept.")] = None,
    workload: Annotated[Kind, typer.Option(
        "--workload", "-w", rich_help_panel=WORK, help="What to time.")] = Kind.t2i,
    height: Annotated[Optional[int], typer.Option(
        "--height", rich_help_panel=WORK,
        help="Image height (t2i output; edit / understand input). \\[default: the model's largest, at most 1024]")] = None,
    width: Annotated[Optional[int], typer.Option(
        "--width", rich_help_panel=WORK, help="Image width (as --height).")] = None,
    num_timesteps: Annotated[Optional[int], typer.Option(
        "--num-timesteps", min=2, rich_help_panel=WORK, help="Schedule points (N-1 denoising steps). \\[default: 50]")] = None,
    cfg_text_scale: Annotated[Optional[float], typer.Option(
        "--cfg-text-scale", min=0.0, rich_help_panel=WORK, help="\\[default: 4.0]")] = None,
    cfg_img_scale: Annotated[Optional[float], typer.Option(
        "--cfg-img-scale", min=0.0, rich_help_panel=WORK, help="\\[default: 1.5 t2i, 2.0 edit]")] = None,
    cfg_interval: Annotated[Optional[tuple[float, float]], typer.Option(
        "--cfg-interval", metavar="LO HI", rich_help_panel=WORK, help="\\[default: 0.4 1.0 t2i, 0.0 1.0 edit]")] = None,
    timestep_shift: Annotated[Optional[float], typer.Option(
        "--timestep-shift", rich_help_panel=WORK, help="\\[default: 3.0]")] = None,
    taylorseer: Annotated[bool, typer.Option(
        "--taylorseer", rich_help_panel=WORK, help="Turn on the TaylorSeer step cache (enable_taylorseer).")] = False,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=2, rich_help_panel=WORK,
        help="understand / chat: the API's max_new_tokens (at most N-1 tokens are generated; they stop "
             "earlier at the end token).")] = 256,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, rich_help_panel=WORK,
        help="Requests per run (t2i: one generate([...]) call, denoised together; others: one after another).")] = 1,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", rich_help_panel=WORK, help="Prompt or question. \\[default: a fixed one per workload]")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, rich_help_panel=WORK, help="Seed of the first request.")] = 0,
    repeat: Annotated[int, typer.Option(
        "--repeat", min=1, rich_help_panel=MEASURE, help="Measured runs (figures are medians).")] = 3,
    warmup: Annotated[int, typer.Option(
        "--warmup", min=0, rich_help_panel=MEASURE, help="Runs before measuring (compilation, caches).")] = 1,
    compare: Annotated[Optional[list[str]], typer.Option(
        "--compare", metavar="SET", rich_help_panel=MEASURE,
        help="Option set(s) to compare with the baseline, e.g. quantize=int8 offload=layer.")] = None,
    matmul_tflops: Annotated[Optional[float], typer.Option(
        "--matmul-tflops", rich_help_panel=MEASURE,
        help="Use this matmul rate for the floor instead of measuring it (e.g. a datasheet's).")] = None,
    bandwidth_gbs: Annotated[Optional[float], typer.Option(
        "--bandwidth-gbs", rich_help_panel=MEASURE,
        help="Use this memory bandwidth (GB/s) for the text-decoding floor instead of measuring it.")] = None,
    record: Annotated[Optional[Path], typer.Option(
        "--record", metavar="DIR", rich_help_panel=MEASURE,
        help="Also write DIR/results/*.json and add a row to DIR/RESULTS.md (e.g. --record benchmarks).")] = None,
    date: Annotated[Optional[str], typer.Option(
        "--date", rich_help_panel=MEASURE, help="Date to record. \\[default: today]")] = None,
    json_: Annotated[bool, typer.Option(
        "--json", rich_help_panel=MEASURE, help="Print one JSON object with every figure instead of the report.")] = False,
    max_tokens: Annotated[int, typer.Option(
        "--max-tokens", min=16, rich_help_panel=TRAIN, help="train: tokens per packed sequence.")] = 4096,
    lora_rank: Annotated[int, typer.Option(
        "--lora-rank", min=0, rich_help_panel=TRAIN, help="train: LoRA adapters of this rank (0: full).")] = 0,
    freeze: Annotated[Optional[str], typer.Option(
        "--freeze", rich_help_panel=TRAIN, help="train: parts kept fixed, e.g. und,vit.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", rich_help_panel=TRAIN, help="train: recompute each layer in backward.")] = False,
    concurrency: Annotated[Optional[list[int]], typer.Option(
        "--concurrency", min=1, rich_help_panel=SERVE,
        help="serve: clients sending at once, one request each (repeat the option). \\[default: 1 4 8]")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1, rich_help_panel=SERVE,
        help="serve: the server's --max-batch, measured against --max-batch 1.")] = 8,
    server_process: Annotated[bool, typer.Option(
        "--server-process", rich_help_panel=SERVE,
        help="serve: run the server as its own `bagel serve` process (the clients then share nothing with it, as "
             "real users); default: in a thread of this process.")] = False,
    replicas: Annotated[int, typer.Option(
        "--replicas", min=0, rich_help_panel=SERVE,
        help="serve: the server runs the model as N replicas on Ray (`bagel serve --replicas N`, its own process; "
             "--max-batch is per replica). 0: one model.")] = 0,
) -> None:
    """Time a workload (t2i / edit / understand / chat / train / serve) and compare it with the device's floor."""
    from bagel_engine.bench import report
    from bagel_engine.bench.runner import BenchConfig, json_safe, parse_option_set, run_benchmark
    from bagel_engine.bench.workloads import Workload

    if model and random_weights:
        _fail("give --model or --random-weights CONFIG_DIR, not both", json_)
    if not model and not random_weights:
        _fail("no model: pass --model DIR_OR_HUB_ID, --random-weights CONFIG_DIR or set BAGEL_MODEL", json_)
    if revision and model:  # one spelling for every workload (serve and train start from the model string)
        if "@" in model:
            _fail(f"--model {model} already names a revision; drop --revision {revision}", json_)
        model = f"{model}@{revision}"
    if workload is Kind.serve:
        options = {k: v for k, v in (("quantize", quantize), ("offload", offload), ("compile", compile_),
                                     ("attention", attention)) if v is not None}
        server_process = server_process or replicas > 0
        if server_process and random_weights:
            _fail("--server-process (and --replicas) serves a model directory or hub id: give --model, not --random-weights", json_)
        _serve_bench(str(random_weights or model), random_weights is not None, device, dtype, options, height, width,
                     num_timesteps, max_new_tokens, concurrency, max_batch, seed, record, date, json_, server_process,
                     replicas)
        return
    if workload is Kind.train:
        _train_bench(str(random_weights or model), random_weights is not None, height, width, max_tokens, repeat,
                     warmup, lora_rank, freeze, gradient_checkpointing, device, dtype, matmul_tflops, json_)
        return
    sets = list(compare or []) + list(more_sets or [])
    if more_sets and not compare:
        _fail(f"unexpected argument(s) {' '.join(more_sets)}: option sets follow --compare", json_)
    for text in sets:
        try:
            parse_option_set(text)
        except ValueError as e:
            _fail(f"--compare {text!r}: {e}", json_)

    load_options: dict[str, Any] = {}
    for key, value in (("quantize", quantize), ("offload", offload), ("compile", compile_), ("attention", attention)):
        if value is not None:
            load_options[key] = value
    if official_numerics:
        load_options["official_numerics"] = True
    if cache_dir:
        load_options["cache_dir"] = str(cache_dir)
    try:
        work = Workload(kind=workload.value, height=height, width=width, num_timesteps=num_timesteps,
                        cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                        cfg_interval=tuple(cfg_interval) if cfg_interval else None, timestep_shift=timestep_shift,
                        enable_taylorseer=taylorseer or None, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        seed=seed, prompt=prompt)
    except ValueError as e:
        _fail(str(e), json_)
    bc = BenchConfig(model=str(random_weights or model), workload=work, random_weights=random_weights is not None,
                     device=device, dtype=dtype, load_options=load_options, repeat=repeat, warmup=warmup,
                     compare=sets, matmul_tflops=matmul_tflops, bandwidth_gbs=bandwidth_gbs,
                     command=_command_line(ctx), date=date)

    def log(message: str) -> None:
        typer.echo(message, err=True)

    log(f"benchmarking {bc.model} ...")
    try:
        result = run_benchmark(bc, log=log)
    except (ValueError, OSError, TypeError) as e:  # bad model, bad option, bad size: the message says which
        _fail(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e), json_)
    if record is not None:
        path, table = report.record(result, record)
        log(f"recorded {path} and a row in {table}")
    if json_:
        print(json.dumps(json_safe(result)))
    else:
        typer.echo(report.format_text(result))
