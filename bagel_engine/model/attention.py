"""The one attention entry point of the decoder.

A query block of ``N`` new tokens attends to ``L`` cached tokens followed by the block itself.
Attention inside the block is either causal (text, decoding) or full (image blocks); the cache is
always fully visible. This is the bottom-right aligned causal rule of flash-attn's varlen kernel,
which the official code uses.

Backends live behind :func:`block_attention`; today it is PyTorch SDPA (which itself dispatches
to flash / memory-efficient / math kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=0)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Attention of a query block over ``[cache ; block]``.

    q: (N, Hq, D); k, v: (L + N, Hkv, D) with the new block's keys last. Returns (N, Hq, D).
    """
    n, hq, _ = q.shape
    total, hkv, _ = k.shape
    past = total - n
    qh = q.transpose(0, 1)
    kh = _expand_kv(k.transpose(0, 1), hq // hkv)
    vh = _expand_kv(v.transpose(0, 1), hq // hkv)
    mask = None
    if causal and n > 1:
        rows = torch.arange(n, device=q.device).unsqueeze(1)
        cols = torch.arange(total, device=q.device).unsqueeze(0)
        mask = cols <= rows + past
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(0, 1)
