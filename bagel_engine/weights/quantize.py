"""Load-time quantization of the MoT decoder's linear layers (``load(..., quantize=...)``).

What is quantized: every ``nn.Linear`` inside ``language_model.model.layers.*``, both experts
(``self_attn.{q,k,v,o}_proj[_moe_gen]`` and ``mlp[_moe_gen].{gate,up,down}_proj``): 13.1 of the
14.7 billion parameters of BAGEL-7B-MoT. What is kept in the load dtype: the RMS norms, the
token embeddings and ``lm_head`` (the text logits are sensitive and the tables are looked up, not
multiplied), the glue (``vae2llm``/``llm2vae``: the velocity head, where quantization error goes
straight into the latent; the time embedder, the connector, the position tables), the SigLIP ViT
and the VAE. Biases stay in the load dtype too.

Methods:

* ``int8``: torchao int8 weight-only, one scale per output row. Runs everywhere (CPU included);
  activations stay in bf16/fp32, so the drift is small. Halves the decoder's weight memory.
* ``fp8``: torchao float8 (e4m3) dynamic activation + weight quantization, per-row scales on
  Hopper (compute capability 9.0), per-tensor on Ada (8.9). Needs a CUDA GPU of compute
  capability >= 8.9; uses the fp8 tensor cores, so it is also the fastest on an H100.
* ``nf4``: bitsandbytes 4-bit NormalFloat (block size 64, no double quantization, bf16 compute:
  the official app's NF4 mode). CUDA only here. A quarter of the bf16 weight memory, visible
  quality cost.

When the weights were loaded on the CPU (``offload=...``), fp8 and nf4 quantize each layer on the
GPU and move the result back to the CPU, where the offloader streams it from.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger("bagel_engine.quantize")

METHODS = ("fp8", "int8", "nf4")
PIP_EXTRA = "bagel-engine[quant]"
DECODER_LAYERS_PREFIX = "language_model.model.layers."
FP8_MIN_CAPABILITY = (8, 9)
NF4_BLOCKSIZE = 64


class QuantizationUnavailable(ValueError):
    """The requested quantization cannot run here: missing package or unsupported device. A
    ValueError, so front ends report it like any other bad load option."""


# ----------------------------------------------------------------------------- what gets quantized
def target_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every linear layer of the decoder layers, both experts, in
    their original or quantized form (bitsandbytes replaces the module class)."""
    for name, module in model.named_modules():
        if name.startswith(DECODER_LAYERS_PREFIX) and _is_linear(module):
            yield name, module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def is_quantized(module: nn.Module) -> bool:
    """True when a linear layer holds quantized weights (torchao tensor subclass or bitsandbytes)."""
    if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
        return True
    w = getattr(module, "weight", None)
    if w is None:
        return False
    return type(w.data) is not torch.Tensor or w.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)


def quantization_summary(model: nn.Module) -> dict:
    """Counts for reports and tests: quantized and plain linear layers inside and outside the decoder."""
    inside = [m for _, m in target_linears(model)]
    q_in = sum(is_quantized(m) for m in inside)
    others = [m for n, m in model.named_modules() if _is_linear(m) and not n.startswith(DECODER_LAYERS_PREFIX)]
    return {
        "method": getattr(model, "quantization", None),
        "decoder_linears": len(inside),
        "decoder_quantized": q_in,
        "other_linears": len(others),
        "other_quantized": sum(is_quantized(m) for m in others),
    }


