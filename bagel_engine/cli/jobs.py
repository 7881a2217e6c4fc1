"""Single jobs from the shell: ``bagel generate``, ``bagel edit``, ``bagel understand``, ``bagel chat``.

This module also holds the options every command shares (the knobs under their official names,
the model, device and dtype, ``--json``), defined once as ``Annotated`` types; ``bagel batch``
reuses them. Every command calls the public API (``bagel_engine.load`` and the pipeline's task
methods) and nothing below it.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer

from bagel_engine import image_input
from bagel_engine import knobs as knob_table
from bagel_engine.cli.load_options import with_load_options, with_options
from bagel_engine.cli.main import app  # commands register on the one ``bagel`` app
from bagel_engine.params import EDIT_DEFAULTS, RENORM_TYPES, TEXT_TO_IMAGE_DEFAULTS, BagelInputError, ImageParams

# ----------------------------------------------------------------------------- shared options
RUN = "Model and output"
IMAGE = "Image knobs (official names)"
TEXT = "Text knobs"

Model = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="BAGEL_MODEL", show_envvar=True, rich_help_panel=RUN,
    help="Model directory in the official layout, a hub id such as ByteDance-Seed/BAGEL-7B-MoT, or bagel-shapes "
         "(the demo model shipped in the package: any CPU, 64x64).")]
Device = Annotated[Optional[str], typer.Option(
    "--device", rich_help_panel=RUN, help="cuda, cuda:1 or cpu. \\[default: cuda when available]")]
Dtype = Annotated[Optional[str], typer.Option(
    "--dtype", rich_help_panel=RUN, help="bfloat16, float16 or float32. \\[default: bfloat16 on a GPU, float32 on the CPU]")]
Json = Annotated[bool, typer.Option(
    "--json", rich_help_panel=RUN, help="Print one JSON object (output, text, seed, params, timings) instead of text.")]

RenormType = Enum("RenormType", {name: name for name in RENORM_TYPES}, type=str)


def _image_knob_options(defaults: dict[str, ImageParams]) -> SimpleNamespace:
    """The image knobs' options, their help showing the defaults of ``defaults`` ({command: params}):
    ``generate`` and ``edit`` each show their own, ``batch`` both."""

    def shown(name: str) -> str:
        values = {}
        for command, params in defaults.items():
            value = getattr(params, name)
            values[command] = " ".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
        if len(set(values.values())) == 1:
            return f"\\[default: {next(iter(values.values()))}]"
        return "\\[default: " + ", ".join(f"{v} {c}" for c, v in values.items()) + "]"

    return SimpleNamespace(
        cfg_text_scale=Annotated[Optional[float], typer.Option(
            "--cfg-text-scale", rich_help_panel=IMAGE, min=0.0,
            help=f"Text guidance: how strongly the image follows the prompt (official 4-8). {shown('cfg_text_scale')}")],
        cfg_img_scale=Annotated[Optional[float], typer.Option(
            "--cfg-img-scale", rich_help_panel=IMAGE, min=0.0,
            help=f"Image guidance: how much an edit keeps of the input image (official 1-2). {shown('cfg_img_scale')}")],
        cfg_interval=Annotated[Optional[tuple[float, float]], typer.Option(
            "--cfg-interval", metavar="LO HI", rich_help_panel=IMAGE,
            help=f"Apply guidance only for timesteps in [LO, HI]. {shown('cfg_interval')}")],
        cfg_renorm_type=Annotated[Optional[RenormType], typer.Option(
            "--cfg-renorm-type", rich_help_panel=IMAGE, case_sensitive=False,
            help=f"How the guided velocity is renormalized. {shown('cfg_renorm_type')}")],
        cfg_renorm_min=Annotated[Optional[float], typer.Option(
            "--cfg-renorm-min", rich_help_panel=IMAGE, min=0.0, max=1.0,
            help=f"Lower bound of the renorm factor; 0 cures blur, 1 turns renorm off. {shown('cfg_renorm_min')}")],
        timestep_shift=Annotated[Optional[float], typer.Option(
            "--timestep-shift", rich_help_panel=IMAGE,
            help=f"Shift of the schedule: higher spends more steps on layout, lower on detail. {shown('timestep_shift')}")],
        num_timesteps=Annotated[Optional[int], typer.Option(
            "--num-timesteps", rich_help_panel=IMAGE, min=2,
            help=f"Points of the schedule (N-1 denoising steps). {shown('num_timesteps')}")],
    )


# the official app's defaults; a model directory may carry its own (task_defaults.json: bagel-shapes does)
T2I_KNOBS = _image_knob_options({"generate": TEXT_TO_IMAGE_DEFAULTS})
EDIT_KNOBS = _image_knob_options({"edit": EDIT_DEFAULTS})
ANY_KNOBS = _image_knob_options({"t2i": TEXT_TO_IMAGE_DEFAULTS, "edit": EDIT_DEFAULTS})
NegativePrompt = Annotated[Optional[str], typer.Option(
    "--negative-prompt", rich_help_panel=IMAGE,
    help="What the picture should not show (conditions the text-unconditional guidance branch). \\[default: none]")]
GuidanceScale = Annotated[Optional[float], typer.Option(
    "--guidance-scale", rich_help_panel=IMAGE, min=0.0, help="diffusers' name of --cfg-text-scale (give one of them).")]
ImageGuidanceScale = Annotated[Optional[float], typer.Option(
    "--image-guidance-scale", rich_help_panel=IMAGE, min=0.0,
    help="diffusers' name of --cfg-img-scale (give one of them).")]
NumInferenceSteps = Annotated[Optional[int], typer.Option(
    "--num-inference-steps", rich_help_panel=IMAGE, min=1,
    help="diffusers' count of denoising steps: the same as --num-timesteps N+1 (give one of them).")]
_SIZE = ("in pixels: a multiple of the model's grid, up to its largest side (BAGEL-7B-MoT: multiples of 16 up to "
         "1024; bagel-shapes: of 8 up to 128; `bagel inspect MODEL` says). \\[default: the model's: 1024, bagel-shapes 64]")
Height = Annotated[Optional[int], typer.Option("--height", rich_help_panel=IMAGE, help=f"Output height {_SIZE}")]
Width = Annotated[Optional[int], typer.Option("--width", rich_help_panel=IMAGE, help=f"Output width {_SIZE}")]
Seed = Annotated[Optional[int], typer.Option(
    "--seed", rich_help_panel=RUN, min=0, max=2**32 - 1,
    help="Random seed; the same seed gives the same result. \\[default: a random one, reported]")]
Think = Annotated[Optional[bool], typer.Option(
    "--think/--no-think", rich_help_panel=TEXT, show_default=False,
    help="Plan in words first (<think> ... </think>); the think text is printed. \\[default: no-think]")]
MaxThinkTokens = Annotated[Optional[int], typer.Option(
    "--max-think-tokens", rich_help_panel=TEXT, min=1,
    help="Most tokens of think text (official max_think_token_n). \\[default: 1024]")]
MaxNewTokens = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "--max-think-tokens", rich_help_panel=TEXT, min=1,
    help="Most tokens of the answer, think text included. \\[default: 512]")]
DoSample = Annotated[Optional[bool], typer.Option(
    "--do-sample/--greedy", rich_help_panel=TEXT, show_default=False,
    help="Sample the text instead of greedy decoding. \\[default: greedy]")]
Temperature = Annotated[Optional[float], typer.Option(
    "--temperature", rich_help_panel=TEXT, help="Sampling temperature with --do-sample (official text_temperature). \\[default: 0.3]")]

KNOB_NAMES = tuple(knob_table.NAMES)  # the knobs' names and their aliases


def knob_values(values: dict[str, Any]) -> dict[str, Any]:
    """The knobs the user set, by API name, from a command's parameters (named as the API's)."""
    out = {k: (v.value if isinstance(v, Enum) else v) for k, v in values.items()
           if k in KNOB_NAMES and v is not None}
    if "cfg_interval" in out:
        out["cfg_interval"] = tuple(out["cfg_interval"])
    return out


# The knob options, declared once; a command names the groups it takes (``@with_knobs``) and receives the
# knobs the user set, by API name, as one ``knobs`` dict. The guidance knobs come from a table whose help shows
# one task's defaults (T2I_KNOBS, EDIT_KNOBS) or both (ANY_KNOBS).
GUIDANCE = ("cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min", "timestep_shift",
            "num_timesteps")


def guidance(table: SimpleNamespace, names: tuple[str, ...] = GUIDANCE, leave_out: tuple[str, ...] = ()) -> tuple:
    """The guidance knobs' options (of ``table``), ``leave_out`` left out (a suite without them)."""
    return tuple((name, getattr(table, name), None) for name in names if name not in leave_out)


