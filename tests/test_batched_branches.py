"""The guidance branches of a step run in ONE batched forward over per-branch KV buffers; here each
branch is recomputed on its own (one forward per branch against its context, as the official loop
does) and must give the same velocities to float tolerance, step after step."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import bagel_engine
from bagel_engine.runtime import image_transforms as T
from bagel_engine.runtime.context import block_routing, wrap_with_markers
from golden import GOLDEN, MODEL_DIR


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu")


def separate_velocity(pipe, ctx, x_t, t, grid):
    m, s = pipe.model, pipe.tokenizer.special
    n = x_t.shape[0]
    pos = T.grid_position_ids(*grid, pipe.config.bagel.max_latent_size)
    body = m.embed_latents(x_t, m.time_embedder(torch.tensor([t])), m.latent_pos_embed(pos))
    x = wrap_with_markers(m, body, s.start_of_image, s.end_of_image)
    hidden, _ = m.decoder.extend(x, torch.full((n + 2,), ctx.rope), ctx.kv, False, block_routing(n, "cpu"))
    return m.velocity(hidden[1:-1])


@torch.no_grad()
@pytest.mark.parametrize("task", ["edit", "t2i"])
def test_batched_branches_equal_separate_forwards(pipe, task):
    trace: dict = {}
    if task == "edit":
        photo = Image.open(GOLDEN / "inputs" / "image_a.png")
        out = pipe.interleave([photo, "make it blue"], cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                              num_timesteps=5, seed=3, trace=trace)
    else:
        out = pipe.interleave(["a red house by a lake"], cfg_text_scale=4.0, cfg_img_scale=1.0,
                              cfg_interval=(0.0, 1.0), num_timesteps=5, seed=3, image_shapes=(32, 32), trace=trace)
    p = pipe.config.bagel.latent_patch_size
    grid = (out.latents.shape[1] // p, out.latents.shape[2] // p)
    contexts = trace["contexts"]
    branches = {"v_cond": contexts["gen"], "v_text": contexts["cfg_text"], "v_img": contexts["cfg_img"]}
    checked = set()
    for k, step in enumerate(trace["steps"]):
        for key, ctx in branches.items():
            if key not in step:
                continue
            expected = separate_velocity(pipe, ctx, step["x_t"], step["t"], grid)
            torch.testing.assert_close(step[key], expected, atol=2e-5, rtol=1e-4, msg=f"step {k} {key}")
            checked.add(key)
    assert checked == ({"v_cond", "v_text", "v_img"} if task == "edit" else {"v_cond", "v_text"})
