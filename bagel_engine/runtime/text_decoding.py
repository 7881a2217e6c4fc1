"""Text decoding from a context: greedy or temperature sampling, stopping at ``<|im_end|>``.

As in the official code, decoding starts by feeding ``<|im_start|>``; ``max_length`` counts that
start token; the end token stops decoding and is not returned. Decoding works on its own copy of
the context, so the caller's context never sees the generated tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

from bagel_engine.model.bagel import Bagel
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
) -> list[int]:
    """Returns ``[<|im_start|>, tok1, tok2, ...]`` (at most ``max_think_token_n`` ids, no end token)."""
    tokens: list[int] = []
    kv = list(ctx.kv) if ctx.kv else None
    rope = ctx.rope
    cur = special.bos
    for _ in range(params.max_think_token_n):
        tokens.append(cur)
        x = model.embed_text(torch.tensor([cur], device=device))
        hidden, kv = model.decoder(x, torch.tensor([rope], device=device), kv, True, None)
        logits = model.logits(hidden)[0]
        if trace is not None:
            trace.setdefault("logits", []).append(logits.detach())
        if params.do_sample:
            probs = torch.softmax(logits.float() / params.text_temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        else:
            nxt = int(torch.argmax(logits))
        rope += 1
        if nxt == special.eos:
            break
        cur = nxt
        if on_token is not None:
            on_token(nxt)
    return tokens
