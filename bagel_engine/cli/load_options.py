"""Options of how the model is loaded, shared by every command that loads one (single jobs, batch,
serve, ui, bench): quantization, offload, compilation, attention backend, official numerics."""

from __future__ import annotations

import functools
import inspect
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from bagel_engine.api import OFFLOAD_MODES, QUANTIZE_METHODS
from bagel_engine.model.attention import BACKENDS
from bagel_engine.weights.loader import parse_dtype

PANEL = "Memory and speed"

QuantizeMethod = Enum("QuantizeMethod", {m: m for m in QUANTIZE_METHODS}, type=str)
OffloadMode = Enum("OffloadMode", {m: m for m in OFFLOAD_MODES}, type=str)
AttentionBackend = Enum("AttentionBackend", {b: b for b in BACKENDS}, type=str)

Quantize = Annotated[Optional[QuantizeMethod], typer.Option(
    "--quantize", rich_help_panel=PANEL, case_sensitive=False,
    help="Quantize the decoder's linear layers at load time: int8 (anywhere), fp8 (Ada/Hopper GPUs), "
         "nf4 (GPU, bitsandbytes). Needs `pip install bagel-engine\\[quant]`. See docs/memory.md.")]
Offload = Annotated[Optional[OffloadMode], typer.Option(
    "--offload", rich_help_panel=PANEL, case_sensitive=False,
    help="Keep the weights in CPU memory and stream them to the GPU: model (one expert resident, ~24 GB "
         "cards) or layer (layer by layer, ~12 GB cards). Same results, slower.")]
Compile = Annotated[bool, typer.Option(
    "--compile/--no-compile", rich_help_panel=PANEL,
    help="torch.compile the denoising and decoding steps (slow first call).")]
Attention = Annotated[AttentionBackend, typer.Option(
    "--attention", rich_help_panel=PANEL, case_sensitive=False, help="Attention backend.")]
Lora = Annotated[Optional[list[str]], typer.Option(
    "--lora", rich_help_panel=PANEL, metavar="ADAPTER",
    help="Merge a LoRA adapter at load: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), "
         "a `bagel train` checkpoint folder or an older lora_adapter.safetensors (repeat for several).")]
LoraStrength = Annotated[float, typer.Option(
    "--lora-strength", rich_help_panel=PANEL, help="Scale of the LoRA updates (1: as trained).")]
VaeTiling = Annotated[bool, typer.Option(
    "--vae-tiling", rich_help_panel=PANEL,
    help="Encode and decode images above 256 px a side (BAGEL-7B-MoT) in overlapping tiles: a lower VAE memory "
         "peak at high resolution, close to but not the untiled result (docs/memory.md).")]
CfgParallelSize = Annotated[Optional[int], typer.Option(
    "--cfg-parallel-size", rich_help_panel=PANEL, min=2, max=3, metavar="N",
    help="Run each step's guidance branches on N processes, one branch each (2: text guidance; 3: an edit's text "
         "and image guidance): torchrun --nproc-per-node N --no-python bagel ...; rank 0 writes the output.")]
TensorParallelSize = Annotated[Optional[int], typer.Option(
    "--tensor-parallel-size", rich_help_panel=PANEL, min=2, metavar="N",
    help="Split every layer's heads and MLP columns (decoder, ViT, connector) over N processes: torchrun "
         "--nproc-per-node N --no-python bagel ...; with --cfg-parallel-size C, C x N processes. Each rank holds "
         "1/N of the layers and of the KV cache; rank 0 writes the output.")]
VaePatchParallelSize = Annotated[Optional[int], typer.Option(
    "--vae-patch-parallel-size", rich_help_panel=PANEL, min=2, metavar="N",
    help="Turn VAE tiling on and spread the tiles of input images and results over N processes: every process of "
         "--cfg-parallel-size x --tensor-parallel-size, or alone torchrun --nproc-per-node N.")]
ShardWeights = Annotated[bool, typer.Option(
    "--shard-weights", rich_help_panel=PANEL,
    help="Under torchrun: shard the decoder layers' weights over the processes (FSDP style, gathered layer by layer "
         "as they run): cards too small for the model hold it together; every forward moves the layers' weights "
         "between them.")]
Devices = Annotated[Optional[str], typer.Option(
    "--devices", rich_help_panel=PANEL, metavar="LIST",
    help="Split the decoder's layers over these devices of one process (0,1 = cuda:0 and cuda:1; the official app's "
         "multi-GPU mode): a model larger than one card, no torchrun; the cards run one after the other.")]
LayerSplit = Annotated[Optional[str], typer.Option(
    "--layer-split", rich_help_panel=PANEL, metavar="COUNTS",
    help="With --devices: the decoder layers each device holds, e.g. 12,16. \\[default: even, the first device fewer]")]
