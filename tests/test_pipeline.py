"""The public API beyond the golden cases: task methods, several input images, guidance-branch
dedup, seeds, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from PIL import Image

import bagel_engine
from bagel_engine import BagelInputError
from bagel_engine.params import ImageParams
from bagel_engine.runtime.image_generation import GuidanceContexts, denoise
from golden import GOLDEN, MODEL_DIR

FAST = dict(num_timesteps=4)


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def photo():
    return Image.open(GOLDEN / "inputs" / "image_a.png")


def test_duplicate_guidance_branch_is_computed_once(pipe):
    """Text to image with cfg_img_scale > 1: the image-unconditional context equals the full one, so
    its forward is skipped, and the numbers equal those of running it."""
    trace: dict = {}
    out = pipe.interleave(["a lake"], image_shapes=(32, 32), seed=3, cfg_text_scale=4.0, cfg_img_scale=1.5,
                          cfg_interval=(0.0, 1.0), num_timesteps=4, trace=trace)
    assert [s["forwards"] for s in trace["steps"]] == [2, 2, 2]  # 3 branches wanted, 2 distinct
    ctx = trace["contexts"]
    assert ctx["cfg_img"].history == ctx["gen"].history
    # Force the duplicate forward by giving the copy another identity, and compare.
    forced = GuidanceContexts(ctx["gen"], ctx["cfg_text"], dataclasses.replace(ctx["cfg_img"], history=("copy",)))
    trace2: dict = {}
    params = ImageParams(4.0, 1.5, (0.0, 1.0), "global", 0.0, 3.0, 4)
    noise = trace["steps"][0]["x_t"]
    latent = denoise(pipe.model, pipe.tokenizer.special, forced, (8, 8), noise, params, pipe.device, trace=trace2)
    assert [s["forwards"] for s in trace2["steps"]] == [3, 3, 3]
    # Same numbers up to float rounding (a batch of 3 blocks may take other kernels than a batch of 2).
    for ours, full in zip(trace["steps"], trace2["steps"]):
        assert torch.allclose(ours["v_img"], full["v_img"], atol=1e-4, rtol=1e-4)
        assert torch.allclose(ours["v"], full["v"], atol=1e-4, rtol=1e-4)
    assert torch.allclose(latent, _tokens(out.latents), atol=1e-4, rtol=1e-4)


def _tokens(latents):
    from bagel_engine.runtime.image_transforms import patchify_latent

    return patchify_latent(latents, 2)


def test_branches_skipped_outside_interval(pipe):
    trace: dict = {}
    pipe.interleave(["a lake"], image_shapes=(32, 32), seed=3, cfg_text_scale=4.0, cfg_img_scale=1.0,
                    cfg_interval=(0.6, 1.0), num_timesteps=5, timestep_shift=1.0, trace=trace)
    # t = 1.0, 0.75 inside (0.6, 1]; 0.5, 0.25 outside: one forward only.
    assert [s["forwards"] for s in trace["steps"]] == [2, 2, 1, 1]


def test_multi_image_edit_uses_last_image_size_and_contexts(pipe, photo):
    small = photo.resize((40, 40))
    trace: dict = {}
    out = pipe.interleave([photo, small, "make it green"], seed=1, cfg_text_scale=4.0, cfg_img_scale=2.0,
                          cfg_interval=(0.0, 1.0), num_timesteps=3, trace=trace)
    assert out.image.size == (40, 40)  # the last image's VAE-resized size (40 is within 32..64, stride 4)
    kinds = lambda c: [k[0] for k in c.history]
    assert kinds(trace["contexts"]["gen"]) == ["vae", "vit", "vae", "vit", "text"]
    assert kinds(trace["contexts"]["cfg_text"]) == ["vae", "vit", "vae", "vit"]
    assert kinds(trace["contexts"]["cfg_img"]) == ["text"]
    assert trace["steps"][0]["forwards"] == 3


def test_task_methods(pipe, photo):
    g = pipe.generate("a red square", height=32, width=48, seed=7, **FAST)
    assert g.image.size == (48, 32) and g.latents.shape == (16, 16, 24) and g.text is None
    assert g.params["cfg_img_scale"] == 1.5 and g.params["cfg_renorm_type"] == "global"
    e = pipe.edit(photo, "make it blue", seed=7, **FAST)
    assert e.image.size == (64, 48) and e.params  # 80x60 resized by the VAE transform (max side 64)["cfg_renorm_type"] == "text_channel"
    assert e.params["cfg_interval"] == (0.0, 1.0)
    u = pipe.understand([photo], "what is this?", max_new_tokens=5)
    assert isinstance(u.text, str) and u.image is None and u.timings["tokens"] <= 4
    c = pipe.chat("hello", max_new_tokens=5)
    assert isinstance(c.text, str)
    t = pipe.generate("a red square", height=32, width=32, seed=7, think=True, max_think_token_n=6, **FAST)
    assert isinstance(t.text, str) and t.image is not None


def test_seed_reproduces_and_differs(pipe):
    a = pipe.generate("a cat", height=32, width=32, seed=11, **FAST)
    b = pipe.generate("a cat", height=32, width=32, seed=11, **FAST)
    c = pipe.generate("a cat", height=32, width=32, seed=12, **FAST)
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)
    d = pipe.generate("a cat", height=32, width=32, **FAST)
    assert isinstance(d.seed, int)
    again = pipe.generate("a cat", height=32, width=32, seed=d.seed, **FAST)
    assert torch.equal(d.latents, again.latents)


def test_sampling_with_temperature_is_seeded(pipe):
    a = pipe.chat("tell me", do_sample=True, text_temperature=1.0, seed=5, max_new_tokens=8)
    b = pipe.chat("tell me", do_sample=True, text_temperature=1.0, seed=5, max_new_tokens=8)
    assert a.text == b.text
    texts = {pipe.chat("tell me", do_sample=True, text_temperature=5.0, seed=s, max_new_tokens=8).text for s in range(4)}
    assert len(texts) > 1


def test_callback_reports_steps_and_can_cancel(pipe):
    seen = []
    pipe.generate("x", height=32, width=32, seed=1, num_timesteps=5, callback=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    class Cancelled(Exception):
        pass

    def cancel(i, n):
        raise Cancelled

    with pytest.raises(Cancelled):
        pipe.generate("x", height=32, width=32, seed=1, num_timesteps=5, callback=cancel)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=30, width=32), "height 30 is not supported: use a multiple of 4"),
        (dict(height=32, width=200), "width 200 is not supported"),
        (dict(height=32, width=32, cfg_renorm_type="local"), "unknown cfg_renorm_type 'local'"),
        (dict(height=32, width=32, num_timesteps=1), "num_timesteps must be an integer >= 2"),
        (dict(height=32, width=32, cfg_interval=(0.9, 0.1)), "cfg_interval low"),
        (dict(height=32, width=32, cfg_renorm_min=2.0), "cfg_renorm_min must be in"),
        (dict(height=32, width=32, guidance=3), "unknown parameter"),
    ],
)
def test_bad_generation_input(pipe, kwargs, match):
    with pytest.raises(BagelInputError, match=match):
        pipe.generate("a cat", **kwargs)


def test_bad_prompts_and_images(pipe, photo, tmp_path):
    with pytest.raises(BagelInputError, match="prompt must be a non-empty string"):
        pipe.generate("   ", height=32, width=32)
    with pytest.raises(BagelInputError, match="question must be a non-empty string"):
        pipe.understand(photo, "")
    with pytest.raises(BagelInputError, match="at least one input image"):
        pipe.edit([], "x")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BagelInputError, match="broken.png"):
        pipe.edit(bad, "x")
    with pytest.raises(BagelInputError):
        pipe.edit(b"garbage bytes", "x")
    with pytest.raises(BagelInputError, match="noise must have shape"):
        pipe.generate("x", height=32, width=32, noise=torch.zeros(16, 8, 8))


def test_images_as_paths_and_bytes(pipe, photo):
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    a = pipe.edit(GOLDEN / "inputs" / "image_a.png", "x", seed=2, **FAST)
    b = pipe.edit(buf.getvalue(), "x", seed=2, **FAST)
    c = pipe.edit(photo, "x", seed=2, **FAST)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.latents, c.latents)


def test_prompt_list_equals_one_by_one(pipe):
    """Several prompts denoised together (one batched forward per step) give each prompt's own image."""
    prompts = ["a red square", "a blue circle", "a red square"]
    outs = pipe.generate(prompts, height=32, width=32, seed=40, cfg_interval=(0.5, 1.0), **FAST)
    assert [o.seed for o in outs] == [40, 41, 42]
    for p, o in zip(prompts, outs):
        alone = pipe.generate(p, height=32, width=32, seed=o.seed, cfg_interval=(0.5, 1.0), **FAST)
        assert torch.allclose(o.latents, alone.latents, atol=1e-4, rtol=1e-4)
        assert o.image.size == (32, 32)
    assert not torch.allclose(outs[0].latents, outs[2].latents)  # same prompt, other seed


def test_prompt_list_batches_forwards(pipe):
    blocks = []
    n = (32 // pipe.config.latent_downsample) ** 2 + 2  # rows of one image block: markers + latents
    hook = pipe.model.decoder.register_forward_hook(lambda mod, args, out: blocks.append(args[0].shape[0] // n))
    try:
        outs = pipe.generate(["a", "b"], height=32, width=32, seed=1, cfg_text_scale=4.0, cfg_img_scale=1.0,
                             cfg_interval=(0.5, 1.0), timestep_shift=1.0, num_timesteps=5)
    finally:
        hook.remove()
    # one decoder forward per step for both images. t = 1, 0.75 guided: 2 images x (cond + text-uncond;
    # both text-unconds are the empty context but belong to different images) = 4 blocks; then 2 conditional.
    assert blocks[-4:] == [4, 4, 2, 2]
    assert len(outs) == 2


def test_prompt_list_errors(pipe):
    with pytest.raises(BagelInputError, match="2 seeds for 3 prompts"):
        pipe.generate(["a", "b", "c"], height=32, width=32, seed=[1, 2])
    with pytest.raises(BagelInputError, match="every prompt must be a non-empty string"):
        pipe.generate(["a", ""], height=32, width=32)
