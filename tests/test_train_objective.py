"""The training forward computes what inference computes: the same velocities for a noisy latent
after the same context, the same logits for the same text, no leak between packed samples, and
nothing sees a noisy target. Inference itself is pinned to the official code by test_golden.py,
so these tie the training objective to the official numbers."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bagel_engine
from bagel_engine.model.kv_cache import PackedKV  # noqa: F401  (the layout under test)
from bagel_engine.runtime import image_transforms as T
from bagel_engine.runtime.context import Context, block_routing, wrap_with_markers
from bagel_engine.train import packing as P
from bagel_engine.train.objective import encode_latents, training_losses
from bagel_engine.train.sample import Dropout, Picture, Sample, Text, edit, text_to_image, understanding
from golden import GOLDEN, MODEL_DIR


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu")


@pytest.fixture(scope="module")
def photo():
    return Image.open(GOLDEN / "inputs" / "image_a.png").convert("RGB")


def packer(pipe, dropout=None, seed=0):
    return P.SequencePacker(pipe.config, pipe.tokenizer, pipe.prepare_image, dropout, random.Random(seed))


def builder(pipe):
    return pipe.engine.builder()


def fixed_noise(pipe, image, seed):
    g = torch.Generator().manual_seed(seed)
    prepared = pipe.prepare_image(image, 0)
    h, w = (s // pipe.config.latent_downsample for s in prepared.vae_pixels.shape[1:])
    return torch.randn(h * w, pipe.config.patch_latent_dim, generator=g)


def inference_velocity(pipe, ctx, clean, eps, t, grid):
    """The conditional branch of one denoising step, through the inference code path."""
    m, s = pipe.model, pipe.tokenizer.special
    n = clean.shape[0]
    x_t = (1 - t) * clean + t * eps
    pos = T.grid_position_ids(*grid, pipe.config.bagel.max_latent_size)
    body = m.embed_latents(x_t, m.time_embedder(torch.tensor([t])), m.latent_pos_embed(pos))
    x = wrap_with_markers(m, body, s.start_of_image, s.end_of_image)
    hidden, _ = m.decoder.extend(x, torch.full((n + 2,), ctx.rope), ctx.kv, False, block_routing(n, "cpu"))
    return m.velocity(hidden[1:-1])


def clean_tokens(pipe, image, generator):
    latent = encode_latents(pipe.vae, pipe.prepare_image(image, 0).vae_pixels, generator)
    return T.patchify_latent(latent, pipe.config.bagel.latent_patch_size)


@torch.no_grad()
def test_text_to_image_velocity_equals_the_inference_branch(pipe, photo):
    sample = text_to_image("a red fox in the snow", photo)
    batch = packer(pipe).pack([sample])
    eps = fixed_noise(pipe, photo, 1)
    out = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.63], noises=[eps],
                          generator=torch.Generator().manual_seed(5))
    clean = clean_tokens(pipe, photo, torch.Generator().manual_seed(5))
    ctx = builder(pipe).add_text(Context(), "a red fox in the snow")
    grid = batch.vae_images[0].grid
    expected = inference_velocity(pipe, ctx, clean, eps, 0.63, grid)
    torch.testing.assert_close(out.velocity, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.mse, (expected - (eps - clean)).pow(2).mean(-1), atol=2e-5, rtol=1e-4)
    assert out.ce is None and out.timesteps == [0.63]


@torch.no_grad()
def test_edit_velocity_sees_vae_vit_and_instruction_like_inference(pipe, photo):
    target = photo.transpose(Image.FLIP_LEFT_RIGHT)
    batch = packer(pipe).pack([edit([photo], "mirror it", target)])
    assert [m for m in batch.split_modes] == [P.FULL, P.FULL, P.CAUSAL, P.NOISE]
    eps = fixed_noise(pipe, target, 2)
    g = torch.Generator().manual_seed(9)
    out = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.3], noises=[eps], generator=g)
    # the same posterior draws, in the same order: input image first, then the target
    g = torch.Generator().manual_seed(9)
    b = builder(pipe)
    prepared = pipe.prepare_image(photo, "a")
    first = encode_latents(pipe.vae, prepared.vae_pixels, g)
    ctx = b.add_vae_image(Context(), prepared, None)  # replaced below by the exact latent
    b.vae_encode = lambda pixels, eps_: first[None]
    b._memo.clear()
    ctx = b.add_vae_image(Context(), prepared, None)
    ctx = b.add_vit_image(ctx, prepared)
    ctx = b.add_text(ctx, "mirror it")
    clean = clean_tokens(pipe, target, g)
    expected = inference_velocity(pipe, ctx, clean, eps, 0.3, batch.vae_images[1].grid)
    torch.testing.assert_close(out.velocity, expected, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_answer_logits_equal_inference_prefill(pipe, photo):
    batch = packer(pipe).pack([understanding([photo], "What is in the picture?", "A small test image.")])
    out = training_losses(pipe.model, pipe.vae, batch)
    b = builder(pipe)
    ctx = b.add_vit_image(Context(), pipe.prepare_image(photo, 0))
    ctx = b.add_text(ctx, "What is in the picture?")
    ids = pipe.tokenizer.frame("A small test image.")
    m = pipe.model
    hidden, _ = m.decoder.extend(m.embed_text(torch.tensor(ids)), torch.arange(ctx.rope, ctx.rope + len(ids)),
                                 ctx.kv, True)
    logits = m.logits(hidden[:-1])
    torch.testing.assert_close(out.logits, logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.ce, F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none"),
                               atol=2e-5, rtol=1e-4)
    assert out.mse is None and batch.ce_tokens == len(ids) - 1


@torch.no_grad()
def test_packed_samples_do_not_see_each_other(pipe, photo):
    a = text_to_image("a lake at dawn", photo)
    b = understanding([photo.rotate(90)], "Describe it.", "It is rotated.")
    c = Sample([Text("hello"), Text("hi there, how are you?", loss=True)], "chat")
    eps = fixed_noise(pipe, photo, 3)
    together = training_losses(pipe.model, pipe.vae, packer(pipe).pack([a, b, c]), timesteps=[0.5], noises=[eps],
                               generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    alone_a = training_losses(pipe.model, pipe.vae, packer(pipe).pack([a]), timesteps=[0.5], noises=[eps], generator=g)
    alone_b = training_losses(pipe.model, pipe.vae, packer(pipe).pack([b]), generator=g)
    alone_c = training_losses(pipe.model, pipe.vae, packer(pipe).pack([c]), generator=g)
    torch.testing.assert_close(together.mse, alone_a.mse, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(together.ce, torch.cat([alone_b.ce, alone_c.ce]), atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_nothing_sees_the_noisy_target(pipe, photo):
    with_target = Sample([Text("draw a cat"), Picture(photo, target=True), Text("done, a cat.", loss=True)])
    without = Sample([Text("draw a cat"), Text("done, a cat.", loss=True)])
    eps = fixed_noise(pipe, photo, 4)
    x = training_losses(pipe.model, pipe.vae, packer(pipe).pack([with_target]), timesteps=[0.9], noises=[eps])
    y = training_losses(pipe.model, pipe.vae, packer(pipe).pack([without]))
    torch.testing.assert_close(x.ce, y.ce, atol=2e-5, rtol=1e-4)
    x2 = training_losses(pipe.model, pipe.vae, packer(pipe).pack([with_target]), timesteps=[0.1], noises=[eps * 3])
    torch.testing.assert_close(x2.ce, x.ce, atol=2e-5, rtol=1e-4)  # the target's noise changes nothing after it


def test_mask_follows_the_official_rule(pipe, photo):
    after_target = Sample([Text("draw"), Picture(photo, target=True), Text("done", loss=True)])
    batch = packer(pipe).pack([edit([photo], "mirror it", photo), after_target, Sample([Text("a"), Text("b", loss=True)])])
    m = batch.dense_mask()
    doc, split, mode = batch.split_ids()
    t = batch.length
    for q in range(0, t, 3):
        for k in range(0, t, 2):
            same_split = split[q] == split[k]
            expect = bool(doc[q] == doc[k]) and (k <= q or (bool(same_split) and int(mode[q]) != P.CAUSAL))
            if int(mode[k]) == P.NOISE and not same_split:
                expect = False
            assert bool(m[q, k]) == expect, (q, k)
    assert m.diagonal().all()


@torch.no_grad()
def test_block_mask_gives_the_dense_mask_numbers(pipe, photo):
    batch = packer(pipe).pack([text_to_image("a boat", photo), Sample([Text("q"), Text("an answer", loss=True)])])
    eps = fixed_noise(pipe, photo, 5)
    dense = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.4], noises=[eps], block_mask=False,
                            generator=torch.Generator().manual_seed(1))
    flex = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.4], noises=[eps], block_mask=True,
                           generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flex.mse, dense.mse, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(flex.ce, dense.ce, atol=1e-4, rtol=1e-3)


def test_attention_sample_by_sample_equals_the_dense_mask_with_gradients(pipe, photo):
    batch = packer(pipe).pack([edit([photo], "mirror it", photo), text_to_image("a boat", photo),
                               Sample([Text("q"), Text("an answer", loss=True)])])
    eps = [fixed_noise(pipe, photo, 5), fixed_noise(pipe, photo, 6)]
    params = [p for p in pipe.model.parameters()]
    grads = []
    for dense in (True, False):
        pipe.model.zero_grad(set_to_none=True)
        for p in params:
            p.requires_grad_(True)
        losses = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.4, 0.7], noises=eps, dense_mask=dense,
                                 generator=torch.Generator().manual_seed(1))
        losses.total().backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        for p in params:
            p.requires_grad_(False)
        if dense:
            reference = losses
    torch.testing.assert_close(losses.mse, reference.mse, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses.ce, reference.ce, atol=1e-5, rtol=1e-4)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in grads[1])


def test_positions_routing_and_dropout(pipe, photo):
    sample = edit([photo], "mirror it", photo)
    batch = packer(pipe).pack([sample])
    lat = batch.vae_images[0].grid[0] * batch.vae_images[0].grid[1]
    # VAE block at 0, ViT block at 1, instruction from 2, target back at the next position
    assert batch.position_ids[0] == 0 and batch.position_ids[lat + 2] == 1
    n_text = len(pipe.tokenizer.frame("mirror it"))
    text_start = batch.split_lens[0] + batch.split_lens[1]
    assert batch.position_ids[text_start:text_start + n_text].tolist() == list(range(2, 2 + n_text))
    assert set(batch.position_ids[text_start + n_text:].tolist()) == {2 + n_text}
    und, gen = set(batch.und_indexes().tolist()), set(batch.vae_indexes.tolist())
    assert und.isdisjoint(gen) and len(und | gen) == batch.length
    # with every condition dropped only the target is left; a dropped image still takes a position
    dropped = packer(pipe, Dropout(1.0, 1.0, 1.0)).pack([sample])
    assert dropped.split_modes == [P.NOISE] and set(dropped.position_ids.tolist()) == {2}
    with pytest.raises(ValueError, match="a target"):
        Picture(photo, target=True, as_vit=True)


def test_gradients_reach_both_experts_and_the_heads(pipe, photo):
    model = pipe.model
    model.requires_grad_(True)
    try:
        batch = packer(pipe).pack([text_to_image("a fox", photo), understanding([photo], "what?", "a fox")])
        loss = training_losses(model, pipe.vae, batch, generator=torch.Generator().manual_seed(0)).total()
        loss.backward()
        layer = model.decoder.layers[0]
        for p in (layer.mlp.up_proj.weight, layer.mlp_moe_gen.up_proj.weight, model.vae2llm.weight,
                  model.llm2vae.weight, model.connector.fc1.weight, model.time_embedder.mlp[0].weight,
                  model.language_model.lm_head.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


@torch.no_grad()
def test_padding_to_a_fixed_length_changes_nothing(pipe, photo):
    batch = packer(pipe).pack([text_to_image("a boat", photo), Sample([Text("q"), Text("an answer", loss=True)])])
    eps = fixed_noise(pipe, photo, 6)
    plain = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.4], noises=[eps],
                            generator=torch.Generator().manual_seed(2))
    padded = batch.padded(batch.length + 37, pipe.tokenizer.special.eos)
    assert padded.length == batch.length + 37 and padded.ce_tokens == batch.ce_tokens
    out = training_losses(pipe.model, pipe.vae, padded, timesteps=[0.4], noises=[eps],
                          generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.mse, plain.mse, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.ce, plain.ce, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot pad"):
        batch.padded(batch.length - 1, 0)


def test_mixed_precision_runs_attention_in_bfloat16_and_stays_close(pipe, photo, monkeypatch):
    from bagel_engine.model import kv_cache

    batch = packer(pipe).pack([text_to_image("a boat", photo), Sample([Text("q"), Text("an answer", loss=True)])])
    eps = fixed_noise(pipe, photo, 7)
    full = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.5], noises=[eps],
                           generator=torch.Generator().manual_seed(3))
    seen = []
    original = kv_cache.attend_dense_mask

    def spy(q, k, v, mask):
        seen.append(q.dtype)
        return original(q, k, v, mask)

    monkeypatch.setattr(kv_cache, "attend_dense_mask", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = training_losses(pipe.model, pipe.vae, batch, timesteps=[0.5], noises=[eps],
                                generator=torch.Generator().manual_seed(3))
    assert seen and set(seen) == {torch.bfloat16}
    assert abs(float(mixed.total()) - float(full.total())) < 0.02 * float(full.total())


@torch.no_grad()
def test_latent_cache_gives_the_same_losses_and_encodes_each_picture_once(pipe, photo):
    from bagel_engine.train.latent_cache import LatentCache

    other = photo.transpose(Image.FLIP_LEFT_RIGHT)
    batch = packer(pipe).pack([edit([photo], "make it blue", other), text_to_image("a fox", photo)])
    plain = training_losses(pipe.model, pipe.vae, batch, generator=torch.Generator().manual_seed(3))
    cache = LatentCache(max_mb=64)
    for round_ in range(2):
        cached = training_losses(pipe.model, pipe.vae, batch, generator=torch.Generator().manual_seed(3),
                                 latent_cache=cache)
        assert cached.timesteps == plain.timesteps
        torch.testing.assert_close(cached.mse, plain.mse, rtol=0, atol=0)
        torch.testing.assert_close(cached.ce, plain.ce, rtol=0, atol=0)
    # three VAE pictures in the batch, two distinct (the photo twice): encoded twice, then all hits
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 4 and cache.stats()["entries"] == 2


def test_latent_cache_bound_keeps_nothing_beyond_it():
    from bagel_engine.train.latent_cache import LatentCache

    cache, calls = LatentCache(max_mb=1 / 1024), []  # 1 KB: room for one 16x16 float32 moment map
    encode = lambda px: calls.append(1) or px[:1].repeat(1, 1, 1) * 2  # noqa: E731
    a, b = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    for px in (a, b, a, b):
        cache.moments(px, encode)
    assert cache.stats()["entries"] == 1 and len(calls) == 3  # a kept, b re-encoded
    torch.testing.assert_close(cache.moments(a, encode), a[:1] * 2)


def test_pictures_of_a_sequence_are_encoded_together_with_the_separate_numbers(pipe, photo):
    """batch_moments encodes the missing pictures of one size in one call: the moments of one at a time, kept."""
    from bagel_engine.train.latent_cache import LatentCache
    from bagel_engine.train.objective import batch_moments

    a = pipe.prepare_image(photo, 0).vae_pixels
    b = pipe.prepare_image(photo.rotate(90, expand=True), 1).vae_pixels  # another size
    c = pipe.prepare_image(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 2).vae_pixels
    cache = LatentCache(10)
    with torch.no_grad():
        together = batch_moments(pipe.vae, [a, b, c, a], cache)
        alone = [pipe.vae.encode_moments(x[None]) for x in (a, b, c, a)]
    for x, y in zip(together, alone):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert cache.stats()["entries"] == 3 and (cache.misses, cache.hits) == (3, 1)  # the repeated one: encoded once
    with torch.no_grad():
        again = batch_moments(pipe.vae, [c, a], cache)
    assert cache.hits == 3 and torch.equal(again[0], together[2])


def test_packed_spans_pad_into_one_batch_only_when_padding_is_cheap():
    from bagel_engine.model.kv_cache import SampleBlocks

    def blocks(lengths):
        spans, start = [], 0
        for n in lengths:
            spans.append((start, start + n))
            start += n
        return SampleBlocks(tuple(spans), tuple(torch.ones(n, n, dtype=torch.bool) for n in lengths))

    assert blocks([30, 75, 40] * 10).batched  # tens of short samples: one padded call
    assert not blocks([4000] + [30] * 40).batched  # one long span among short ones: span by span
    q = torch.randn(4000 + 30 * 40, 2, 8)
    skewed = blocks([4000] + [30] * 40)
    assert skewed.attend(q, q, q).shape == q.shape
