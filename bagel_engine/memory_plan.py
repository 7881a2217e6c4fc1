"""What fits on a GPU: weight, KV-cache, activation and VAE memory of BAGEL for each memory option
(``quantize`` x ``offload``), and which options a card of a given size needs
(``bagel inspect MODEL --plan --gpu-memory 24GB``).

Everything is computed from the configs (no weights are read):

* weights: every tensor of ``ema.safetensors`` / ``ae.safetensors`` from
  ``weights.loader.expected_tensors``, in bf16, with the decoder layers' linear weights at the
  quantized size (int8: 1 byte + a bf16 scale per row; fp8: 1 byte + an fp32 scale per row; nf4:
  half a byte + an fp32 absmax per 64 weights). The VAE runs in bf16 on a GPU.
* offload: "model" keeps one expert of the decoder layers resident plus two layers of the other
  (the one in use and the one being prefetched); "layer" keeps two layers of both experts. The
  rest (embeddings, lm_head, ViT, glue, norms) is always on the GPU. The decoder weights then live
  in pinned host memory.
* KV cache: ``2 (K, V) x layers x kv_heads x head_dim x 2 bytes`` per token (56 KiB for BAGEL-7B)
  for the three contexts of an edit at the requested size (text + VAE + ViT tokens; the
  text-guidance context repeats the images, the image-guidance one holds the text only): the
  largest request of a size.
* activations: the largest forward, one denoising step of the three guidance branches batched
  (``3 x (latent tokens + 2)`` rows): ``rows x (3 x intermediate + 5 x hidden) x 2 bytes`` (the
  MLP's gate/up/product and the hidden-size temporaries: measured with ``PeakTracker`` on a
  full-width layer), plus the attention mask; assumes a memory-efficient attention kernel
  (flash-attn or SDPA's), no score matrix.
* VAE decode: the full-resolution stage of the FLUX decoder, ``4 x 2 ch x H x W x 2 bytes``
  (matches the measured peak).
* overhead: 1 GiB (CUDA context, cuBLAS workspaces) + 5% of the rest (allocator fragmentation).
* tensor parallel over N cards (``--gpus N``): per card, the decoder layers' and the ViT's weights, the KV
  cache and the MLP temporaries divided by N; the embeddings, ``lm_head``, the glue, the hidden-size
  temporaries and the VAE whole (``weights.tensor_parallel``). Listed after the one-card options of the same
  quantization, and before offload: a lossless split over fast links beats streaming weights.

The decoder step and the VAE decode do not overlap, so the peak is weights + KV + the larger of
the two. Estimates, not measurements: ``docs/memory.md`` compares them with measured peaks.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field

from bagel_engine.weights.config import ModelConfig
from bagel_engine.weights.sizes import fmt_bytes, parse_size
from bagel_engine.weights.loader import AE_FILE, MODEL_FILE, expected_tensors

GiB = 1024**3
GB = 1e9
CUDA_OVERHEAD = 1 * GiB
FRAGMENTATION = 0.05
TEXT_TOKENS = 256  # prompt budget of a request (the think text adds max_think_token_n)
NF4_BLOCK = 64

# (label, quantize, offload): recommended in this order, the first that fits.
# Lossless (bf16) before lossy, then faster before slower: "model" offload streams one expert per
# denoising step (hidden behind the compute of the three guidance branches on most GPUs) and keeps
# the understanding expert resident while text is decoded; "layer" streams everything, which costs
# little for images on a slow GPU but a full decoder copy per generated text token.
OPTIONS: list[tuple[str, str | None, str | None]] = [
    ("bf16", None, None),
    ("offload=model", None, "model"),
    ("int8", "int8", None),
    ("fp8", "fp8", None),
    ("int8 + offload=model", "int8", "model"),
    ("offload=layer", None, "layer"),
    ("int8 + offload=layer", "int8", "layer"),
    ("nf4", "nf4", None),
    ("nf4 + offload=model", "nf4", "model"),
    ("nf4 + offload=layer", "nf4", "layer"),
]

NOTES = {
    None: "reference quality",
    "int8": "near-lossless, any GPU",
    "fp8": "near-lossless, Ada/Hopper only, fastest",
    "nf4": "4-bit: visible quality cost, CUDA only",
    "model": "streams one expert per step",
    "layer": "streams every layer: slow text decoding",
}

_LINEAR = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj(_moe_gen)?|mlp(_moe_gen)?\.\w+_proj)\.weight$")
_LINEAR_GEN = re.compile(r"(_moe_gen\.|mlp_moe_gen\.)")


# ----------------------------------------------------------------------------- weights
@functools.lru_cache(maxsize=8)
def _expected(cfg: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    return expected_tensors(cfg)


def _quantized_bytes(shape: tuple[int, ...], method: str | None, dtype_bytes: int) -> float:
    n = math.prod(shape)
    rows = shape[0]
    if method is None:
        return n * dtype_bytes
    if method == "int8":
        return n + rows * dtype_bytes
    if method == "fp8":
        return n + rows * 4
    if method == "nf4":
        return n / 2 + math.ceil(n / NF4_BLOCK) * 4
    raise ValueError(f"unknown quantize {method!r}")


def weight_bytes(cfg: ModelConfig, quantize: str | None = None, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes per part: ``und`` / ``gen`` (each expert's linear layers in the decoder layers, the
    quantized part), ``small`` (embeddings, lm_head, norms, ViT, glue), ``vae``; plus the counts
    ``embeddings``, ``lm_head``, ``vit`` for reports."""
    expected = _expected(cfg)
    out = {"und": 0.0, "gen": 0.0, "small": 0.0, "vae": 0.0, "embeddings": 0.0, "lm_head": 0.0, "vit": 0.0}
    for name, shape in expected[MODEL_FILE].items():
        if _LINEAR.match(name):
            out["gen" if _LINEAR_GEN.search(name) else "und"] += _quantized_bytes(shape, quantize, dtype_bytes)
            continue
        b = math.prod(shape) * dtype_bytes
        if name.startswith("language_model.model.layers.") and ("_proj" in name):  # biases ride with the expert
            out["gen" if "_moe_gen" in name else "und"] += b
            continue
        out["small"] += b
        if name.startswith("language_model.model.embed_tokens"):
            out["embeddings"] += b
        elif name.startswith("language_model.lm_head"):
            out["lm_head"] += b
        elif name.startswith("vit_model."):
            out["vit"] += b
    out["vae"] = sum(math.prod(s) for s in expected[AE_FILE].values()) * 2.0
    return out


