"""Text decoding from a context: greedy or temperature sampling, stopping at ``<|im_end|>``.

As in the official code, decoding starts by feeding ``<|im_start|>``; ``max_length`` counts that
start token; the end token stops decoding and is not returned. Decoding works on its own copy of
the context, so the caller's context never sees the generated tokens.

``TextDecode`` is one request's decoding state, a token at a time; ``decode_step`` writes the next
token of several requests (each over its own context) in ONE decoder forward: the engine's scheduler.
"""

from __future__ import annotations

from typing import Callable

import torch

from bagel_engine.model.bagel import Bagel
from bagel_engine.model.kv_cache import DecodeKV, MultiKV
from bagel_engine.params import TextParams
from bagel_engine.runtime.context import Context
from bagel_engine.runtime.tokenizer import SpecialIds


class TextDecode:
    """One request's decoding: ``[<|im_start|>, tok1, ...]`` up to ``max_think_token_n`` ids.

    The context's cache is copied once into a preallocated buffer (``DecodeKV``) that each token
    writes into; nothing is reallocated per token. ``on_token(id)`` with each kept new token.
    """

    def __init__(self, model: Bagel, special: SpecialIds, ctx: Context, params: TextParams, device: torch.device,
                 generator: torch.Generator | None = None, trace: dict | None = None,
                 on_token: Callable[[int], None] | None = None):
        cfg = model.cfg.llm
        dtype = model.language_model.lm_head.weight.dtype
        self.special, self.params, self.generator = special, params, generator
        self.trace, self.on_token = trace, on_token
        self.kv = DecodeKV(ctx.kv, ctx.length, params.max_think_token_n, cfg.num_hidden_layers,
                           model.decoder.kv_heads, cfg.head_dim, model.decoder.kv_devices(device), dtype)
        self.positions = model.decoder.rope(
            torch.arange(ctx.rope, ctx.rope + params.max_think_token_n, device=device), dtype)
        self.tokens: list[int] = []
        self.cur = torch.tensor([special.bos], device=device)
        self.done = params.max_think_token_n <= 0

    def inputs(self):
        """The token to feed now and its RoPE row."""
        step = len(self.tokens)
        self.tokens.append(int(self.cur))
        return self.cur, tuple(t[step : step + 1] for t in self.positions)

    def accept(self, logits: torch.Tensor) -> None:
        """Take the next token from this step's ``logits`` (vocab,)."""
        if self.trace is not None:
            self.trace.setdefault("logits", []).append(logits.detach())
        if self.params.do_sample:
            scaled = filter_logits(logits.float() / self.params.text_temperature, self.params.top_k, self.params.top_p)
            nxt = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=self.generator)
        else:
            nxt = torch.argmax(logits).reshape(1)
        self.kv.advance()
        if int(nxt) == self.special.eos:
            self.done = True
            return
        self.cur = nxt
        if self.on_token is not None:
            self.on_token(int(nxt))
        if len(self.tokens) >= self.params.max_think_token_n:
            self.done = True


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` (vocab,) with the tokens outside the top ``k`` and outside the nucleus ``p`` (the smallest
    set of likeliest tokens whose probabilities reach ``p``; the likeliest always stays) set to -inf."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the likelier tokens
        drop = before >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def decode_step(model: Bagel, states: list[TextDecode], decoder_fn: Callable | None = None) -> None:
    """The next token of every request in ``states`` in one decoder forward (each over its own cache)."""
    parts = [s.inputs() for s in states]
    decoder = model.decoder if decoder_fn is None else decoder_fn
    if len(parts) == 1:
        ids, rope, kv = parts[0][0], parts[0][1], states[0].kv
    else:
        ids = torch.cat([p[0] for p in parts])
        rope = tuple(torch.cat([p[1][k] for p in parts]) for k in range(len(parts[0][1])))
        kv = MultiKV([(s.kv, 1) for s in states])
    logits = model.logits(decoder(model.embed_text(ids), rope, kv, True, None))
    for j, s in enumerate(states):
        s.accept(logits[j])


def decode_tokens(
    model: Bagel,
    special: SpecialIds,
    ctx: Context,
    params: TextParams,
    device: torch.device,
    generator: torch.Generator | None = None,
    trace: dict | None = None,
    on_token: Callable[[int], None] | None = None,
    decoder_fn: Callable | None = None,
) -> list[int]:
    """Returns ``[<|im_start|>, tok1, tok2, ...]`` (at most ``max_think_token_n`` ids, no end token)."""
    state = TextDecode(model, special, ctx, params, device, generator, trace, on_token)
    while not state.done:
        decode_step(model, [state], decoder_fn)
    return state.tokens
