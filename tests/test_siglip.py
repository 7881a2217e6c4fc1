"""SigLIP NaViT encoder: golden outputs of the tiny model, packing, dtypes and the real key layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_engine.model.siglip import SiglipVisionModel
from bagel_engine.weights.config import vit_config_from_json

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny-v1"
PREFIX = "vit_model."


@pytest.fixture(scope="module")
def tiny_vit() -> SiglipVisionModel:
    cfg = vit_config_from_json(json.loads((TINY / "model" / "vit_config.json").read_text()))
    model = SiglipVisionModel(cfg).eval()
    ema = load_file(str(TINY / "model" / "ema.safetensors"))
    model.load_state_dict({k[len(PREFIX):]: v for k, v in ema.items() if k.startswith(PREFIX)}, strict=True)
    return model


def _golden(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "tensors" / f"{name}.safetensors"))


@pytest.mark.parametrize("name", ["img2img", "img2text"])
def test_golden_vit_out(tiny_vit, name):
    g = _golden(name)
    tokens = g["update0.vit.packed_vit_tokens"]
    ids = g["update0.vit.packed_vit_position_ids"]
    seqlens = g["update0.vit.vit_token_seqlens"].tolist()
    with torch.no_grad():
        out = tiny_vit(tokens, ids, seqlens)
    torch.testing.assert_close(out, g["update0.vit.vit_out"], atol=1e-4, rtol=1e-4)


def test_packed_images_match_separate_calls(tiny_vit):
    g = _golden("img2img")
    tok_a, ids_a = g["update0.vit.packed_vit_tokens"], g["update0.vit.packed_vit_position_ids"]
    torch.manual_seed(0)
    tok_b = torch.rand(6, tok_a.shape[1]) * 2 - 1
    ids_b = torch.tensor([0, 1, 2, 10, 11, 12])  # a 2x3 grid
    with torch.no_grad():
        out_a = tiny_vit(tok_a, ids_a, [len(tok_a)])
        out_b = tiny_vit(tok_b, ids_b, [6])
        packed = tiny_vit(torch.cat([tok_a, tok_b]), torch.cat([ids_a, ids_b]), [len(tok_a), 6])
    torch.testing.assert_close(packed, torch.cat([out_a, out_b]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        tiny_vit(tok_a, ids_a, [len(tok_a) - 1])


def test_images_of_one_size_run_as_one_batch_with_the_separate_numbers(tiny_vit):
    """Images of one size take the batched attention path: the same outputs and gradients as one image at a time."""
    torch.manual_seed(1)
    ids = torch.tensor([0, 1, 2, 10, 11, 12])
    tokens = [torch.rand(6, tiny_vit.vision_model.embeddings.patch_embedding.weight[0].numel()) * 2 - 1 for _ in range(3)]
    packed_in = torch.cat(tokens).requires_grad_()
    packed = tiny_vit(packed_in, ids.repeat(3), [6, 6, 6])
    packed.square().sum().backward()
    for i, tok in enumerate(tokens):
        alone_in = tok.clone().requires_grad_()
        alone = tiny_vit(alone_in, ids, [6])
        alone.square().sum().backward()
        torch.testing.assert_close(packed[6 * i:6 * i + 6], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_in.grad[6 * i:6 * i + 6], alone_in.grad, atol=1e-5, rtol=1e-5)


def test_bfloat16(tiny_vit):
    g = _golden("img2text")
    tokens, ids = g["update0.vit.packed_vit_tokens"], g["update0.vit.packed_vit_position_ids"]
    bf16 = SiglipVisionModel(tiny_vit.cfg).to(torch.bfloat16).eval()
    bf16.load_state_dict(tiny_vit.state_dict())
    with torch.no_grad():
        out = bf16(tokens, ids, [len(tokens)])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), g["update0.vit.vit_out"], atol=0.1, rtol=0.05)


def test_real_config_state_dict_layout():
    cfg = vit_config_from_json(json.loads((DATA / "bagel-7b-mot" / "vit_config.json").read_text()))
    assert cfg.num_hidden_layers == 26
    with torch.device("meta"):
        model = SiglipVisionModel(cfg)
    ours = {PREFIX + k: list(v.shape) for k, v in model.state_dict().items()}
    shapes = json.loads((DATA / "bagel-7b-mot" / "manifest.json").read_text())["ema.safetensors"]["shapes"]
    expected = {k: list(v) for k, v in shapes.items() if k.startswith(PREFIX)}
    assert ours == expected