DIFFUSERS_NAMES = (("negative_prompt", NegativePrompt, None), ("guidance_scale", GuidanceScale, None),
                   ("image_guidance_scale", ImageGuidanceScale, None), ("num_inference_steps", NumInferenceSteps, None))
THINK_TOKENS = (("max_think_token_n", MaxThinkTokens, None),)
ANSWER_TOKENS = (("max_new_tokens", MaxNewTokens, None),)
SAMPLING = (("do_sample", DoSample, None), ("text_temperature", Temperature, None))
IMAGE_RUN = (("height", Height, None), ("width", Width, None))


def with_knobs(*groups: tuple):
    """Give a command the knob options of ``groups``; it receives the ones set, by API name, as ``knobs``."""
    return with_options("knobs", tuple(option for group in groups for option in group), knob_values)


# ----------------------------------------------------------------------------- helpers
def fail(message: str, as_json: bool, code: int = 2) -> None:
    if as_json:
        print(json.dumps({"error": message}))
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def load_pipeline(model: str | None, device: str | None, dtype: str | None, as_json: bool, **options: Any):
    """``bagel_engine.load`` with a clear message for a missing or bad model."""
    if not model:
        fail("no model: pass --model DIR_OR_HUB_ID or set BAGEL_MODEL", as_json)
    import bagel_engine

    t0 = time.perf_counter()
    typer.echo(f"loading {model} ...", err=True)
    try:
        pipe = bagel_engine.load(model, device=device, dtype=dtype, progress=sys.stderr.isatty(), **options)
    except (ValueError, OSError) as e:  # BagelInputError and the loader's ConfigError are ValueErrors
        fail(f"cannot load model {model!r}: {e}", as_json)
    typer.echo(f"loaded in {time.perf_counter() - t0:.1f} s", err=True)
    return pipe