MaxMemory = Annotated[Optional[str], typer.Option(
    "--max-memory", rich_help_panel=PANEL, metavar="SIZES",
    help="With --devices: the weights each device may hold, e.g. 24GB (every device) or 20GB,24GB; the layers fill "
         "them in order, the first device holding the rest of the model too (device_map=\"auto\" with max_memory, "
         "as the official app). Leave room for the KV cache and activations.")]
OfficialNumerics = Annotated[bool, typer.Option(
    "--official-numerics", rich_help_panel=PANEL,
    help="Keep the VAE and the Euler update on the CPU in float32, exactly as the official app does.")]


WeightsFile = Annotated[Optional[str], typer.Option(
    "--weights-file", rich_help_panel=PANEL, metavar="FILE",
    help="The decoder's weight file in the model directory (or a path), or a *.safetensors.index.json of "
         "shards. \\[default: ema.safetensors, else model_bf16.safetensors, model.safetensors, one index, "
         "or the only other *.safetensors]")]
BaseConfig = Annotated[Optional[str], typer.Option(
    "--base-config", rich_help_panel=PANEL, metavar="MODEL",
    help="Where configs, tokenizer and ae.safetensors missing from the model directory come from: a "
         "directory, a hub id (ByteDance-Seed/BAGEL-7B-MoT: its small files only) or bagel-7b-mot (the real "
         "model's configs, shipped).")]
TaskDefaultsFile = Annotated[Optional[Path], typer.Option(
    "--task-defaults", rich_help_panel=PANEL, metavar="JSON",
    help="Per-task defaults for this checkpoint, as a model directory's task_defaults.json holds them "
         '({"t2i": {"cfg_text_scale": 4.0, ...}, "edit": {...}}); replaces that file.')]


# the options that run one model over several processes (every rank must run the same requests)
PARALLEL_OPTIONS = ("cfg_parallel_size", "tensor_parallel_size", "vae_patch_parallel_size", "shard_weights")

HUB_PANEL = "Hub"
Revision = Annotated[Optional[str], typer.Option(
    "--revision", rich_help_panel=HUB_PANEL, metavar="REV",
    help="The hub model's branch, tag or commit (also written MODEL@REV). \\[default: main]")]
CacheDir = Annotated[Optional[Path], typer.Option(
    "--cache-dir", rich_help_panel=HUB_PANEL, metavar="DIR",
    help="Where hub downloads are kept. \\[default: the hub client's, HF_HUB_CACHE or ~/.cache/huggingface/hub]")]
Token = Annotated[Optional[str], typer.Option(
    "--token", rich_help_panel=HUB_PANEL, metavar="TOKEN",
    help="A hub token for private or gated models. Prefer HF_TOKEN or `hf auth login`: a token on the command "
         "line shows in the process list. \\[default: HF_TOKEN, else the saved login]")]
HUB_KEYS = ("revision", "cache_dir", "token")


def hub_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """The hub options a command's parameters set (``revision``, ``cache_dir``, ``token``)."""
    return {k: str(values[k]) for k in HUB_KEYS if values.get(k) is not None}


def load_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """The ``bagel_engine.load`` keyword arguments a command's parameters ask for (non-defaults only)."""
    out: dict[str, Any] = {}
    for name in ("quantize", "offload"):
        value = values.get(name)
        if value is not None:
            out[name] = value.value if isinstance(value, Enum) else value
    if values.get("compile"):
        out["compile"] = True
    attention = values.get("attention")
    if attention is not None:
        attention = attention.value if isinstance(attention, Enum) else attention
        if attention != "auto":
            out["attention"] = attention
    for name in PARALLEL_OPTIONS[:3]:  # the sizes
        if values.get(name):
            out[name] = int(values[name])
    for name in ("official_numerics", "vae_tiling", "shard_weights"):
        if values.get(name):
            out[name] = True
    for name in ("weights_file", "base_config", "task_defaults", "devices", "max_memory"):
        if values.get(name) is not None:
            out[name] = str(values[name])
    if values.get("layer_split"):
        try:
            out["layer_split"] = [int(x) for x in str(values["layer_split"]).split(",")]
        except ValueError:
            raise typer.BadParameter(f"{values['layer_split']!r}: counts such as 12,16", param_hint="--layer-split")
    out.update(hub_kwargs(values))
    if values.get("lora"):
        out["lora"] = list(values["lora"])
        strength = values.get("lora_strength")
        if strength is not None and strength != 1.0:
            out["lora_strength"] = float(strength)
    return out