def parameter_count(cfg: ModelConfig) -> int:
    return sum(math.prod(s) for s in _expected(cfg)[MODEL_FILE].values())


# ----------------------------------------------------------------------------- tokens and activations
def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    llm = cfg.llm
    return 2 * llm.num_hidden_layers * llm.num_key_value_heads * llm.head_dim * dtype_bytes


def _resize(h: int, w: int, transform: tuple[int, int, int]) -> tuple[int, int]:
    """(height, width) after the official ImageTransform (the engine's own resize rule)."""
    from bagel_engine.runtime.image_transforms import resize_size

    rw, rh = resize_size(w, h, *transform)
    return rh, rw


def context_tokens(cfg: ModelConfig, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> dict[str, int]:
    """Tokens of an edit of an image of this size: its VAE and ViT chunks, and the three contexts."""
    vh, vw = _resize(height, width, cfg.bagel.vae_transform)
    ih, iw = _resize(vh, vw, cfg.bagel.vit_transform)
    p = cfg.vit.patch_size
    vae = (vh // cfg.latent_downsample) * (vw // cfg.latent_downsample) + 2
    vit = (ih // p) * (iw // p) + 2
    return {"vae_image": vae, "vit_image": vit, "text": text_tokens,
            "gen": vae + vit + text_tokens, "cfg_text": vae + vit, "cfg_img": text_tokens,
            "latent": (height // cfg.latent_downsample) * (width // cfg.latent_downsample)}


def step_activation_bytes(cfg: ModelConfig, rows: int, context: int, act_bytes: int = 2,
                          tensor_parallel: int = 1) -> float:
    """Peak temporaries of one decoder forward of ``rows`` query rows over ``context`` cached keys."""
    llm = cfg.llm
    # measured, see docs/memory.md; a tensor-parallel rank holds 1/N of the MLP columns
    per_row = (3 * llm.intermediate_size / tensor_parallel + 5 * llm.hidden_size) * act_bytes
    mask = rows * (context + rows)  # bool mask of the SDPA path
    return rows * per_row + mask


def vae_decode_bytes(cfg: ModelConfig, height: int, width: int, act_bytes: int = 2) -> float:
    """Peak temporaries of the FLUX decoder at the output size: the upsampled input of the last level
    (``ch x ch_mult[1]`` channels at full resolution), its conv output and the first resnet's
    normalised copies."""
    vae = cfg.vae
    ch = vae.ch * (vae.ch_mult[1] if len(vae.ch_mult) > 1 else vae.ch_mult[0])
    return 4 * ch * height * width * act_bytes


# ----------------------------------------------------------------------------- estimates
@dataclass
class Estimate:
    label: str
    quantize: str | None
    offload: str | None
    weights_gpu: float  # bytes of weights on the GPU at the peak
    kv_cache: float
    activations: float  # the larger of the denoising step and the VAE decode
    overhead: float
    total: float
    host_pinned: float  # decoder weights kept in host memory (offload)
    fits: bool | None = None
    note: str = ""
    tensor_parallel: int = 1  # cards the layers are split over (the figures are per card)
    split: int = 1  # cards one process splits the layers over (``--devices``; the figures are the fullest card's)

    def as_dict(self) -> dict:
        return asdict(self)


def estimate(cfg: ModelConfig, height: int = 1024, width: int = 1024, *, quantize: str | None = None,
             offload: str | None = None, label: str | None = None, text_tokens: int = TEXT_TOKENS,
             think_tokens: int = 0, batch: int = 1, branches: int = 3, tensor_parallel: int = 1,
             split: int = 1) -> Estimate:
    """Peak GPU memory (per card, with ``tensor_parallel`` > 1; on the fullest card, with the layers ``split`` over
    several cards of one process) of generating or editing a ``height x width`` image with these options."""
    tp = tensor_parallel
    if (tp > 1 or split > 1) and offload is not None:
        raise ValueError("offload does not run with tensor parallel or a layer split")
    if split > 1:
        return _split_estimate(cfg, height, width, quantize, label, text_tokens, think_tokens, batch, branches, split)
    w = weight_bytes(cfg, quantize)
    layers = cfg.llm.num_hidden_layers
    per_layer = {e: w[e] / layers for e in ("und", "gen")}
    if offload is None:
        decoder_gpu, host = (w["und"] + w["gen"]) / tp, 0.0
    elif offload == "model":
        decoder_gpu, host = max(w["und"], w["gen"]) + 2 * max(per_layer.values()), w["und"] + w["gen"]
    elif offload == "layer":
        decoder_gpu, host = 2 * (per_layer["und"] + per_layer["gen"]), w["und"] + w["gen"]
    else:
        raise ValueError(f"unknown offload {offload!r}")
    weights_gpu = decoder_gpu + w["small"] - w["vit"] * (1 - 1 / tp) + w["vae"]
    tok = context_tokens(cfg, height, width, text_tokens + think_tokens)
    kv = batch * (tok["gen"] + tok["cfg_text"] + tok["cfg_img"]) * kv_bytes_per_token(cfg) / tp
    rows = batch * branches * (tok["latent"] + 2)
    step = step_activation_bytes(cfg, rows, tok["gen"], tensor_parallel=tp)
    if quantize in ("int8", "nf4"):  # a dequantized copy of the largest weight during each matmul
        step += cfg.llm.hidden_size * cfg.llm.intermediate_size * 2 / tp
    act = max(step, vae_decode_bytes(cfg, height, width))
    subtotal = weights_gpu + kv + act
    overhead = CUDA_OVERHEAD + FRAGMENTATION * subtotal
    label = label or next((lbl for lbl, q, o in OPTIONS if q == quantize and o == offload), f"{quantize}/{offload}")
    note = "; ".join(NOTES[k] for k in (quantize, offload) if k is not None) or NOTES[None]
    if tp > 1:
        note += f"; per card, layers split over {tp}"
    return Estimate(label, quantize, offload, weights_gpu, kv, act, overhead, subtotal + overhead, host, note=note,
                    tensor_parallel=tp)


def _split_estimate(cfg: ModelConfig, height: int, width: int, quantize: str | None, label: str | None,
                    text_tokens: int, think_tokens: int, batch: int, branches: int, cards: int) -> Estimate:
    """The layers split over ``cards`` of one process (``weights.layer_split``): the first card holds the rest of
    the model and does the VAE decode; each card its layers' weights and KV cache and one layer's temporaries."""
    from bagel_engine.weights.layer_split import layer_counts

    whole = estimate(cfg, height, width, quantize=quantize, text_tokens=text_tokens, think_tokens=think_tokens,
                     batch=batch, branches=branches)
    w = weight_bytes(cfg, quantize)
    layers = cfg.llm.num_hidden_layers
    per_layer = (w["und"] + w["gen"]) / layers
    tok = context_tokens(cfg, height, width, text_tokens + think_tokens)
    rows = batch * branches * (tok["latent"] + 2)
    step = step_activation_bytes(cfg, rows, tok["gen"])
    if quantize in ("int8", "nf4"):
        step += cfg.llm.hidden_size * cfg.llm.intermediate_size * 2
    best = None
    for i, count in enumerate(layer_counts(layers, cards)):
        weights = per_layer * count + (w["small"] + w["vae"] if i == 0 else 0.0)
        kv = whole.kv_cache * count / layers
        act = max(step, vae_decode_bytes(cfg, height, width)) if i == 0 else step
        subtotal = weights + kv + act
        total = subtotal + CUDA_OVERHEAD + FRAGMENTATION * subtotal
        if best is None or total > best.total:
            best = Estimate(label or f"{whole.label} + split={cards}", quantize, None, weights, kv, act,
                            total - subtotal, total, 0.0, note=f"{whole.note}; the fullest of {cards} cards, one process",
                            split=cards)
    return best


@dataclass
class Plan:
    model: str
    height: int
    width: int
    gpu_memory: int | None
    parameters: int
    weights: dict[str, float]  # bf16 bytes per part
    kv_bytes_per_token: int
    tokens: dict[str, int]
    options: list[Estimate] = field(default_factory=list)
    recommended: Estimate | None = None
    gpus: int = 1

    def as_dict(self) -> dict:
        d = asdict(self)
        r = self.recommended
        d["recommended"] = None if r is None else r.label
        d["recommended_options"] = None if r is None else {
            "quantize": r.quantize, "offload": r.offload, "tensor_parallel_size": r.tensor_parallel,
            "devices": r.split}
        return d


def tensor_parallel_size(cfg: ModelConfig, gpus: int) -> int:
    """The most cards (at most ``gpus``) the model's heads, KV heads and widths split over evenly."""
    llm, vit = cfg.llm, cfg.vit
    counts = (llm.num_attention_heads, llm.num_key_value_heads, llm.intermediate_size, vit.num_attention_heads,
              vit.intermediate_size, llm.hidden_size)
    return max(n for n in range(1, max(1, gpus) + 1) if all(c % n == 0 for c in counts))


def _with_tensor_parallel(options: list[tuple[str, str | None, str | None]], tp: int, gpus: int = 1) -> list[tuple]:
    """``options`` as (label, quantize, offload, tp, split): each quantization's tensor-parallel row, then its layer
    split over the cards of one process, right after its one-card row, ahead of every offload row."""
    out = []
    for label, q, o in options:
        out.append((label, q, o, 1, 1))
        if o is None and tp > 1:
            out.append((f"{label} + tp={tp}", q, None, tp, 1))
        if o is None and gpus > 1:
            out.append((f"{label} + split={gpus}", q, None, 1, gpus))
    return out


def plan(cfg: ModelConfig, gpu_memory: int | str | None = None, height: int = 1024, width: int = 1024, *,
         model: str = "", fp8: bool = False, text_tokens: int = TEXT_TOKENS, think_tokens: int = 0,
         gpus: int = 1) -> Plan:
    """Every option's estimate and, given ``gpu_memory`` (bytes or "24GB", per card), the first option of
    ``OPTIONS`` that fits. fp8 is recommended only when ``fp8=True`` (the GPU has compute
    capability >= 8.9); it is listed either way. ``gpus`` > 1 adds tensor-parallel rows (over as many of
    the cards as the model splits over evenly)."""
    gpu = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if height % cfg.latent_downsample or width % cfg.latent_downsample:
        raise ValueError(f"height and width must be multiples of {cfg.latent_downsample}")
    p = Plan(model=model, height=height, width=width, gpu_memory=gpu, parameters=parameter_count(cfg),
             weights=weight_bytes(cfg), kv_bytes_per_token=kv_bytes_per_token(cfg),
             tokens=context_tokens(cfg, height, width, text_tokens + think_tokens), gpus=gpus)
    order = OPTIONS
    if fp8:  # fp8 before int8: same memory, faster on the GPUs that have it
        order = sorted(OPTIONS, key=lambda opt: (OPTIONS.index(opt) - 1.5) if opt[1] == "fp8" else OPTIONS.index(opt))
    for label, q, o, tp, split in _with_tensor_parallel(order, tensor_parallel_size(cfg, gpus), gpus):
        e = estimate(cfg, height, width, quantize=q, offload=o, label=label, text_tokens=text_tokens,
                     think_tokens=think_tokens, tensor_parallel=tp, split=split)
        if gpu is not None:
            e.fits = e.total <= gpu
            if p.recommended is None and e.fits and (q != "fp8" or fp8):
                p.recommended = e
        p.options.append(e)
    return p


def format_plan(p: Plan) -> str:
    w = p.weights
    lines = [
        f"memory plan for {p.model or 'the model'} at {p.width}x{p.height}"
        + (f" on {p.gpus} GPUs of {fmt_bytes(p.gpu_memory)}" if p.gpu_memory and p.gpus > 1 else
           f" on a {fmt_bytes(p.gpu_memory)} GPU" if p.gpu_memory else ""),
        f"  parameters: {p.parameters / 1e9:.2f} B; bf16 weights {fmt_bytes(sum(w[k] for k in ('und', 'gen', 'small')))}"
        f" (understanding expert {fmt_bytes(w['und'])}, generation expert {fmt_bytes(w['gen'])}, "
        f"embeddings + lm_head {fmt_bytes(w['embeddings'] + w['lm_head'])}, ViT {fmt_bytes(w['vit'])}); "
        f"VAE {fmt_bytes(w['vae'])}",
        f"  KV cache: {p.kv_bytes_per_token / 1024:.0f} KiB per token; an edit at this size holds "
        f"{p.tokens['gen'] + p.tokens['cfg_text'] + p.tokens['cfg_img']:,} tokens in its three contexts "
        f"(image: {p.tokens['vae_image']:,} VAE + {p.tokens['vit_image']:,} ViT; text {p.tokens['text']}); "
        f"{p.tokens['latent']:,} latent tokens per branch",
        "",
        f"  {'option':<22} {'GPU peak':>9} {'weights':>9} {'KV':>8} {'activ.':>8} {'host':>8}  fits  notes",
    ]
    for e in p.options:
        fits = "  -  " if e.fits is None else (" yes " if e.fits else " no  ")
        mark = "*" if p.recommended is e else " "
        lines.append(
            f" {mark}{e.label:<22} {fmt_bytes(e.total):>9} {fmt_bytes(e.weights_gpu):>9} {fmt_bytes(e.kv_cache):>8} "
            f"{fmt_bytes(e.activations):>8} {fmt_bytes(e.host_pinned) if e.host_pinned else '-':>8} {fits} {e.note}"
        )
    lines.append("")
    if p.gpu_memory is None:
        lines.append("  give --gpu-memory (e.g. 24GB) for a recommendation")
    elif p.recommended is None:
        smallest = min(p.options, key=lambda e: e.total)
        lines.append(f"  nothing fits in {fmt_bytes(p.gpu_memory)} at this size; the smallest option "
                     f"({smallest.label}) needs about {fmt_bytes(smallest.total)}: try a smaller image")
    else:
        r = p.recommended
        args = [f"quantize={r.quantize!r}"] if r.quantize else []
        args += [f"offload={r.offload!r}"] if r.offload else []
        args += [f"tensor_parallel_size={r.tensor_parallel}"] if r.tensor_parallel > 1 else []
        cards = ",".join(str(i) for i in range(r.split))
        args += [f"devices={cards!r}"] if r.split > 1 else []
        flags = " ".join(([f"--quantize {r.quantize}"] if r.quantize else []) + ([f"--offload {r.offload}"] if r.offload else [])
                         + ([f"--tensor-parallel-size {r.tensor_parallel}"] if r.tensor_parallel > 1 else [])
                         + ([f"--devices {cards}"] if r.split > 1 else []))
        launch = f"torchrun --nproc-per-node {r.tensor_parallel} --no-python bagel ... " if r.tensor_parallel > 1 else ""
        lines.append(f"  recommended: {r.label} (about {fmt_bytes(r.total)}"
                     f"{' per card' if r.tensor_parallel > 1 else ' on the fullest card' if r.split > 1 else ''})"
                     + (f": bagel_engine.load(MODEL, {', '.join(args)}), CLI {launch}{flags}" if args else ": no option needed"))
        if p.gpus > 1 and r.tensor_parallel == 1 and r.split == 1:
            lines.append(f"  it fits on one card: run {p.gpus} processes for throughput (bagel batch under torchrun), "
                         "or --cfg-parallel-size for the latency of one picture")
        if r.host_pinned:
            lines.append(f"  offload keeps {fmt_bytes(r.host_pinned)} of decoder weights in pinned host memory")
        fp8 = next(e for e in p.options if e.quantize == "fp8")
        if fp8.fits and r.quantize != "fp8" and (r.quantize or r.offload):
            lines.append("  on an Ada/Hopper GPU (compute capability >= 8.9) fp8 also fits and is the fastest quantized option")
    lines.append("  (estimates from the configs; see docs/memory.md)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring
class PeakTracker:
    """Counts the bytes of tensors created while active (on any device, the CPU included) and
    keeps the peak: ``with PeakTracker() as t: run(); t.peak``. Tensors that existed before
    (weights) are not counted, views are not counted twice. Used to check the estimates above
    on the CPU, where no allocator statistics exist."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(args, kwargs, out)
                return out

        self._mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.marks: list[tuple[str, int, int]] = []  # (label, current, peak since the last mark)
        self._segment_peak = 0

    def _record(self, args, kwargs, out) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in inputs or key in self.live:
                continue
            n = st.nbytes()
            self.live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            self._segment_peak = max(self._segment_peak, self.current)
            weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        n = self.live.pop(key, 0)
        self.current -= n

    def mark(self, label: str) -> None:
        self.marks.append((label, self.current, self._segment_peak))
        self._segment_peak = self.current

    def __enter__(self) -> "PeakTracker":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
