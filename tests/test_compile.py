"""torch.compile of the denoising and decoding steps gives the eager numbers (float tolerance).
Compiling takes tens of seconds on a small CPU."""

from __future__ import annotations

import torch

import bagel_engine
from golden import MODEL_DIR


def test_compiled_equals_eager():
    pipe = bagel_engine.load(MODEL_DIR, device="cpu")
    eager_img = pipe.generate("a lake", height=32, width=32, seed=1, num_timesteps=4)
    eager_txt = pipe.chat("hello there", max_new_tokens=6)
    pipe.compile()
    img = pipe.generate("a lake", height=32, width=32, seed=1, num_timesteps=4)
    txt = pipe.chat("hello there", max_new_tokens=6)
    assert torch.allclose(img.latents, eager_img.latents, atol=1e-4, rtol=1e-4)
    assert txt.text == eager_txt.text
