"""Weight offload: keep the decoder layers' weights in (pinned) CPU memory and stream them to the
GPU when they are used (``load(..., offload="model" | "layer")``).

The small modules (token embeddings, ``lm_head``, the norms, the ViT, the glue) are moved to the
device once and stay there. The big ones, each expert's linear layers in each decoder layer
(``self_attn.{q,k,v,o}_proj`` + ``mlp`` for the understanding expert, the ``*_moe_gen`` twins for
the generation expert; 233 M parameters, 0.47 GB in bf16, per layer and expert), are *groups*
moved as a unit.

Everything is driven by forward hooks, so the decoder's code needs no change: a pre-hook on each
decoder layer brings in what the layer will use (committing what was prefetched) and starts
copying the next layer on a side CUDA stream; a pre-hook on each expert module notes which experts
the layer really uses (and loads a group that was not predicted); a post-hook on the layer drops
the streamed groups of that layer. The prediction is that a layer uses the experts the previous
layer used (all layers of a forward route alike); the first layer uses the last forward's set.

Modes:

* ``"layer"``: every group is streamed: one layer ahead on a side stream, so at most two layers'
  worth of decoder weights are on the GPU. A text forward (understanding expert only) streams only
  the understanding weights; an image forward streams both experts.
* ``"model"``: one expert is *resident* (all its layers on the GPU) and the other is streamed layer
  by layer. The resident one follows the workload: after a forward that used the generation expert
  it is the generation expert (denoising: nearly all the work is there; the understanding expert
  serves only the two image-marker tokens per branch and is streamed), after a text-only forward it
  is the understanding expert (prefill, think and answer decoding). Switching moves a whole expert.

On the CPU (``device`` = cpu) the same hooks run and the "device copies" are real copies, so tests
check the mechanics and that results equal those without offload. Offload is for CUDA devices;
on the CPU it only costs time.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger("bagel_engine.offload")

MODES = ("model", "layer")
EXPERTS = ("und", "gen")
# Expert sub-modules of a decoder layer (module path inside the layer) -> expert.
EXPERT_MODULES = {
    "self_attn.q_proj": "und", "self_attn.k_proj": "und", "self_attn.v_proj": "und", "self_attn.o_proj": "und",
    "mlp": "und",
    "self_attn.q_proj_moe_gen": "gen", "self_attn.k_proj_moe_gen": "gen", "self_attn.v_proj_moe_gen": "gen",
    "self_attn.o_proj_moe_gen": "gen", "mlp_moe_gen": "gen",
}


# ----------------------------------------------------------------------------- moving tensors
def _bnb_quant_state_to(qs, device: torch.device, non_blocking: bool):
    """A copy of a bitsandbytes QuantState on ``device`` (``QuantState.to`` moves in place)."""
    new = copy.copy(qs)
    new.absmax = qs.absmax.to(device, non_blocking=non_blocking)
    new.code = qs.code.to(device, non_blocking=non_blocking)
    if getattr(qs, "nested", False):
        new.offset = qs.offset.to(device, non_blocking=non_blocking)
        new.state2 = copy.copy(qs.state2)
        new.state2.absmax = qs.state2.absmax.to(device, non_blocking=non_blocking)
        new.state2.code = qs.state2.code.to(device, non_blocking=non_blocking)
    return new


def _is_bnb(p) -> bool:
    return getattr(p, "quant_state", None) is not None and hasattr(p, "bnb_quantized")


def move_param(p: nn.Parameter, device: torch.device, non_blocking: bool = False, copy_always: bool = False) -> nn.Parameter:
    """``p`` as a new frozen Parameter on ``device``; handles plain tensors, torchao tensor subclasses
    and bitsandbytes 4-bit parameters (whose quantization state is copied, not moved in place).
    ``copy_always``: copy even when ``p`` is already on ``device`` (the CPU test path)."""
    if _is_bnb(p):
        data = p.data.to(device, non_blocking=non_blocking)
        if copy_always and data.data_ptr() == p.data.data_ptr():
            data = data.clone()
        return type(p)(data, requires_grad=False, quant_state=_bnb_quant_state_to(p.quant_state, device, non_blocking),
                       blocksize=p.blocksize, compress_statistics=p.compress_statistics, quant_type=p.quant_type,
                       quant_storage=p.quant_storage, module=getattr(p, "module", None), bnb_quantized=True)
    t = p.detach() if type(p) is nn.Parameter else p
    moved = t.to(device, non_blocking=non_blocking)
    if copy_always and moved is t:
        moved = t.clone()
    if type(moved) is nn.Parameter:
        return moved
    return nn.Parameter(moved, requires_grad=False)


def _pin(p: nn.Parameter) -> nn.Parameter:
    """A page-locked copy of a CPU parameter (fast, asynchronous host-to-device copies); the
    parameter itself when it cannot be pinned."""
    try:
        if _is_bnb(p):
            pinned = move_param(p, torch.device("cpu"))
            pinned.data = p.data.pin_memory()
            qs = pinned.quant_state
            qs.absmax, qs.code = qs.absmax.pin_memory(), qs.code.pin_memory()
            return pinned
        data = p.detach() if type(p) is nn.Parameter else p
        return nn.Parameter(data.pin_memory(), requires_grad=False)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError) as e:  # tensor subclasses without pinning
        log.debug("cannot pin a %s parameter (%s); its copies will be synchronous", type(p.data).__name__, e)
        return p


PINNED_ROUND_THRESHOLD_MB = 16


def _limit_pinned_rounding() -> None:
    """PyTorch's pinned-memory allocator rounds every block up to a power of two: a 136 MB MLP
    weight would take 256 MB and the pinned decoder ~1.8x its size. Blocks above 16 MB are left
    unrounded (the allocator setting ``pinned_max_round_threshold_mb`` of recent PyTorch)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        log.info("this PyTorch rounds pinned blocks to powers of two: offload may pin up to 1.8x the weights")
        return
    try:
        setter(f"pinned_max_round_threshold_mb:{PINNED_ROUND_THRESHOLD_MB}")
    except (RuntimeError, ValueError) as e:
        log.info("could not limit pinned-memory rounding (%s)", e)


