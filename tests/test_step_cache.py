"""TaylorSeer step caching (the official `enable_taylorseer`): schedule, extrapolation, and its
effect on the image (printed with `pytest -s`)."""

from __future__ import annotations

import pytest
import torch

import bagel_engine
from bagel_engine.runtime.step_cache import TaylorSeerState
from golden import MODEL_DIR


def test_official_schedule():
    state, full = TaylorSeerState(), []
    for k in range(20):
        if state.next_is_full():
            full.append(k)
            state.record(torch.zeros(1))
        state.advance()
    assert full == [0, 1, 2, 3, 4, 7, 10, 13, 16, 19]


def test_linear_features_are_extrapolated_exactly():
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    state = TaylorSeerState()
    for k in range(12):
        feature = a + b * k
        if state.next_is_full():
            state.record(feature)
            assert len(state.factors) == (1 if k <= 3 else min(2 + (k - 4) // 3, 7))
        else:
            assert torch.allclose(state.predict(), feature)
        state.advance()


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu", dtype="float32")


def test_pipeline_skips_forwards_and_stays_close(pipe):
    kw = dict(image_shapes=(32, 32), seed=1, num_timesteps=16, cfg_interval=(0.4, 1.0), cfg_img_scale=1.5)
    plain, cached = {}, {}
    a = pipe.interleave(["a lake at dawn"], trace=plain, **kw)
    b = pipe.interleave(["a lake at dawn"], enable_taylorseer=True, trace=cached, **kw)
    assert [s["forwards"] for s in cached["steps"]] == [2, 2, 2, 2, 2, 0, 0, 2, 0, 0, 2, 0, 0, 1, 0]
    for k in range(5):  # identical until the first Taylor step
        assert torch.equal(plain["steps"][k]["v"], cached["steps"][k]["v"])
    cos = float(torch.nn.functional.cosine_similarity(a.latents.flatten(), b.latents.flatten(), dim=0))
    print(f"\nTaylorSeer, 16 steps: {sum(s['forwards'] for s in cached['steps'])} forwards instead of "
          f"{sum(s['forwards'] for s in plain['steps'])}; latent cosine to uncached {cos:.4f}")
    assert 0.95 < cos < 1.0
    c = pipe.interleave(["a lake at dawn"], **kw)  # no state leaks into the next call
    assert torch.equal(a.latents, c.latents)


def test_branches_with_other_step_counts_are_not_merged(pipe):
    """With guidance only in the middle of the schedule, the image-unconditional branch (equal
    context to the conditional one) counts other steps, so it runs separately, as officially."""
    trace: dict = {}
    pipe.interleave(["a lake"], image_shapes=(32, 32), seed=1, num_timesteps=16, cfg_interval=(0.2, 0.8),
                    cfg_img_scale=1.5, enable_taylorseer=True, trace=trace)
    assert max(s["forwards"] for s in trace["steps"]) == 3
