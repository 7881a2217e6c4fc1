"""Parity with the official code: every case of tests/data/tiny-v1/cases.json, with the tolerances
of its README, checking intermediate tensors too so that a failure says where."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bagel_engine
from golden import (MODEL_DIR, assert_close, assert_uint8_close, cases, image_cases, inputs, tensors)


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu", dtype="float32")


_runs: dict = {}


def run_case(pipe, name: str):
    if name not in _runs:
        case = cases()[name]
        trace: dict = {}
        out = pipe.interleave(inputs(name), seed=case["seed"], trace=trace, **case["params"])
        _runs[name] = (out, trace)
    return _runs[name]


@pytest.mark.parametrize("name", sorted(cases()))
def test_output_text_and_image(pipe, name):
    out, _ = run_case(pipe, name)
    g = tensors(name)
    expected = cases()[name]["outputs"]
    texts = [o["text"] for o in expected if o["type"] == "text"]
    assert out.text == (texts[0] if texts else None)
    if any(o["type"] == "image" for o in expected):
        actual = torch.from_numpy(np.array(out.image))
        assert_uint8_close(actual, g["gen_image0.image_uint8"], what="image_uint8")
        assert_close(out.latents, g["gen_image0.decode_input"][0], atol=1e-3, what="latents (decode_input)")
    else:
        assert out.image is None


@pytest.mark.parametrize("name", sorted(cases()))
def test_text_segments_and_tokens(pipe, name):
    """Every text segment fed (framing, tokenization) and, where text was generated, tokens and logits."""
    _, trace = run_case(pipe, name)
    g = tensors(name)
    golden_ids = [g[k].tolist() for k in sorted((k for k in g if k.endswith(".text.packed_text_ids")),
                                               key=lambda k: int(k.split(".")[0][6:]))]
    unique_golden = list(dict.fromkeys(tuple(x) for x in golden_ids))  # the reference recomputes duplicates
    assert list(dict.fromkeys(tuple(x) for x in trace["text_ids"])) == unique_golden
    if "gen_text0.tokens" in g:
        assert torch.stack(trace["logits"]).shape == g["gen_text0.logits"].shape
        assert_close(torch.stack(trace["logits"]), g["gen_text0.logits"], atol=1e-4, what="logits")


@pytest.mark.parametrize("name", sorted(cases()))
def test_kv_caches(pipe, name):
    _, trace = run_case(pipe, name)
    g = tensors(name)
    keys = [k for k in g if ".kv." in k]
    if not keys:
        pytest.skip("this case records no KV cache")
    ctxs = trace["contexts"]
    for k in keys:
        call, _, ctx_name, layer, kind = k.split(".")
        ctx = ctxs["gen" if ctx_name in ("gen", "ctx0") else ctx_name]
        kv = ctx.kv[int(layer.removeprefix("layer"))]
        assert_close(kv[0 if kind == "key" else 1], g[k], atol=1e-4, rtol=1e-4, what=k)


def test_vit_and_vae_intermediates(pipe):
    for name in ("img2img", "img2text"):
        _, trace = run_case(pipe, name)
        g = tensors(name)
        assert_close(trace["vit_llm_embeds"][0], g["update0.vit.llm_embeds"], atol=1e-4, rtol=1e-4,
                     what=f"{name} ViT llm_embeds")
    _, trace = run_case(pipe, "img2img")
    assert_close(trace["vae_latents"][0], tensors("img2img")["update0.vae.latent"][0], atol=1e-4, rtol=1e-4,
                 what="VAE posterior sample")


@pytest.mark.parametrize("name", image_cases())
def test_denoising_steps(pipe, name):
    """Per-step branch velocities, combined velocity and latents; the initial noise from the seed."""
    _, trace = run_case(pipe, name)
    g = tensors(name)
    steps = trace["steps"]
    assert torch.tensor([s["t"] for s in steps]).allclose(g["gen_image0.timesteps"])
    assert_close(steps[0]["x_t"], g["gen_image0.input.packed_init_noises"], atol=0, what="initial noise")
    golden_steps = cases()[name]["trace"][-1]["steps"]
    for k, (ours, theirs) in enumerate(zip(steps, golden_steps, strict=True)):
        for branch, key in (("v_cfg_text", "v_text"), ("v_cfg_img", "v_img")):
            if branch in theirs["branches"] and f"gen_image0.step{k}.{branch}" in g:
                assert key in ours, f"step {k}: the {branch} branch did not run"
                assert_close(ours[key], g[f"gen_image0.step{k}.{branch}"], atol=1e-3, what=f"step {k} {branch}")
        assert_close(ours["v_cond"], g[f"gen_image0.step{k}.v_cond"], atol=1e-3, what=f"step {k} v_cond")
        assert_close(ours["v"], g[f"gen_image0.step{k}.v"], atol=1e-3, what=f"step {k} v")
        if k >= 1:
            assert_close(ours["x_t"], g[f"gen_image0.step{k}.x_t"], atol=1e-3, what=f"step {k} x_t")
    assert_close(trace["decode_output"], g["gen_image0.decode_output"], atol=1e-3, what="decode_output")


@pytest.mark.parametrize("name", image_cases())
def test_noise_injection_equals_seeded_draw(pipe, name):
    """noise= (latent layout) reproduces the image that the seed draws."""
    case = cases()[name]
    if any(i["type"] == "image" for i in case["inputs"]):
        pytest.skip("edits also draw the posterior sample from the seed")
    out, _ = run_case(pipe, name)
    from bagel_engine.runtime.image_transforms import unpatchify_latent

    noise_tokens = tensors(name)["gen_image0.input.packed_init_noises"]
    c = pipe.config
    h, w = out.latents.shape[1] // 2, out.latents.shape[2] // 2
    noise = unpatchify_latent(noise_tokens, h, w, c.bagel.latent_patch_size, c.vae.z_channels)
    again = pipe.interleave(inputs(name), seed=12345, noise=noise, **case["params"])
    assert torch.equal(again.latents, out.latents)


def test_official_numerics_mode_matches_golden():
    """official_numerics keeps the VAE and the Euler update on the CPU in float32 (the official
    app's placement); on a CPU in float32 both modes give the golden numbers."""
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", official_numerics=True)
    assert pipe.latent_device.type == "cpu" and pipe.vae_device.type == "cpu" and pipe.vae.dtype == torch.float32
    case = cases()["img2img"]
    out = pipe.interleave(inputs("img2img"), seed=case["seed"], **case["params"])
    g = tensors("img2img")
    assert_close(out.latents, g["gen_image0.decode_input"][0], atol=1e-3, what="latents")
    assert_uint8_close(torch.from_numpy(np.array(out.image)), g["gen_image0.image_uint8"], what="image")
