"""The attention entry point: its backends agree with a plain softmax reference, and the engine's
results do not depend on the backend."""

from __future__ import annotations

import math

import pytest
import torch

import bagel_engine
from bagel_engine.model import attention as A
from golden import MODEL_DIR, cases, inputs, tensors


def reference(q, k, v, kv_lens=None, causal=False):
    b, n, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bnhd,bshd->bhns", q.double(), k.double()) / math.sqrt(d)
    visible = torch.ones(b, n, s, dtype=torch.bool)
    if kv_lens is not None:
        visible &= torch.arange(s)[None, None] < kv_lens[:, None, None]
    if causal:
        visible &= A.causal_block_mask(n, s, "cpu")[None]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.einsum("bhns,bshd->bnhd", scores.softmax(-1), v.double()).float()


@pytest.fixture(autouse=True)
def restore_backend():
    yield
    A.set_backend("auto")


@pytest.mark.parametrize("backend", ["sdpa", "flex"] + (["flash"] if A.flash_available() else []))
def test_backends_agree_with_reference(backend):
    torch.manual_seed(0)
    A.set_backend(backend)
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    dev = "cuda" if backend == "flash" else "cpu"
    q, k, v = (torch.randn(3, 6, 4, 16), torch.randn(3, 20, 2, 16), torch.randn(3, 20, 2, 16))
    lens = torch.tensor([20, 12, 6])
    mask = (torch.arange(20)[None] < lens[:, None])[:, None, :].expand(3, 6, 20)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    got = A.attend(*(t.to(dev, dtype) for t in (q, k, v)), mask=mask.to(dev), kv_lens=lens.to(dev))
    assert torch.allclose(got.float().cpu(), reference(q, k, v, kv_lens=lens), atol=tol)
    got = A.attend(*(t[:1].to(dev, dtype) for t in (q, k, v)), causal=True)  # a causal block after a cache
    assert torch.allclose(got.float().cpu(), reference(q[:1], k[:1], v[:1], causal=True), atol=tol)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.set_backend("xformers")


def test_engine_with_flex_backend_matches_golden():
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", attention="flex")
    case = cases()["img2img"]
    out = pipe.interleave(inputs("img2img"), seed=case["seed"], **case["params"])
    assert torch.allclose(out.latents, tensors("img2img")["gen_image0.decode_input"][0], atol=1e-3)


def test_backend_is_chosen_per_pipeline(monkeypatch):
    """Two pipelines in one process keep their own backend; nothing leaks outside their calls."""
    calls = []
    real = A._flex
    monkeypatch.setattr(A, "_flex", lambda *args: calls.append(1) or real(*args))
    flex = bagel_engine.load(MODEL_DIR, device="cpu", attention="flex")
    plain = bagel_engine.load(MODEL_DIR, device="cpu")
    plain.chat("hello", max_new_tokens=3)
    assert not calls
    flex.chat("hello", max_new_tokens=3)
    assert calls
    assert A.get_backend() == "auto"
