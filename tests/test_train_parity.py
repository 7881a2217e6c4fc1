"""Fine-tuning parity with the official trainer (tests/data/train-v1, made by the official BAGEL code on the
tiny-v1 checkpoint; its README gives the samples, the cases and the tolerances).

The four samples are written as rows in our training formats (t2i, edit, understand, and a step-by-step
edit with ``steps``), read by our data path and packed by our packer in the same order. Then:

- every packed index and position tensor, and each sample's attention mask, equal the official ones exactly;
- the VAE inputs equal the official ones exactly; the ViT inputs differ by at most one uint8 level in some
  pixels (the same bicubic resize from the original image, a different Pillow build), so the losses and
  gradients are compared with the official ViT pixels fed in, and with the recorded posterior eps,
  timesteps and flow noise: per-token MSE and CE, the losses and five parameters' gradients within 1e-4
  relative.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bagel_engine
from bagel_engine.batch.reader import read_rows
from bagel_engine.train.data import row_sample
from bagel_engine.train.objective import training_losses
from bagel_engine.train.packing import SequencePacker
from bagel_engine.train.sample import Dropout
from golden import MODEL_DIR

DATA = Path(__file__).parent / "data" / "train-v1"
CASES = {c["name"]: c for c in json.loads((DATA / "cases.json").read_text())["cases"]}
TEXTS = json.loads((DATA / "cases.json").read_text())["texts"]
REL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The golden's four samples as rows of one JSONL file, through our reader and row plans."""
    folder = tmp_path_factory.mktemp("rows")
    a, b = str(DATA / "inputs" / "image_a.png"), str(DATA / "inputs" / "image_b.png")
    rows = [
        {"prompt": TEXTS["t2i_caption"], "image": a},
        {"instruction": TEXTS["edit_instruction"], "image": a, "output_image": b},
        {"image": b, "question": TEXTS["und_question"], "answer": TEXTS["und_answer"]},
        {"image": a, "steps": [{"instruction": TEXTS["chain_instruction_1"], "output_image": b},
                               {"instruction": TEXTS["chain_instruction_2"], "output_image": a}]},
    ]
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [row_sample(row) for row in read_rows(path)]


def pack(pipe, samples, case):
    p = case["cond_dropout_prob"]
    packer = SequencePacker(pipe.config, pipe.tokenizer,
                            lambda image, key: pipe.prepare_image(image, key, vit_from_original=True),
                            Dropout(p, p, p), random.Random(0))
    return packer.pack(samples)


def assert_close_rel(ours, theirs, what):
    scale = theirs.abs().max().clamp_min(1e-6)
    err = ((ours - theirs).abs().max() / scale).item()
    assert err <= REL, f"{what}: max error {err:.2e} of the largest value (tolerance {REL})"


@pytest.mark.parametrize("name", ["nodrop", "alldrop"])
def test_packing_equals_the_official_trainer(pipe, samples, name):
    case, g = CASES[name], load_file(DATA / "tensors" / f"{name}.safetensors")
    batch = pack(pipe, samples, case)
    assert batch.length == case["scalars"]["sequence_length"]
    assert batch.sample_lens == case["scalars"]["sample_lens"]
    exact = {
        "packed_text_ids": batch.text_ids, "packed_text_indexes": batch.text_indexes,
        "packed_position_ids": batch.position_ids, "packed_vit_token_indexes": batch.vit_indexes,
        "packed_vit_position_ids": batch.vit_position_ids, "vit_token_seqlens": torch.tensor(batch.vit_seqlens),
        "packed_vae_token_indexes": batch.vae_indexes, "packed_latent_position_ids": batch.latent_position_ids,
        "ce_loss_indexes": batch.ce_indexes, "packed_label_ids": batch.ce_labels,
    }
    for key, ours in exact.items():
        assert torch.equal(ours.long(), g[f"in.{key}"].long()), key
    # the official CE reweighting weights (len2weight, "square"): 1/sqrt(the answer's token count)
    assert torch.allclose(batch.ce_weights, g["in.ce_loss_weights"], rtol=0, atol=1e-7)
    sizes = [im.grid[0] * im.grid[1] for im in batch.vae_images]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    noised = torch.cat([batch.vae_indexes[starts[k]:starts[k + 1]] for k, im in enumerate(batch.vae_images) if im.target])
    assert torch.equal(noised, g["in.mse_loss_indexes"])
    assert [list(im.grid) for im in batch.vae_images] == case["scalars"]["patchified_vae_latent_shapes"]
    # clean images have time -inf in the official packing, noised ones their raw draw
    clean = torch.cat([torch.full((n,), not im.target) for n, im in zip(sizes, batch.vae_images)])
    assert torch.isinf(g["in.packed_timesteps"][clean]).all() and torch.isfinite(g["in.packed_timesteps"][~clean]).all()
    start = 0
    for i, n in enumerate(batch.sample_lens):
        idx = torch.arange(start, start + n)
        ours = batch.mask_mod()(None, None, idx[:, None], idx[None, :])
        assert torch.equal(ours, g[f"in.nested_attention_masks.{i}"].bool()), f"attention mask of sample {i}"
        start += n
    for k, im in enumerate(batch.vae_images):
        assert torch.equal(im.pixels, g["padded_images"][k][:, : im.pixels.shape[1], : im.pixels.shape[2]]), k
    vit = (batch.vit_patches - g["in.packed_vit_tokens"]).abs()
    assert vit.max() <= 2 / 255 + 1e-6, "ViT inputs differ by more than one uint8 level"


