"""KV-cache layouts: where a block's new keys and values go and which keys each query sees.

The decoder calls ``layout.attend(layer, q, k, v, causal)`` in every layer; the layout owns the
memory. Three layouts cover inference, and one training:

- ``AppendKV``: one sequence, ``[cache ; new block]`` concatenated; the merged keys and values are
  kept so that the block can extend a context (prefill of text and images).
- ``BranchKV``: B sequences (guidance branches, several prompts) of the same block length, each
  over its own cache, in static buffers allocated once per image: every denoising step only
  writes the block's keys into its slots. Shapes never change between steps (compile-friendly).
- ``DecodeKV``: one sequence decoding one token at a time into a preallocated buffer, with the
  write position held on the device (compile-friendly, no reallocation per token).
- ``PackedKV``: no cache: a whole packed training sequence attends to itself under a mask (a
  dense (T, T) bool mask for SDPA, or a flex-attention ``BlockMask`` for long sequences on a GPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from bagel_engine.model.attention import attend, attend_block_mask, attend_dense_mask

KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (L, Hkv, D)
Devices = torch.device | list[torch.device]  # one device, or one per layer (the decoder's layers split over cards)


def _per_layer(device: Devices, num_layers: int) -> list[torch.device]:
    return list(device) if isinstance(device, (list, tuple)) else [device] * num_layers


def _on(cache: dict, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, copied once per device (layers split over cards read the layout's indexes there)."""
    if t.device == device:
        return t
    if device not in cache:
        cache[device] = t.to(device)
    return cache[device]


class AppendKV:
    def __init__(self, past: tuple[KV, ...] | list[KV] | None):
        self.past = past
        self.merged: list[KV] = []

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        if self.past is not None and self.past[layer][0].shape[0] > 0:
            k = torch.cat([self.past[layer][0], k], dim=0)
            v = torch.cat([self.past[layer][1], v], dim=0)
        self.merged.append((k, v))
        return attend(q[None], k[None], v[None], causal=causal)[0]


class BranchKV:
    """B sequences of ``n`` new tokens each; sequence b sees its cache (``lengths[b]`` tokens) and its block."""

    def __init__(self, caches: list[tuple[KV, ...] | None], lengths: list[int], n: int, num_layers: int,
                 kv_heads: int, head_dim: int, device: Devices, dtype: torch.dtype):
        b = len(caches)
        s = max(lengths) + n
        self.num_branches, self.n, self.slots = b, n, s
        devices = _per_layer(device, num_layers)
        device = devices[0]
        self.k = [torch.zeros(b, s, kv_heads, head_dim, device=d, dtype=dtype) for d in devices]
        self.v = [torch.zeros(b, s, kv_heads, head_dim, device=d, dtype=dtype) for d in devices]
        self._split = len(set(devices)) > 1  # layers on several devices: the indexes are read on each
        self._moved: dict = {}
        for i, (cache, length) in enumerate(zip(caches, lengths)):
            if cache is not None and length:
                for layer in range(num_layers):
                    self.k[layer][i, :length] = cache[layer][0]
                    self.v[layer][i, :length] = cache[layer][1]
        lens = torch.tensor(lengths, device=device)
        self.write_index = (torch.arange(b, device=device)[:, None] * s + lens[:, None]
                            + torch.arange(n, device=device)[None]).reshape(-1)
        self.kv_lens = lens + n
        self.mask = (torch.arange(s, device=device)[None] < self.kv_lens[:, None])[:, None, :].expand(b, n, s)

    def first(self, count: int) -> "BranchKV":
        """A view on the first ``count`` sequences (same buffers)."""
        view = object.__new__(BranchKV)
        view.num_branches, view.n, view.slots = count, self.n, self.slots
        view.k = [t[:count] for t in self.k]
        view.v = [t[:count] for t in self.v]
        view.write_index = self.write_index[: count * self.n]
        view.kv_lens = self.kv_lens[:count]
        view.mask = self.mask[:count]
        view._split, view._moved = self._split, {}
        return view

    def only(self, j: int) -> "BranchKV":
        """A view on sequence ``j`` alone (same buffers): what one rank of CFG-parallel attends over."""
        view = object.__new__(BranchKV)
        view.num_branches, view.n, view.slots = 1, self.n, self.slots
        view.k = [t[j:j + 1] for t in self.k]
        view.v = [t[j:j + 1] for t in self.v]
        view.write_index = self.write_index[j * self.n:(j + 1) * self.n] - j * self.slots
        view.kv_lens = self.kv_lens[j:j + 1]
        view.mask = self.mask[j:j + 1]
        view._split, view._moved = self._split, {}
        return view

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, s = self.num_branches, self.n, self.slots
        kb, vb = self.k[layer], self.v[layer]
        index, mask, lens = self.write_index, self.mask, self.kv_lens
        if self._split:
            moved = self._moved.setdefault(kb.device, {})
            index, mask, lens = (_on(moved.setdefault(name, {}), t, kb.device)
                                 for name, t in (("index", index), ("mask", mask), ("lens", lens)))
        kb.view(b * s, *kb.shape[2:]).index_copy_(0, index, k)
        vb.view(b * s, *vb.shape[2:]).index_copy_(0, index, v)
        out = attend(q.view(b, n, *q.shape[1:]), kb, vb, mask=mask, kv_lens=lens)
        return out.reshape(b * n, *q.shape[1:])


