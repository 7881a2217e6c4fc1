"""Text decoding from a context: greedy or temperature sampling, stopping at ``<|im_end|>``.

As in the official code, decoding starts by feeding ``<|im_start|>``; ``max_length`` counts that
start token; the end token stops decoding and is not returned. Decoding works on its own copy of
the context, so the caller's context never sees the generated tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

from bagel_engine.model.bagel import Bagel
from bagel_engine.model.kv_cache import DecodeKV
from bagel_engine.params import TextParams
from bagel_engine.runtime.context import Context
from bagel_engine.runtime.tokenizer import SpecialIds


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
    """Returns ``[<|im_start|>, tok1, tok2, ...]`` (at most ``max_think_token_n`` ids, no end token).

    The context's cache is copied once into a preallocated buffer (``DecodeKV``) that each token
    writes into; nothing is reallocated per token.
    """
    cfg = model.cfg.llm
    dtype = model.language_model.lm_head.weight.dtype
    kv = DecodeKV(ctx.kv, ctx.length, params.max_think_token_n, cfg.num_hidden_layers,
                  cfg.num_key_value_heads, cfg.head_dim, device, dtype)
    positions = model.decoder.rope(torch.arange(ctx.rope, ctx.rope + params.max_think_token_n, device=device), dtype)
    tokens: list[int] = []
    cur = torch.tensor([special.bos], device=device)
    for step in range(params.max_think_token_n):
        tokens.append(int(cur))
        rope = tuple(t[step : step + 1] for t in positions)
        hidden = (model.decoder if decoder_fn is None else decoder_fn)(model.embed_text(cur), rope, kv, True, None)
        logits = model.logits(hidden)[0]
        if trace is not None:
            trace.setdefault("logits", []).append(logits.detach())
        if params.do_sample:
            probs = torch.softmax(logits.float() / params.text_temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = torch.argmax(logits).reshape(1)
        kv.advance()
        if int(nxt) == special.eos:
            break
        cur = nxt
        if on_token is not None:
            on_token(int(nxt))
    return tokens