# The load options, declared once: (parameter name, option, default). Every command that loads a model
# gets them through ``@with_load_options`` and receives them as one ``load_options`` dict.
LOAD_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("quantize", Quantize, None),
    ("offload", Offload, None),
    ("compile", Compile, False),
    ("attention", Attention, "auto"),
    ("official_numerics", OfficialNumerics, False),
    ("vae_tiling", VaeTiling, False),
    ("cfg_parallel_size", CfgParallelSize, None),
    ("tensor_parallel_size", TensorParallelSize, None),
    ("vae_patch_parallel_size", VaePatchParallelSize, None),
    ("shard_weights", ShardWeights, False),
    ("devices", Devices, None),
    ("layer_split", LayerSplit, None),
    ("max_memory", MaxMemory, None),
    ("lora", Lora, None),
    ("lora_strength", LoraStrength, 1.0),
    ("weights_file", WeightsFile, None),
    ("base_config", BaseConfig, None),
    ("task_defaults", TaskDefaultsFile, None),
    ("revision", Revision, None),
    ("cache_dir", CacheDir, None),
    ("token", Token, None),
)


def load_flags(load_options: dict[str, Any]) -> list[str]:
    """The command-line flags that ask for ``load_options`` (what :func:`load_kwargs` gives): to start another
    ``bagel`` command (a server process) with the same loading."""
    flags: list[str] = []
    for name, value in load_options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif name == "layer_split":  # one option, counts joined
            flags += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, (list, tuple)):
            for v in value:
                flags += [flag, str(v)]
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


def refuse_parallel(load_options: dict, command: str, why: str) -> None:
    """Stop a command whose ranks cannot all run the same requests when it is given --cfg-parallel-size or
    --tensor-parallel-size."""
    for name in PARALLEL_OPTIONS:
        if load_options.get(name):
            flag = "--" + name.replace("_", "-")
            typer.secho(f"error: {flag} does not run with {command}: {why}", fg="red", err=True)
            raise typer.Exit(2)


def with_options(param: str, options: tuple[tuple[str, Any, Any], ...], collect, *, into: bool = False):
    """A decorator giving a command the ``options`` ((parameter name, option, default), declared once) as
    command-line options; the command receives ``collect({name: value})`` as its parameter ``param``.
    ``into=True``: ``param`` stays a command-line option of its own and the command receives
    ``collect({name: value}, param's value)`` (a flag that sets another option: ``--fp32``).
    Apply it under ``@app.command``; several stack."""

    def decorate(command):
        hints = typing.get_type_hints(command, include_extras=True)
        signature = inspect.signature(command)
        if param not in signature.parameters:
            raise TypeError(f"{command.__name__} must take a {param} parameter")
        kept = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
                if into or p.name != param]
        clash = {p.name for p in kept} & {name for name, _, _ in options}
        if clash:
            raise TypeError(f"{command.__name__} declares {', '.join(sorted(clash))} itself and through {param}")
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=option)
                 for name, option, default in options]

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            values = {name: kwargs.pop(name, default) for name, _, default in options}
            if into:
                return command(*args, **{**kwargs, param: collect(values, kwargs.get(param))})
            return command(*args, **{param: collect(values)}, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
                  else p for p in kept]
        wrapper.__signature__ = signature.replace(parameters=[*params, *added])
        wrapper.__annotations__ = {p.name: p.annotation for p in kept} | {name: option for name, option, _ in options}
        del wrapper.__wrapped__  # typer reads the signature above, not the command's
        return wrapper

    return decorate


FP32_OPTION = Annotated[bool, typer.Option(
    "--fp32", rich_help_panel="Model and output", help="The maintainers' setting for the published scores: float32 weights and "
                                          "compute (the same as --dtype float32).")]


def _fp32_into_dtype(values: dict, dtype: str | None) -> str | None:
    if not values["fp32"]:
        return dtype
    if dtype is not None and parse_dtype(dtype) != torch.float32:
        raise typer.BadParameter(f"--fp32 asks for float32 and --dtype for {dtype}: give one", param_hint="--fp32")
    return "float32"


def with_fp32(command):
    """Give ``command`` (which takes ``dtype``) the ``--fp32`` flag: ``--dtype float32`` in the words of the
    official evaluation instructions."""
    return with_options("dtype", (("fp32", FP32_OPTION, False),), _fp32_into_dtype, into=True)(command)


def with_load_options(command):
    """Give ``command`` the load options (``LOAD_OPTIONS``) as command-line options; it receives the
    ``bagel_engine.load`` keyword arguments they ask for (non-defaults only) as ``load_options``.
    Apply it under ``@app.command``."""
    return with_options("load_options", LOAD_OPTIONS, load_kwargs)(command)
