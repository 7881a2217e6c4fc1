"""The one attention entry point of the decoder, with its backends.

Queries come in ``B`` sequences of ``N`` tokens (B guidance branches, or B = 1). Each sequence
attends to its own keys: ``S`` slots of which a prefix is valid (``valid`` / ``mask``). Inside a
new block attention is causal (text, decoding: bottom-right aligned, the rule of flash-attn's
varlen kernel the official code uses) or full (image blocks); cached keys are always visible.

Backends: ``sdpa`` (PyTorch scaled_dot_product_attention, which dispatches to flash /
memory-efficient / math kernels), ``flex`` (torch flex_attention, compiled) and ``flash``
(flash-attn's varlen kernel, when installed; bf16/fp16 on CUDA). ``auto`` picks flash-attn when it
is installed and usable, else SDPA. All backends are tested to agree.

The backend is chosen per pipeline: the engine runs its work inside ``use_backend(name)`` (a context
variable, so two pipelines in one process, or two threads, never see each other's choice);
``set_backend`` changes the default outside any ``use_backend``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "flash")
_default = "auto"
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("bagel_attention_backend", default=None)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash" and not flash_available():
        raise ValueError("the flash backend needs the flash-attn package and a CUDA device")
    return name


def set_backend(name: str) -> None:
    """The default backend, used outside any ``use_backend``."""
    global _default
    _default = check_backend(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Attention in this context (this thread, this task) runs with backend ``name``."""
    token = _current.set(check_backend(name))
    try:
        yield
    finally:
        _current.reset(token)


def get_backend() -> str:
    return _current.get() or _default


_FLASH_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def flash_available() -> bool:
    return _FLASH_INSTALLED and torch.cuda.is_available()


def causal_block_mask(n: int, total: int, device) -> torch.Tensor:
    """(n, total) bool: query i of a block appended after ``total - n`` cached keys sees keys <= past + i."""
    rows = torch.arange(n, device=device).unsqueeze(1)
    cols = torch.arange(total, device=device).unsqueeze(0)
    return cols <= rows + (total - n)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           kv_lens: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Batched attention. q: (B, N, Hq, D); k, v: (B, S, Hkv, D).

    Sequence b sees its first ``kv_lens[b]`` keys (all S when None); ``mask`` (B, N, S) bool is the
    same information as a mask, precomputed by the caller (it must be given with ``kv_lens``).
    ``causal``: the block is the last N of the S keys and attends causally inside itself.
    Returns (B, N, Hq, D)."""
    backend = get_backend()
    if backend == "auto":
        backend = "flash" if (_FLASH_INSTALLED and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) else "sdpa"
    if backend == "flash":
        return _flash(q, k, v, kv_lens, causal)
    if backend == "flex":
        return _flex(q, k, v, mask, causal)
    return _sdpa(q, k, v, mask, causal)


def _sdpa(q, k, v, mask, causal):
    b, n, hq, _ = q.shape
    s = k.shape[1]
    if causal and n > 1:
        mask = causal_block_mask(n, s, q.device).expand(b, n, s)
    attn_mask = None if mask is None else mask[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
        enable_gqa=k.shape[2] != hq,
    )
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask, causal):
    from torch.nn.attention.flex_attention import create_block_mask

    b, n, hq, _ = q.shape
    s = k.shape[1]
    if causal and n > 1:
        mask = causal_block_mask(n, s, q.device).expand(b, n, s)
    block_mask = None
    if mask is not None:
        m = mask.contiguous()

        def visible(bi, h, qi, ki):
            return m[bi, qi, ki]

        block_mask = create_block_mask(visible, b, None, n, s, device=q.device)
    fn = _compiled_flex() if q.is_cuda else __import__(
        "torch.nn.attention.flex_attention", fromlist=["flex_attention"]).flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
             enable_gqa=k.shape[2] != hq)
    return out.transpose(1, 2)


def attend_dense_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA under an explicit (B, N, S) bool mask, whatever the backend (packed training sequences)."""
    return _sdpa(q, k, v, mask, False)


def attend_block_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """flex attention under a prebuilt ``BlockMask`` (packed training sequences). q: (B, N, Hq, D)."""
    fn = _compiled_flex() if q.is_cuda else __import__(
        "torch.nn.attention.flex_attention", fromlist=["flex_attention"]).flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
             enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def _flash(q, k, v, kv_lens, causal):
    """flash-attn varlen over the valid key prefix of each sequence (bottom-right causal alignment)."""
    from flash_attn import flash_attn_varlen_func

    b, n, hq, d = q.shape
    s = k.shape[1]
    if kv_lens is None:
        kv_lens = torch.full((b,), s, dtype=torch.int32, device=q.device)
    kv_lens = kv_lens.to(torch.int32)
    cu_q = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
    cu_k = F.pad(kv_lens.cumsum(0, dtype=torch.int32), (1, 0))
    valid = (torch.arange(s, device=q.device)[None] < kv_lens[:, None]).reshape(-1)
    kf = k.reshape(b * s, *k.shape[2:])[valid]
    vf = v.reshape(b * s, *v.shape[2:])[valid]
    out = flash_attn_varlen_func(q.reshape(b * n, hq, d), kf, vf, cu_q, cu_k, n, s, causal=causal)
    return out.view(b, n, hq, d)
