"""The engine's scheduler: requests batched step by step give each request its solo result (images
within float rounding, greedy text exactly), for mixed sizes, guidance settings, tasks and the step
cache; a newcomer joins a running batch within one step; a cancelled or bad request fails alone."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

import bagel_engine
from bagel_engine import BagelInputError
from bagel_engine.params import ImageParams, TextParams
from bagel_engine.runtime.engine import Request
from golden import GOLDEN, MODEL_DIR


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def photo():
    return Image.open(GOLDEN / "inputs" / "image_a.png")


def t2i(prompt, size, seed, steps=5, **knobs):
    params = ImageParams(**({"cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.0, 1.0),
                             "timestep_shift": 1.0, "num_timesteps": steps} | knobs))
    return Request([prompt], image=params, image_shape=size, seed=seed)


def answer(inputs, tokens=12):
    return Request(inputs, understanding_output=True, text=TextParams(tokens))


def mixed_requests(photo):
    return [
        t2i("a red square", (32, 32), 1),
        t2i("a blue circle on a long table", (48, 32), 2, steps=7, cfg_interval=(0.4, 1.0), cfg_renorm_type="channel"),
        Request([photo, "make it green"], image=ImageParams(4.0, 2.0, (0.0, 1.0), "text_channel", 0.0, 1.0, 4), seed=3),
        t2i("a yellow triangle", (32, 48), 4, steps=6, enable_taylorseer=True),
        answer([photo, "What is in the picture?"]),
        answer(["Tell me a story about a cat."], tokens=20),
    ]


def assert_same(batched, alone):
    if alone.latents is not None:
        assert batched.latents.shape == alone.latents.shape
        torch.testing.assert_close(batched.latents, alone.latents, atol=1e-4, rtol=1e-4)
        assert batched.seed == alone.seed
    assert batched.text == alone.text
    assert batched.completion_tokens == alone.completion_tokens


def test_batched_requests_equal_solo(pipe, photo):
    """Mixed sizes, guidance settings, edit, t2i with the step cache, an answer and a chat in one batch."""
    requests = mixed_requests(photo)
    ticks = pipe.engine.ticks
    together = pipe.engine.run(requests)
    batched_ticks = pipe.engine.ticks - ticks
    alone, solo_ticks = [], []
    for r in mixed_requests(photo):
        ticks = pipe.engine.ticks
        alone.append(pipe.engine.run([r])[0])
        solo_ticks.append(pipe.engine.ticks - ticks)
    for b, a in zip(together, alone):
        assert_same(b, a)
    assert together[4].text and together[5].text and together[1].image.size == (32, 48)
    # every request stepped in the same ticks: as many as the longest needs, not their sum
    assert batched_ticks == max(solo_ticks) < sum(solo_ticks)


def test_scheduler_joins_newcomer_within_one_step(pipe):
    """A request submitted while another runs starts at the next step boundary, and both get their solo result."""
    pipe.start_batching(4)
    try:
        first_steps, second_first_seen = [], []
        second_out = {}

        def submit_second():
            second_out["out"] = pipe.generate("a small green square", height=32, width=32, seed=8,
                                              num_timesteps=5, timestep_shift=1.0,
                                              callback=lambda k, n: second_first_seen.append(len(first_steps)))

        thread = threading.Thread(target=submit_second)

        def first_callback(k, n):
            first_steps.append(k)
            if k == 3:
                thread.start()  # arrives while the first request is at step 3

        first = pipe.generate("a big red circle", height=32, width=32, seed=7, num_timesteps=30,
                              timestep_shift=1.0, callback=first_callback)
        thread.join(30)
        assert pipe.engine.batching
    finally:
        pipe.stop_batching()
    assert first_steps == list(range(1, 30))
    # the newcomer's first step ran in the tick right after the one it arrived in (or the one after,
    # if it arrived while that tick was already being assembled)
    assert second_first_seen[0] in (4, 5), second_first_seen
    assert_same(first, pipe.generate("a big red circle", height=32, width=32, seed=7, num_timesteps=30,
                                     timestep_shift=1.0))
    assert_same(second_out["out"], pipe.generate("a small green square", height=32, width=32, seed=8,
                                                 num_timesteps=5, timestep_shift=1.0))


class Stop(Exception):
    pass


def test_scheduler_cancels_one_text_job_and_keeps_the_others(pipe, photo):
    pipe.start_batching(4)
    results, errors = {}, {}

    def cancel_at_3(k, n):
        if k == 3:
            raise Stop("client went away")

    def run(name, fn):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001
            errors[name] = e

    jobs = {
        "chat": lambda: pipe.chat("Tell me about the sea.", max_new_tokens=24, callback=cancel_at_3),
        "answer": lambda: pipe.understand(photo, "What is it?", max_new_tokens=16),
        "image": lambda: pipe.generate("a cat", height=32, width=32, seed=5, num_timesteps=6),
        "bad": lambda: pipe.generate("a cat", height=33, width=32, seed=5, num_timesteps=6),
    }
    try:
        threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        pipe.stop_batching()
    assert isinstance(errors.pop("chat"), Stop)
    assert isinstance(errors.pop("bad"), BagelInputError)
    assert not errors
    assert_same(results["answer"], pipe.understand(photo, "What is it?", max_new_tokens=16))
    assert_same(results["image"], pipe.generate("a cat", height=32, width=32, seed=5, num_timesteps=6))


def test_streamed_text_and_previews_in_a_batch(pipe):
    """Callbacks of batched requests reach their own caller: streamed pieces assemble to each answer."""
    pieces = {0: [], 1: []}
    previews = []
    reqs = [Request(["Hello there"], understanding_output=True, text=TextParams(16),
                    on_text=pieces[0].append),
            Request(["What is two and two?"], understanding_output=True, text=TextParams(10),
                    on_text=pieces[1].append),
            Request(["a dog"], image=ImageParams(num_timesteps=4), image_shape=(32, 32), seed=1,
                    on_step=previews.append)]
    outs = pipe.engine.run(reqs)
    assert "".join(pieces[0]) == outs[0].text and "".join(pieces[1]) == outs[1].text
    assert [p.step for p in previews] == [1, 2, 3] and previews[-1].latent().shape == outs[2].latents.shape


def test_step_token_budget_holds_a_newcomer_until_there_is_room(pipe):
    """With a budget of one image's rows, two image requests sent together run one after the other (each
    still its solo result); without a budget they share every step."""
    def both(budget):
        pipe.engine.start(4, max_step_tokens=budget)
        try:
            outs, seen = {}, {0: [], 1: []}
            def one(k):
                outs[k] = pipe.generate(f"picture {k}", height=32, width=32, seed=k, num_timesteps=40,
                                        cfg_interval=(0.0, 1.0), cfg_text_scale=4.0, cfg_img_scale=1.0,
                                        callback=lambda i, n, k=k: seen[k].append(pipe.engine.ticks))
            threads = [threading.Thread(target=one, args=(k,)) for k in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            pipe.engine.stop()
        return outs, seen

    rows = 2 * ((32 // pipe.config.latent_downsample) ** 2 + 2)  # one image: cond + text-uncond blocks
    held, seen = both(rows)
    overlap = set(seen[0]) & set(seen[1])
    assert not overlap, seen  # never in the same step
    shared, seen_shared = both(None)
    assert set(seen_shared[0]) & set(seen_shared[1])  # the same steps
    for k in (0, 1):
        assert_same(held[k], shared[k])


def test_a_newcomer_s_prefill_runs_an_image_block_per_step(pipe, photo):
    """Chunked prefill: an edit of two pictures (four image blocks: VAE and ViT of each) arriving while a
    picture is drawn computes one image block between two of its steps, not all four at once; both results
    are their solo ones."""
    from bagel_engine.runtime.context import ContextBuilder

    blocks = []  # the running request's step count when each context block was computed
    first_steps = []
    real_run = ContextBuilder._run

    def counting_run(self, ctx, x, positions, causal, routing, key):
        if ctx.history + (key,) not in self._memo:
            blocks.append((key[0], len(first_steps)))
        return real_run(self, ctx, x, positions, causal, routing, key)

    edit_kw = dict(seed=9, num_timesteps=4, cfg_text_scale=4.0, cfg_img_scale=2.0)
    pipe.start_batching(4)
    out = {}
    try:
        def submit_edit():
            out["edit"] = pipe.edit([photo, photo.rotate(90)], "make them green", **edit_kw)

        thread = threading.Thread(target=submit_edit)

        def first_callback(k, n):
            first_steps.append(k)
            if k == 2:
                thread.start()

        ContextBuilder._run = counting_run
        try:
            first = pipe.generate("a big red circle", height=32, width=32, seed=7, num_timesteps=30,
                                  timestep_shift=1.0, callback=first_callback)
            thread.join(60)
        finally:
            ContextBuilder._run = real_run
    finally:
        pipe.stop_batching()
    image_blocks = [step for kind, step in blocks if kind in ("vae", "vit") and step >= 2]
    assert len(image_blocks) == 4, blocks
    assert len(set(image_blocks)) == 4, blocks  # each between another pair of steps
    assert_same(first, pipe.generate("a big red circle", height=32, width=32, seed=7, num_timesteps=30,
                                     timestep_shift=1.0))
    assert_same(out["edit"], pipe.edit([photo, photo.rotate(90)], "make them green", **edit_kw))