def _tensors(p) -> list[torch.Tensor]:
    """The plain tensors holding ``p``'s memory (tensor subclasses are flattened)."""
    out = []
    if _is_bnb(p):
        qs = p.quant_state
        out += [p.data, qs.absmax, qs.code]
        if getattr(qs, "nested", False):
            out += [qs.offset, qs.state2.absmax, qs.state2.code]
        return out
    t = p.data if isinstance(p, nn.Parameter) else p
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, torch.Tensor):
                out += _tensors(inner)
        return out
    return [t]


def _nbytes(p) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(p))


# ----------------------------------------------------------------------------- groups
OFF, PENDING, ON = "off", "pending", "on"


class _Group:
    """One expert's weights in one decoder layer, moved as a unit."""

    def __init__(self, layer: int, expert: str, slots: list[tuple[nn.Module, str]]):
        self.layer, self.expert = layer, expert
        self.slots = slots  # (module, parameter name)
        self.masters = [m._parameters[n] for m, n in slots]  # CPU copies (pinned on CUDA machines)
        self.staged: list[nn.Parameter] | None = None  # device copies
        self.event: torch.cuda.Event | None = None
        self.state = OFF
        self.nbytes = sum(_nbytes(p) for p in self.masters)

    def install(self, params: list[nn.Parameter]) -> None:
        for (module, name), p in zip(self.slots, params):
            module._parameters[name] = p


@dataclass
class OffloadStats:
    loads: int = 0  # groups copied to the device (prefetched or not)
    prefetches: int = 0  # of which started ahead on the side stream
    sync_loads: int = 0  # of which were needed at once (not predicted or not yet prefetched)
    evictions: int = 0
    swaps: int = 0  # "model" mode: changes of the resident expert
    bytes_to_device: int = 0
    device_bytes: int = 0  # decoder weight bytes on the device now
    peak_device_bytes: int = 0
    forwards: int = 0
    experts_used: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        d = self.__dict__.copy()
        d["experts_used"] = dict(self.experts_used)
        return d


