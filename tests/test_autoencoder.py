"""Tests of the FLUX autoencoder (bagel_engine.model.autoencoder) against the tiny-v1 golden vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_engine.model.autoencoder import AutoEncoder
from bagel_engine.weights.config import VAEConfig

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny-v1"
IMAGE_CASES = ["text2img", "img2img", "text2img_channel", "think_text2img"]


def _tiny_config() -> VAEConfig:
    raw = json.loads((TINY / "model" / "ae_config.json").read_text())
    raw.pop("downsample")  # derived from ch_mult
    raw["ch_mult"] = tuple(raw["ch_mult"])
    cfg = VAEConfig(**raw)
    assert cfg.downsample == 2
    return cfg


@pytest.fixture(scope="module")
def tiny_ae() -> AutoEncoder:
    ae = AutoEncoder(_tiny_config())
    ae.load_state_dict(load_file(TINY / "model" / "ae.safetensors"), strict=True)
    return ae.eval()


def _tensors(case: str) -> dict[str, torch.Tensor]:
    return load_file(TINY / "tensors" / f"{case}.safetensors")


def _to_uint8(y: torch.Tensor) -> torch.Tensor:
    """The reference's conversion: (B,3,H,W) -> (H,W,3) with truncation, not rounding."""
    return ((y[0] * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0).to(torch.uint8)


def test_full_size_state_dict_matches_manifest():
    manifest = json.loads((DATA / "bagel-7b-mot" / "manifest.json").read_text())["ae.safetensors"]
    with torch.device("meta"):
        ae = AutoEncoder(VAEConfig())
    shapes = {k: list(v.shape) for k, v in ae.state_dict().items()}
    assert shapes == manifest["shapes"]
    assert len(shapes) == 244
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683


def test_tiny_state_dict_matches_checkpoint():
    sd = load_file(TINY / "model" / "ae.safetensors")
    with torch.device("meta"):
        ae = AutoEncoder(_tiny_config())
    assert {k: tuple(v.shape) for k, v in ae.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_encode_img2img(tiny_ae: AutoEncoder):
    t = _tensors("img2img")
    with torch.no_grad():
        moments = tiny_ae.encode_moments(t["update0.vae.padded_images"])
    torch.testing.assert_close(moments, t["update0.vae.moments"], atol=1e-4, rtol=1e-4)

    # Feed the golden moments so the latent checks isolate the posterior math.
    gm = t["update0.vae.moments"]
    latent = tiny_ae.latent_from_moments(gm, eps=t["update0.vae.posterior_eps"])
    torch.testing.assert_close(latent, t["update0.vae.latent"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny_ae.latent_from_moments(gm), t["update0.vae.latent_mean"], atol=1e-5, rtol=1e-5)
    # And end to end through the encoder.
    with torch.no_grad():
        latent = tiny_ae.encode(t["update0.vae.padded_images"], eps=t["update0.vae.posterior_eps"])
    torch.testing.assert_close(latent, t["update0.vae.latent"], atol=1e-4, rtol=1e-4)


def test_latent_from_moments_rejects_bad_eps(tiny_ae: AutoEncoder):
    with pytest.raises(ValueError):
        tiny_ae.latent_from_moments(torch.zeros(1, 32, 4, 4), eps=torch.zeros(1, 32, 4, 4))


def test_logvar_is_not_clamped(tiny_ae: AutoEncoder):
    # The official DiagonalGaussian does not clamp logvar (diffusers' version clamps to [-30, 20]).
    moments = torch.cat([torch.zeros(1, 16, 1, 1), torch.full((1, 16, 1, 1), 30.0)], dim=1)
    z = tiny_ae.latent_from_moments(moments, eps=torch.ones(1, 16, 1, 1))
    expected = tiny_ae.scale_factor * (torch.exp(torch.tensor(15.0)) - tiny_ae.shift_factor)
    torch.testing.assert_close(z, expected.expand_as(z))


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_decode(tiny_ae: AutoEncoder, case: str):
    t = _tensors(case)
    with torch.no_grad():
        y = tiny_ae.decode(t["gen_image0.decode_input"])
    torch.testing.assert_close(y, t["gen_image0.decode_output"], atol=1e-3, rtol=0)

    img = _to_uint8(y)
    golden = t["gen_image0.image_uint8"]
    assert img.shape == golden.shape
    diff = (img.int() - golden.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() <= 0.005


def test_bf16_close_to_fp32_golden():
    ae = AutoEncoder(_tiny_config())
    ae.load_state_dict(load_file(TINY / "model" / "ae.safetensors"), strict=True)
    ae = ae.eval().to(torch.bfloat16)
    t = _tensors("text2img")
    golden = t["gen_image0.decode_output"]  # std ~0.6, max |y| ~2.4
    with torch.no_grad():
        y = ae.decode(t["gen_image0.decode_input"])  # fp32 latent in, cast inside
    assert y.dtype == torch.bfloat16
    drift = (y.float() - golden).abs()
    print(f"bf16 decode: max |drift| {drift.max().item():.4g}, mean {drift.mean().item():.4g}")
    # Measured: max ~0.023, mean ~0.004. Bounds leave ~3x margin but are far below the output std.
    assert drift.max().item() < 0.08
    assert drift.mean().item() < 0.012

    t = _tensors("img2img")
    golden = t["update0.vae.moments"]  # std ~1.2, max |m| ~7
    with torch.no_grad():
        m = ae.encode_moments(t["update0.vae.padded_images"])
    assert m.dtype == torch.bfloat16
    drift = (m.float() - golden).abs()
    print(f"bf16 encode: max |drift| {drift.max().item():.4g}, mean {drift.mean().item():.4g}")
    # Measured: max ~0.14 (on values up to ~7), mean ~0.008; the moments' std is ~1.2.
    assert drift.max().item() < 0.4
    assert drift.mean().item() < 0.025