class StepBar:
    """A tqdm bar over denoising steps, fed by the API's ``callback(step, total)``."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def __call__(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def open_images(images: list[str], as_json: bool) -> list:
    """Decode the input images (paths, file:// / http(s):// / data: URLs) with a clear error."""
    out = []
    for i, value in enumerate(images, start=1):
        try:
            out.append(image_input.read_image(value, image_input.TRUSTED, f"image {i} {image_input.describe(value)!r}"))
        except BagelInputError as e:
            fail(str(e), as_json)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _helper_rank() -> bool:
    """A rank other than 0 of a process group (``--cfg-parallel-size`` under torchrun)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def run_task(task: str, pipe_args: tuple, values: dict[str, Any], *, model: str | None, device: str | None,
             dtype: str | None, output: Path | None, as_json: bool) -> None:
    """Load, call one task method, save or print the result."""
    try:
        knobs = knob_table.cli_knobs(knob_values(values) | (values.get("knobs") or {}), task)
    except BagelInputError as e:
        fail(str(e).replace("_", "-") if "given twice" in str(e) else str(e), as_json)
    pipe = load_pipeline(model, device, dtype, as_json, **(values.get("load_options") or {}))
    bar, streamed = None, False
    if _helper_rank():  # CFG-parallel: every rank runs the task, rank 0 alone shows and writes it
        try:
            getattr(pipe, knob_table.TASK_METHODS[task])(*pipe_args, **knobs)
        except BagelInputError:
            raise typer.Exit(2) from None  # rank 0 says why
        return
    if task in knob_table.IMAGE_TASKS:
        bar = StepBar("denoising")
        knobs["callback"] = bar
    elif not as_json and output is None:  # the answer (and think text) printed as the model writes it

        def show(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        knobs["on_text"], streamed = show, True
    t0 = time.perf_counter()
    try:
        out = getattr(pipe, knob_table.TASK_METHODS[task])(*pipe_args, **knobs)
    except BagelInputError as e:
        fail(str(e), as_json)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0

    written = None
    if task in knob_table.IMAGE_TASKS:
        from bagel_engine.batch.manifest import save_image
        from bagel_engine.image_metadata import describe

        path = output or Path(f"{'generate' if task == 't2i' else 'edit'}-{out.seed}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(out.image, path, describe(task, pipe_args[-1], out, model))
        written = str(path)
    elif output is not None:
        from bagel_engine.batch.manifest import atomic_write_bytes

        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output, ((out.text or "") + "\n").encode("utf-8"))
        written = str(output)

    if as_json:
        print(json.dumps({
            "task": task, "output": written, "text": out.text, "seed": out.seed,
            "size": list(out.image.size) if out.image is not None else None,
            "params": _plain(out.params), "timings": _plain(out.timings),
        }, ensure_ascii=False))
        return
    if task in knob_table.IMAGE_TASKS:
        if out.text:
            typer.secho("think:", bold=True)
            typer.echo(out.text.strip())
        w, h = out.image.size
        typer.echo(f"wrote {written} ({w}x{h}, seed {out.seed}, {elapsed:.1f} s)")
    elif streamed:
        typer.echo("")
    else:
        typer.echo(out.text or "")
        if written:
            typer.echo(f"wrote {written}", err=True)


# ----------------------------------------------------------------------------- commands
Output = Annotated[Optional[Path], typer.Option(
    "--output", "-o", rich_help_panel=RUN, help="Where to write the PNG. \\[default: generate-SEED.png]")]


@app.command(epilog="""
[bold]Examples[/bold]

  bagel generate "a red fox in the snow, watercolor" --model ByteDance-Seed/BAGEL-7B-MoT -o fox.png

  bagel generate "a poster for a jazz night" --think --seed 42 --height 768 --width 1024

  BAGEL_MODEL=/models/BAGEL-7B-MoT bagel generate "a cat" --num-timesteps 25 --json
""")
@with_load_options
@with_knobs(IMAGE_RUN, guidance(T2I_KNOBS), DIFFUSERS_NAMES, THINK_TOKENS, SAMPLING)
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.", show_default=False)],
    model: Model = None,
    output: Output = None,
    seed: Seed = None,
    think: Think = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """Text to image: draw PROMPT and write a PNG (with --think, print the plan first).

    The defaults shown are the official app's; a model directory may carry its own (task_defaults.json:
    bagel-shapes draws 64x64 in 25 steps)."""
    run_task("t2i", (prompt,), locals(), model=model, device=device, dtype=dtype, output=output, as_json=json_)


@app.command(epilog="""
[bold]Examples[/bold]

  bagel edit photo.jpg --prompt "make it night, with a full moon" -o night.png

  bagel edit person.png jacket.png --prompt "dress the person in this jacket" --seed 7

  bagel edit room.png -p "paint the walls green" --cfg-img-scale 1.5 --think --json
