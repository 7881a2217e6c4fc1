"""The one table of knob names (bagel_engine/knobs.py) as the public API uses it: diffusers' and OpenAI's
names, the negative prompt, generators, images per prompt, top_p / top_k and stop strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bagel_engine
from bagel_engine import knobs as K
from bagel_engine.params import BagelInputError, held_back, stop_strings
from bagel_engine.runtime.text_decoding import filter_logits
from bagel_engine.shapes import world

FAST = {"num_timesteps": 3}


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load("bagel-shapes")


def _px(out) -> np.ndarray:
    return np.asarray(out.image, dtype=np.int16)


def test_canonical_names_aliases_and_conversions():
    assert K.canonical({"guidance_scale": 5.0, "num_inference_steps": 24, "latents": "x"}) == {
        "cfg_text_scale": 5.0, "num_timesteps": 25, "noise": "x"}
    assert K.canonical({"cfg_text_scale": None, "unknown": 1}) == {"unknown": 1}  # None: not set
    with pytest.raises(BagelInputError, match="given twice"):
        K.canonical({"cfg_img_scale": 1.0, "image_guidance_scale": 2.0})
    with pytest.raises(BagelInputError, match="num_inference_steps"):
        K.canonical({"num_inference_steps": 0})
    # per task: max_think_token_n is the answer's length for questions, the think length for pictures
    assert K.canonical({"max_think_token_n": 9}, "understand") == {"max_new_tokens": 9}
    assert K.canonical({"max_think_token_n": 9}, "t2i") == {"max_think_token_n": 9}
    assert K.did_you_mean("cfg_text_scal") == " (did you mean 'cfg_text_scale'?)"
    assert K.did_you_mean("prompt") == ""


def test_batch_columns_use_the_same_table():
    assert K.row_knobs({"guidance_scale": "6", "num_inference_steps": "9"}, "t2i") == {
        "cfg_text_scale": 6.0, "num_timesteps": 10}
    with pytest.raises(BagelInputError, match="both set cfg_text_scale"):
        K.row_knobs({"guidance_scale": "6", "cfg_text_scale": "5"}, "t2i")
    assert K.row_knobs({"negative_prompt": "blurry"}, "edit") == {"negative_prompt": "blurry"}
    assert "noise" not in K.row_knobs({"noise": "1"}, "t2i")  # a tensor: the Python API only


def test_generate_takes_diffusers_names(pipe):
    a = pipe.generate("a red circle", seed=3, cfg_text_scale=5.0, num_timesteps=4)
    b = pipe.generate("a red circle", seed=3, guidance_scale=5.0, num_inference_steps=3)
    assert np.array_equal(_px(a), _px(b))
    with pytest.raises(BagelInputError, match="given twice"):
        pipe.generate("a red circle", cfg_text_scale=1.0, guidance_scale=2.0)
    with pytest.raises(BagelInputError, match="did you mean 'cfg_text_scale'"):
        pipe.generate("a red circle", cfg_text_scal=1.0)
    noise = a.latents.clone().normal_(generator=torch.Generator().manual_seed(1))
    c = pipe.generate("a red circle", seed=3, noise=noise, **FAST)
    d = pipe.generate("a red circle", seed=3, latents=noise, **FAST)
    assert np.array_equal(_px(c), _px(d))
    with pytest.raises(BagelInputError, match="given twice"):
        pipe.generate("a red circle", noise=noise, latents=noise)


def test_generator_and_images_per_prompt(pipe):
    outs = pipe.generate("a blue square", generator=torch.Generator().manual_seed(5), num_images_per_prompt=2, **FAST)
    again = pipe.generate("a blue square", generator=torch.Generator().manual_seed(5), num_images_per_prompt=2, **FAST)
    assert len(outs) == 2 and [o.seed for o in outs] == [o.seed for o in again]
    assert all(np.array_equal(_px(x), _px(y)) for x, y in zip(outs, again))
    # each image is the one its seed draws alone
    alone = pipe.generate("a blue square", seed=outs[1].seed, **FAST)
    assert np.array_equal(_px(alone), _px(outs[1]))
    with pytest.raises(BagelInputError, match="seed or generator"):
        pipe.generate("a blue square", seed=1, generator=torch.Generator())
    edits = pipe.edit(world.draw([]), "add a red circle on the left", seed=9, num_images_per_prompt=2, **FAST)
    assert [e.seed for e in edits] == [9, 10]
    assert np.array_equal(_px(edits[1]), _px(pipe.edit(world.draw([]), "add a red circle on the left", seed=10, **FAST)))


def test_negative_prompt(pipe):
    base = pipe.generate("a red circle on the left", seed=4, **FAST)
    empty = pipe.generate("a red circle on the left", seed=4, negative_prompt="", **FAST)
    neg = pipe.generate("a red circle on the left", seed=4, negative_prompt="a blue square", **FAST)
    assert np.array_equal(_px(base), _px(empty))
    assert np.abs(_px(base) - _px(neg)).mean() > 0.5
    assert neg.params["negative_prompt"] == "a blue square"
    # no text guidance: the unconditional branch is not used, the negative prompt changes nothing
    off = pipe.generate("a red circle on the left", seed=4, negative_prompt="a blue square", cfg_text_scale=1.0, **FAST)
    plain = pipe.generate("a red circle on the left", seed=4, cfg_text_scale=1.0, **FAST)
    assert np.array_equal(_px(off), _px(plain))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [True, False, False, False]  # one stays
    shuffled = logits[[2, 0, 3, 1]]
    assert torch.isfinite(filter_logits(shuffled, top_p=0.75)).tolist() == [False, True, False, True]


def test_stop_strings_end_the_answer_and_the_stream(pipe):
    picture = world.draw([world.Obj("red", "circle", 20, 32, 8)])
    full = pipe.understand(picture, "What color is the circle?")
    assert full.text == "red"
    deltas = []
    cut = pipe.understand(picture, "What color is the circle?", stop="d", on_text=deltas.append)
    assert cut.text == "re" and "".join(deltas) == "re" and cut.finish_reason == "stop"
    assert pipe.understand(picture, "What color is the circle?", stop=["xyz"]).text == "red"
    with pytest.raises(BagelInputError, match="at most 4"):
        pipe.understand(picture, "What color is the circle?", stop=list("abcde"))
    with pytest.raises(BagelInputError, match="top_p"):
        pipe.understand(picture, "What color is the circle?", do_sample=True, top_p=0.0)
    sampled = pipe.understand(picture, "What color is the circle?", do_sample=True, temperature=0.5, top_k=1, seed=2)
    assert sampled.text == "red"  # top_k=1 is greedy


def test_stop_helpers():
    assert stop_strings(None) == () and stop_strings("x") == ("x",)
    with pytest.raises(BagelInputError):
        stop_strings([""])
    assert held_back("the answer is re", ("red",)) == 2
    assert held_back("the answer", ("red",)) == 1  # "r" may begin "red"
    assert held_back("the answers", ("red",)) == 0