@pytest.mark.parametrize("name", ["nodrop", "alldrop"])
def test_losses_and_gradients_equal_the_official_trainer(pipe, samples, name):
    case, g = CASES[name], load_file(DATA / "tensors" / f"{name}.safetensors")
    batch = dataclasses.replace(pack(pipe, samples, case), vit_patches=g["in.packed_vit_tokens"])
    sizes = [im.grid[0] * im.grid[1] for im in batch.vae_images]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    targets = [k for k, im in enumerate(batch.vae_images) if im.target]
    raw = g["in.packed_timesteps"]
    times = [float(torch.sigmoid(raw[starts[k]])) for k in targets]  # the model's map, timestep_shift 1
    noises = [g["draw1"][starts[k]:starts[k + 1]] for k in targets]
    eps = [g["draw0"][k : k + 1, :, : im.grid[0] * 2, : im.grid[1] * 2] for k, im in enumerate(batch.vae_images)]
    model = pipe.model
    model.zero_grad()
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        try:
            losses = training_losses(model, pipe.vae, batch, timesteps=times, noises=noises, posterior_eps=eps,
                                     dense_mask=True)
            loss = losses.total()
            loss.backward()
        finally:
            for p in model.parameters():
                p.requires_grad_(False)
    assert_close_rel(losses.mse.detach(), g["out.mse_per_token"].mean(-1), "per-token MSE")
    assert_close_rel(losses.ce.detach(), g["out.ce_per_token"], "per-token CE")
    figures = case["figures"]
    assert abs(loss.item() - figures["loss"]) <= REL * abs(figures["loss"])
    assert abs(losses.mse.mean().item() - figures["mse"]) <= REL * abs(figures["mse"])
    assert abs(losses.ce.mean().item() - figures["ce"]) <= REL * abs(figures["ce"])
    named = dict(model.named_parameters())
    grads = [k for k in g if k.startswith("grad.")]
    assert len(grads) == 5
    for key in grads:
        assert_close_rel(named[key.removeprefix("grad.")].grad, g[key], key)
    model.zero_grad(set_to_none=True)
    # with the official ce_loss_reweighting, the CE is the weighted mean of the per-token CE
    w = g["in.ce_loss_weights"]
    reweighted = losses.total(ce_token_weights=batch.ce_weights).item()
    expected = losses.mse.mean().item() + float((g["out.ce_per_token"] * w).sum() / w.sum())
    assert abs(reweighted - expected) <= REL * abs(expected)


def test_the_step_by_step_edit_row_is_the_official_chain_plan(samples):
    """The ``steps`` row gives the official plan: input (VAE, ViT), instruction, result 1 as target AND as
    clean context (VAE, ViT), instruction, result 2; every condition droppable, the targets not."""
    kinds = [(type(s).__name__, getattr(s, "target", False), getattr(s, "as_vae", False), getattr(s, "as_vit", False),
              s.droppable) for s in samples[3].segments]
    assert kinds == [("Picture", False, True, False, True), ("Picture", False, False, True, True),
                     ("Text", False, False, False, True), ("Picture", True, False, False, False),
                     ("Picture", False, True, False, True), ("Picture", False, False, True, True),
                     ("Text", False, False, False, True), ("Picture", True, False, False, False)]