class Offloader:
    """Streams the decoder layers' expert weights of a ``Bagel`` to ``device`` (see the module doc)."""

    PIN_ON_CPU = False  # tests: run the pinning step without CUDA

    def __init__(self, model: nn.Module, mode: str, device: torch.device):
        if mode not in MODES:
            raise ValueError(f"unknown offload {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.device = mode, torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ValueError(f"offload to {self.device} needs a CUDA device and none is available")
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_always = not self.cuda  # on the CPU, really copy (tests the mechanics)
        self.pin = self.cuda or self.PIN_ON_CPU
        if self.cuda:
            _limit_pinned_rounding()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.layers = model.language_model.model.layers
        self.n = len(self.layers)
        self.groups: list[dict[str, _Group]] = []
        self.stats = OffloadStats()
        self.resident: str | None = None  # "model" mode: the expert kept whole on the device
        self.last_pass_used: set[str] = {"und"}  # a first forward is a text prefill
        self.pass_used: set[str] = set()
        self.prev_layer_used: set[str] | None = None
        self.layer_used: set[str] = set()
        self.last_layer = -1
        self.load_all = False  # set if a layer ran without calling its expert modules
        self.handles: list = []
        self._build(model)

    # ------------------------------------------------------------------ setup
    def _build(self, model: nn.Module) -> None:
        streamed: set[tuple[int, str]] = set()  # (id(module), parameter name) of the streamed weights
        for i, layer in enumerate(self.layers):
            slots: dict[str, list] = {e: [] for e in EXPERTS}
            for path, expert in EXPERT_MODULES.items():
                for m in layer.get_submodule(path).modules():
                    for name, p in m._parameters.items():
                        if p is not None:
                            slots[expert].append((m, name))
                            streamed.add((id(m), name))
            for e in EXPERTS:  # CPU masters first (pinned where CUDA is), then the group
                for m, name in slots[e]:
                    p = m._parameters[name]
                    if p.device.type != "cpu":
                        p = move_param(p, torch.device("cpu"))
                    m._parameters[name] = _pin(p) if self.pin else p
            self.groups.append({e: _Group(i, e, slots[e]) for e in EXPERTS})
        # Everything else lives on the device for good.
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and (id(m), name) not in streamed and p.device != self.device:
                    m._parameters[name] = move_param(p, self.device)
            for name, b in list(m._buffers.items()):
                if b is not None and b.device != self.device:
                    m._buffers[name] = b.to(self.device)
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(i)))
            self.handles.append(layer.register_forward_hook(self._layer_post_hook(i)))
            for path, expert in EXPERT_MODULES.items():
                self.handles.append(layer.get_submodule(path).register_forward_pre_hook(self._expert_hook(i, expert)))

    def remove(self) -> None:
        """Detach the hooks and put every streamed weight back in its (CPU) master copy."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for groups in self.groups:
            for g in groups.values():
                self._evict(g)
        self.resident = None

    # ------------------------------------------------------------------ group moves
    def _copy(self, g: _Group) -> list[nn.Parameter]:
        return [move_param(p, self.device, non_blocking=self.cuda, copy_always=self.copy_always) for p in g.masters]

    def _account(self, g: _Group, sign: int) -> None:
        self.stats.device_bytes += sign * g.nbytes
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.stats.device_bytes)

    def _prefetch(self, g: _Group) -> None:
        if g.state != OFF:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                g.staged = self._copy(g)
                g.event = torch.cuda.Event()
                g.event.record(self.stream)
        else:
            g.staged = self._copy(g)
        g.state = PENDING
        self.stats.loads += 1
        self.stats.prefetches += 1
        self.stats.bytes_to_device += g.nbytes
        self._account(g, +1)

    def _ensure(self, g: _Group) -> None:
        if g.state == ON:
            return
        if g.state == OFF:  # not predicted: copy now, on the compute stream
            g.staged = self._copy(g)
            self.stats.loads += 1
            self.stats.sync_loads += 1
            self.stats.bytes_to_device += g.nbytes
            self._account(g, +1)
        elif self.cuda:  # prefetched: make the compute stream wait for the copy
            current = torch.cuda.current_stream(self.device)
            current.wait_event(g.event)
            for p in g.staged:
                for t in _tensors(p):
                    t.record_stream(current)  # freed memory is reused only after this stream is done
        g.install(g.staged)
        g.staged, g.event, g.state = None, None, ON

    def _evict(self, g: _Group) -> None:
        if g.state == OFF:
            return
        g.install(g.masters)
        g.staged, g.event = None, None
        g.state = OFF
        self.stats.evictions += 1
        self._account(g, -1)

    def _set_resident(self, expert: str) -> None:
        """'model' mode: make ``expert`` the one kept whole on the device (the other goes home first)."""
        if self.resident == expert:
            return
        if self.resident is not None:
            for groups in self.groups:
                self._evict(groups[self.resident])
            self.stats.swaps += 1  # the freed blocks have the shapes of the other expert's: reused as is
        self.resident = expert
        for groups in self.groups:
            self._ensure(groups[expert])
        log.debug("offload: %s expert resident", expert)

    # ------------------------------------------------------------------ hooks
    def _layer_pre_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args, kwargs=None):
            if i <= self.last_layer:  # a new forward pass
                self._new_pass()
            self.last_layer = i
            if i == 0:
                self.stats.forwards += 1
            predicted = set(EXPERTS) if self.load_all else (
                self.prev_layer_used if self.prev_layer_used is not None else self.last_pass_used)
            for e in EXPERTS:
                if e in predicted and e != self.resident:
                    self._ensure(self.groups[i][e])
            nxt = (i + 1) % self.n
            if nxt != i:
                for e in EXPERTS:
                    if e in predicted and e != self.resident:
                        self._prefetch(self.groups[nxt][e])
            self.layer_used = set()
        return hook

    def _new_pass(self) -> None:
        if self.pass_used:
            self.last_pass_used = set(self.pass_used)
        self.pass_used = set()
        self.prev_layer_used = None
        if self.mode == "model":
            self._set_resident("gen" if "gen" in self.last_pass_used else "und")

    def _expert_hook(self, i: int, expert: str):
        @torch.compiler.disable
        def hook(module, args):
            if expert not in self.layer_used:
                self.layer_used.add(expert)
                self.stats.experts_used[expert] += 1
                if self.mode == "model" and self.resident is None:
                    self._set_resident(expert)
                self._ensure(self.groups[i][expert])
        return hook

    def _layer_post_hook(self, i: int):
        @torch.compiler.disable
        def hook(module, args, output):
            if not self.layer_used and not self.load_all:
                log.warning("offload: decoder layer %d ran without calling its expert modules; "
                            "loading both experts for every layer from now on", i)
                self.load_all = True
            for e in EXPERTS:
                if e != self.resident:
                    self._evict(self.groups[i][e])
            self.prev_layer_used = set(self.layer_used)
            self.pass_used |= self.layer_used
            if i == self.n - 1:  # a forward pass is complete
                self.last_pass_used = set(self.pass_used) or self.last_pass_used
                self.pass_used = set()
                self.last_layer = -1
                self.prev_layer_used = None
                if self.mode == "model":
                    self._set_resident("gen" if "gen" in self.last_pass_used else "und")
            return output
        return hook


def apply_offload(model: nn.Module, mode: str, device: torch.device) -> None:
    """Offload the decoder layers of ``model`` (a ``Bagel`` whose weights are on the CPU): the small
    modules go to ``device`` for good, each expert's layer weights stay in (pinned) CPU memory and
    are streamed by hooks ("model": one expert resident, the other streamed; "layer": everything
    streamed one layer ahead). The ``Offloader`` is kept as ``model.offloader`` (stats, ``remove()``)."""
    if getattr(model, "offloader", None) is not None:
        raise ValueError("the model is already offloaded")
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"offload needs a CUDA (or CPU) device, got {device}")
    model.offloader = Offloader(model, mode, device)
    log.info("offload=%s: decoder experts stream from %s memory to %s",
             mode, "pinned CPU" if device.type == "cuda" else "CPU", device)


def remove_offload(model: nn.Module) -> None:
    """Undo ``apply_offload``: hooks removed, streamed weights back in CPU memory."""
    off = getattr(model, "offloader", None)
    if off is not None:
        off.remove()
        model.offloader = None