""")
@with_load_options
@with_knobs(guidance(EDIT_KNOBS), DIFFUSERS_NAMES, THINK_TOKENS, SAMPLING)
def edit(
    images: Annotated[list[str], typer.Argument(
        help="Input image(s): paths or http(s)/data URLs; the output has the last one's size.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The edit instruction.", show_default=False)],
    model: Model = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", rich_help_panel=RUN, help="Where to write the PNG. \\[default: edit-SEED.png]")] = None,
    seed: Seed = None,
    think: Think = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """Edit one or several images by an instruction and write a PNG.

    The defaults shown are the official app's for editing; a model directory may carry its own
    (task_defaults.json, as bagel-shapes does)."""
    pictures = open_images(images, json_)
    run_task("edit", (pictures, prompt), locals(), model=model, device=device, dtype=dtype, output=output,
             as_json=json_)


@app.command(epilog="""
[bold]Examples[/bold]

  bagel understand chart.png --prompt "What is the highest bar?"

  bagel understand a.png b.png -p "What changed between the two pictures?" --think

  bagel understand receipt.jpg -p "Total amount?" --json
""")
@with_load_options
@with_knobs(ANSWER_TOKENS, SAMPLING)
def understand(
    images: Annotated[list[str], typer.Argument(help="Input image(s): paths or http(s)/data URLs.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question.", show_default=False)],
    model: Model = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", rich_help_panel=RUN, help="Also write the answer to this text file.")] = None,
    seed: Seed = None,
    think: Think = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """Answer a question about one or several images (with --think, the reasoning comes first)."""
    pictures = open_images(images, json_)
    run_task("understand", (pictures, prompt), locals(), model=model, device=device, dtype=dtype, output=output,
             as_json=json_)


@app.command(epilog="""
[bold]Examples[/bold]

  bagel chat "Write a haiku about bagels."

  bagel chat "How many r's in strawberry?" --think --max-new-tokens 1024

  bagel chat "Name three colors." --do-sample --temperature 0.8 --seed 1 --json
""")
@with_load_options
@with_knobs(ANSWER_TOKENS, SAMPLING)
def chat(
    prompt: Annotated[str, typer.Argument(help="Your message.", show_default=False)],
    model: Model = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", rich_help_panel=RUN, help="Also write the answer to this text file.")] = None,
    seed: Seed = None,
    think: Think = None,
    device: Device = None,
    dtype: Dtype = None,
    load_options: Optional[dict] = None,
    knobs: Optional[dict] = None,
    json_: Json = False,
) -> None:
    """Text in, text out."""
    run_task("chat", (prompt,), locals(), model=model, device=device, dtype=dtype, output=output, as_json=json_)