# ----------------------------------------------------------------------------- checks
def _cuda_capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def check_supported(method: str) -> None:
    """Raise ``QuantizationUnavailable`` (with what to do) when ``method`` cannot run on this machine."""
    if method not in METHODS:
        raise ValueError(f"unknown quantize {method!r}; choose one of {', '.join(METHODS)}")
    cap = _cuda_capability()
    if method == "fp8":
        if cap is None:
            raise QuantizationUnavailable(
                "quantize='fp8' needs a CUDA GPU with float8 tensor cores (compute capability >= 8.9: "
                "Ada such as L4/L40/RTX 4090, or Hopper such as H100/H200); no CUDA device is available. "
                "Use quantize='int8' instead: it runs on any GPU and on the CPU."
            )
        if cap < FP8_MIN_CAPABILITY:
            raise QuantizationUnavailable(
                f"quantize='fp8' needs compute capability >= 8.9 (Ada or Hopper); this GPU "
                f"({torch.cuda.get_device_name()}) has {cap[0]}.{cap[1]}. Use quantize='int8' or 'nf4' instead."
            )
        _import_torchao()
    elif method == "nf4":
        if cap is None:
            raise QuantizationUnavailable(
                "quantize='nf4' (bitsandbytes 4-bit) is supported on CUDA GPUs only and no CUDA device is "
                "available. Use quantize='int8' on the CPU."
            )
        _import_bitsandbytes()
    else:
        _import_torchao()


@contextlib.contextmanager
def _quiet(*loggers: str):
    """torchao logs a warning per optional C++ extension it cannot load (built for another torch);
    none of them is used here."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _import_torchao():
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            import torchao  # noqa: F401
            import torchao.quantization as tq
    except ImportError as e:
        raise QuantizationUnavailable(
            f"quantization needs the torchao package ({e}); install it with `pip install '{PIP_EXTRA}'`"
        ) from e
    return tq


def _import_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise QuantizationUnavailable(
            f"quantize='nf4' needs the bitsandbytes package ({e}); install it with `pip install '{PIP_EXTRA}'`"
        ) from e
    return bnb


# ----------------------------------------------------------------------------- quantize
@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> None:
    """Quantize the decoder's linear layers of ``model`` (a ``Bagel``) in place with ``method``
    ("int8", "fp8" or "nf4"); everything else keeps its dtype. Raises ``QuantizationUnavailable``
    when the method cannot run here (no suitable GPU, missing package: ``pip install 'bagel-engine[quant]'``)."""
    check_supported(method)
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization})")
    layers = model.language_model.model.layers
    cuda = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    count = 0
    for layer in layers:
        targets = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear) and not is_quantized(m)]
        if not targets:
            continue
        home = targets[0][1].weight.device
        # Quantize on the GPU when there is one (fast; fp8/nf4 need it), then go back home.
        work = cuda if (cuda is not None and home.type == "cpu") else home
        if method == "int8" and home.type == "cpu" and work != home and not _fits_on(work, layer):
            work = home
        for name, lin in targets:
            new = _quantize_linear(lin, method, work)
            if new is not lin or work != home:
                _set_module(layer, name, _to_device(new, home))
            count += 1
    model.quantization = method
    if cuda is not None:
        torch.cuda.empty_cache()
    log.info("quantized %d decoder linear layers to %s", count, method)


def _fits_on(device: torch.device, layer: nn.Module) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(p.numel() * p.element_size() for p in layer.parameters())
    return free > 2 * need


def _quantize_linear(lin: nn.Linear, method: str, device: torch.device) -> nn.Module:
    if lin.weight.device != device:
        lin = lin.to(device)
    if method == "nf4":
        return _nf4_linear(lin, device)
    tq = _import_torchao()
    if method == "int8":
        config = tq.Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        gran = tq.PerRow() if (torch.cuda.get_device_capability(device) >= (9, 0)
                                and lin.weight.dtype == torch.bfloat16) else tq.PerTensor()
        config = tq.Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False)
    with _quiet("torchao"):
        tq.quantize_(lin, config)
    return lin


def _nf4_linear(lin: nn.Linear, device: torch.device) -> nn.Module:
    bnb = _import_bitsandbytes()
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data.to(torch.bfloat16), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                 compress_statistics=False, quant_type="nf4", module=q).to(device)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.to(device), requires_grad=False)
    return q.eval().requires_grad_(False)


def _to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """Move a (possibly quantized) linear layer, parameter by parameter."""
    from bagel_engine.weights.offload import move_param

    for name, p in list(module._parameters.items()):
        if p is not None and p.device != device:
            module._parameters[name] = move_param(p, device)
    return module


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)