class DecodeKV:
    """One sequence over its cache plus up to ``max_new`` decoded tokens, one token per forward."""

    def __init__(self, past: tuple[KV, ...] | None, length: int, max_new: int, num_layers: int, kv_heads: int,
                 head_dim: int, device: Devices, dtype: torch.dtype):
        s = length + max_new
        self.slots = s
        devices = _per_layer(device, num_layers)
        device = devices[0]
        self.k = [torch.zeros(1, s, kv_heads, head_dim, device=d, dtype=dtype) for d in devices]
        self.v = [torch.zeros(1, s, kv_heads, head_dim, device=d, dtype=dtype) for d in devices]
        self._split = len(set(devices)) > 1
        if past is not None and length:
            for layer in range(num_layers):
                self.k[layer][0, :length] = past[layer][0]
                self.v[layer][0, :length] = past[layer][1]
        self.pos = torch.tensor([length], device=device)  # the slot the next token writes
        self._slots = torch.arange(s, device=device)
        self._refresh()

    def _refresh(self) -> None:
        self.kv_lens = self.pos + 1
        self.mask = (self._slots <= self.pos)[None, None, :]

    def advance(self) -> None:
        self.pos += 1
        self._refresh()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        pos, mask, lens = self.pos, self.mask, self.kv_lens
        if self._split:  # the write position moves every token: read where the layer is, each time
            here = self.k[layer].device
            pos, mask, lens = (t if t.device == here else t.to(here) for t in (pos, mask, lens))
        self.k[layer][0].index_copy_(0, pos, k)
        self.v[layer][0].index_copy_(0, pos, v)
        return attend(q[None], self.k[layer], self.v[layer], mask=mask, kv_lens=lens)[0]


@dataclass(frozen=True)
class SampleBlocks:
    """A block-diagonal attention mask: tokens ``start:end`` of each span see only their own span,
    as ``masks[i]`` (a (n, n) bool tensor) says. Packed training samples never see each other, so
    attention costs the samples' own lengths, not the whole sequence's.

    The spans run as one batch, each padded to the longest (``padded``): one SDPA call for the whole
    sequence instead of one per sample, whose per-call and slice-backward overheads dominated a CPU step
    with tens of short samples; when padding would cost much more than the spans themselves (``batched``),
    span by span."""

    spans: tuple[tuple[int, int], ...]
    masks: tuple[torch.Tensor, ...]

    @functools.cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(gather, mask, unpad)``: ``gather`` (S, L) the sequence row of each padded slot (pads read row
        0), ``mask`` (S, L, L) each span's own mask with pad keys hidden (a pad query sees its span's first
        key, so no row is empty; its output is dropped), ``unpad`` (T,) the padded slot of each row."""
        device = self.masks[0].device
        longest = max(b - a for a, b in self.spans)
        gather = torch.zeros(len(self.spans), longest, dtype=torch.long, device=device)
        mask = torch.zeros(len(self.spans), longest, longest, dtype=torch.bool, device=device)
        mask[:, :, 0] = True
        unpad = []
        for i, ((a, b), m) in enumerate(zip(self.spans, self.masks)):
            n = b - a
            gather[i, :n] = torch.arange(a, b, device=device)
            mask[i, :n, :n] = m
            unpad.append(torch.arange(i * longest, i * longest + n, device=device))
        return gather, mask, torch.cat(unpad)

    @functools.cached_property
    def batched(self) -> bool:
        """Whether padding is cheap: the padded attention is small in itself, or within 4x of the spans' own
        cost (one long span among short ones runs span by span instead: padding would multiply its cost)."""
        lengths = [b - a for a, b in self.spans]
        padded = len(lengths) * max(lengths) ** 2
        return padded <= (1 << 22) or padded <= 4 * sum(n * n for n in lengths)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (T, Hq, D), k, v: (T, Hkv, D) -> (T, Hq, D)."""
        if not self.batched:
            return torch.cat([attend_dense_mask(q[None, a:b], k[None, a:b], v[None, a:b], m[None])[0]
                              for (a, b), m in zip(self.spans, self.masks)])
        gather, mask, unpad = self.padded
        flat = gather.reshape(-1)
        pad = lambda x: x.index_select(0, flat).reshape(*gather.shape, *x.shape[1:])  # noqa: E731
        out = attend_dense_mask(pad(q), pad(k), pad(v), mask)
        return out.reshape(-1, *out.shape[2:]).index_select(0, unpad)


class PackedKV:
    """Self-attention over one packed sequence of T tokens; ``mask`` says which keys each query sees:
    a (T, T) bool tensor (SDPA), ``SampleBlocks`` (SDPA span by span) or a flex-attention
    ``BlockMask`` built over the same T."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        kind = q.device.type
        if torch.is_autocast_enabled(kind):  # mixed-precision training: attention in the autocast dtype
            dtype = torch.get_autocast_dtype(kind)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if isinstance(self.mask, torch.Tensor):
            return attend_dense_mask(q[None], k[None], v[None], self.mask[None])[0]
        if isinstance(self.mask, SampleBlocks):
            return self.mask.attend(q, k, v)
        return attend_block_mask(q[None], k[None], v[None], self.mask)[0]


class MultiKV:
    """Several layouts in one forward: the rows come in parts (``(layout, rows)`` in order), each part
    attends in its own layout (an image's guidance branches, a text request's decode buffer). The
    linear layers run over every row at once; attention runs part by part, each exactly as alone."""

    def __init__(self, parts: list[tuple[object, int]]):
        self.parts = parts

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        outs, offset = [], 0
        for layout, rows in self.parts:
            end = offset + rows
            outs.append(layout.attend(layer, q[offset:end], k[offset:end], v[offset:end], causal))
            offset = end
        return torch.cat(outs)
