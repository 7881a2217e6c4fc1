"""Image transforms: size rule, PIL/tensor conversions, patchify and position ids, against the
official size table (spec 7.9) and the tiny-v1 golden tensors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bagel_engine.params import BagelInputError
from bagel_engine.runtime.image_transforms import (
    check_image,
    grid_position_ids,
    image_to_tensor,
    patchify_image,
    patchify_latent,
    resize_image,
    resize_size,
    tensor_to_image,
    to_rgb,
    unpatchify_latent,
)
from bagel_engine.weights.config import load_model_config

TINY = Path(__file__).parent / "data" / "tiny-v1"

# Spec 7.9: input W x H -> VAE (1024/512/16) -> ViT (980/224/14), with token counts.
OFFICIAL_TABLE = [
    ((1024, 1024), (1024, 1024), 4096, (980, 980), 4900),
    ((768, 1024), (768, 1024), 3072, (728, 980), 3640),
    ((1920, 1080), (1024, 576), 2304, (980, 546), 2730),
    ((4000, 3000), (1024, 768), 3072, (980, 728), 3640),
    ((256, 320), (512, 640), 1280, (518, 644), 1702),
    ((640, 480), (688, 512), 1376, (686, 518), 1813),
    ((1000, 1000), (992, 992), 3844, (980, 980), 4900),
    ((4096, 1024), (1024, 256), 1024, (980, 252), 1260),
]


@pytest.mark.parametrize("inp, vae, n_latent, vit, n_vit", OFFICIAL_TABLE)
def test_resize_size_official_table(inp, vae, n_latent, vit, n_vit):
    assert resize_size(*inp, 1024, 512, 16) == vae
    assert (vae[0] // 16) * (vae[1] // 16) == n_latent
    assert resize_size(*vae, 980, 224, 14) == vit
    assert (vit[0] // 14) * (vit[1] // 14) == n_vit


def test_resize_size_rechecks():
    # Python round is half-to-even: 1000/16 = 62.5 -> 62.
    assert resize_size(1000, 1000, 1024, 512, 16) == (992, 992)
    # Area re-check: 2002x2002 > max_pixels; the sides are scaled by the AREA ratio 0.4507
    # (902.3 -> 902 -> 64*14 = 896), not its square root.
    assert resize_size(2000, 2000, 2000, 100, 14) == (896, 896)
    # Extreme aspect: min-side upscale gives 8192x512; area check gives 3520x224 (220.5 rounds to 220);
    # the long side is still > 1024, so it is scaled again: 1024 x round(65.2)=65 -> 64.
    assert resize_size(4096, 256, 1024, 512, 16) == (1024, 64)
    # Never below one stride.
    assert resize_size(5000, 10, 64, 4, 16) == (64, 16)
    with pytest.raises(ValueError):
        resize_size(0, 10, 64, 32, 4)


def test_resize_image_noop_and_bicubic():
    img = Image.new("RGB", (64, 48), (10, 20, 30))
    assert resize_image(img, 64, 32, 4) is img
    img2 = Image.linear_gradient("L").convert("RGB").resize((80, 60))
    out = resize_image(img2, 64, 32, 4)
    assert out.size == (64, 48)
    assert out.tobytes() == img2.resize((64, 48), Image.Resampling.BICUBIC).tobytes()


def _case(name: str) -> dict:
    cases = json.loads((TINY / "cases.json").read_text())["cases"]
    return next(c for c in cases if c["name"] == name)


def _golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "tensors" / f"{name}.safetensors"))


def _input_image(case: dict) -> Image.Image:
    path = next(i["path"] for i in case["inputs"] if i["type"] == "image")
    return to_rgb(Image.open(TINY / path))


def _vit_stream(vae_img: Image.Image, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vit_img = resize_image(vae_img, *cfg.bagel.vit_transform)
    t = image_to_tensor(vit_img)
    p = cfg.vit.patch_size
    ids = grid_position_ids(t.shape[1] // p, t.shape[2] // p, cfg.bagel.vit_max_num_patch_per_side)
    return t, patchify_image(t, p), ids


@pytest.mark.parametrize("name", ["img2img", "img2text"])
def test_golden_vit_inputs(name):
    cfg = load_model_config(TINY / "model")
    g = _golden(name)
    vae_img = resize_image(_input_image(_case(name)), *cfg.bagel.vae_transform)
    t, tokens, ids = _vit_stream(vae_img, cfg)
    torch.testing.assert_close(t, g["update0.vit.image_tensor"], atol=1e-6, rtol=0)
    assert torch.equal(tokens, g["update0.vit.packed_vit_tokens"])
    assert torch.equal(ids, g["update0.vit.packed_vit_position_ids"])


def test_golden_vae_inputs():
    cfg = load_model_config(TINY / "model")
    g = _golden("img2img")
    vae_img = resize_image(_input_image(_case("img2img")), *cfg.bagel.vae_transform)
    t = image_to_tensor(vae_img)
    torch.testing.assert_close(t[None], g["update0.vae.padded_images"], atol=1e-6, rtol=0)
    ds = cfg.latent_downsample
    ids = grid_position_ids(t.shape[1] // ds, t.shape[2] // ds, cfg.bagel.max_latent_size)
    assert torch.equal(ids, g["update0.vae.packed_vae_position_ids"])


def test_image_tensor_roundtrip():
    img = Image.effect_noise((20, 12), 60).convert("RGB")
    t = image_to_tensor(img)
    assert t.shape == (3, 12, 20) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    # float rounding plus truncation may lose one level (e.g. 22.99999 -> 22), never more
    back = torch.frombuffer(bytearray(tensor_to_image(t).tobytes()), dtype=torch.uint8).int()
    orig = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).int()
    assert ((orig - back) >= 0).all() and ((orig - back) <= 1).all()


def test_tensor_to_image_truncates():
    x = torch.full((3, 1, 1), 0.999)  # (0.999*0.5+0.5)*255 = 254.87 -> 254, not 255
    assert tensor_to_image(x).getpixel((0, 0)) == (254, 254, 254)
    assert tensor_to_image(torch.full((1, 3, 1, 1), 5.0)).getpixel((0, 0)) == (255, 255, 255)


def test_patchify_image_layout():
    t = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    tok = patchify_image(t, 2)
    assert tok.shape == (6, 12)
    # token (row 1, col 2) -> index 1*3+2; entry (p=1, q=0, c=2) -> (1*2+0)*3+2
    assert tok[5, 8] == t[2, 1 * 2 + 1, 2 * 2 + 0]
    with pytest.raises(ValueError):
        patchify_image(t, 5)


def test_latent_patchify_roundtrip():
    z = torch.randn(16, 6, 10)
    tok = patchify_latent(z, 2)
    assert tok.shape == (15, 64)
    # channel fastest inside the patch: first token = z[:, 0:2, 0:2] in (p, q, c) order
    assert torch.equal(tok[0], z[:, 0:2, 0:2].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify_latent(tok, 3, 5, 2, 16), z)


def test_grid_position_ids():
    assert grid_position_ids(2, 3, 10).tolist() == [0, 1, 2, 10, 11, 12]
    assert grid_position_ids(2, 3, 10).dtype == torch.long
    with pytest.raises(ValueError):
        grid_position_ids(2, 11, 10)


def test_to_rgb_rgba_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 0, 128)])
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert all(126 <= v <= 128 for v in out.getpixel((2, 0)))


def test_to_rgb_palette_transparency_and_plain():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)
    p.putdata([0, 1])
    p.info["transparency"] = 1
    out = to_rgb(p)
    assert (out.getpixel((0, 0)), out.getpixel((1, 0))) == ((0, 0, 255), (255, 255, 255))
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)
    # Official pil_img2rgb: LA has no "transparency" entry, so its alpha is dropped, not composited.
    assert to_rgb(Image.new("LA", (1, 1), (10, 0))).getpixel((0, 0)) == (10, 10, 10)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_check_image_sources(tmp_path):
    data = _png_bytes()
    f = tmp_path / "ok.png"
    f.write_bytes(data)
    for src in (f, str(f), data):
        img = check_image(src)
        assert img.size == (8, 8) and img.getpixel((0, 0)) == (1, 2, 3)
    pil = Image.new("RGB", (2, 2))
    assert check_image(pil) is pil


def test_check_image_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(BagelInputError, match="is not an image"):
        check_image(bad)
    truncated = tmp_path / "trunc.png"
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BagelInputError):
        check_image(truncated)
    with pytest.raises(BagelInputError, match="not found"):
        check_image(tmp_path / "missing.png")
    with pytest.raises(BagelInputError, match="directory"):
        check_image(tmp_path)
    with pytest.raises(BagelInputError, match="empty"):
        check_image(b"")
    with pytest.raises(BagelInputError):
        check_image(123)
