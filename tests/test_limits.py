"""Limits of one request, checked by the pipeline before any work: a BagelInputError names the limit."""

from pathlib import Path

import pytest

import bagel_engine
from bagel_engine.params import BagelInputError, Limits

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(TINY, device="cpu")


def test_answer_length_beyond_the_context_is_refused_before_allocating(pipe):
    with pytest.raises(BagelInputError, match="max_model_len"):
        pipe.chat("hi", max_new_tokens=2**31)  # would size a 2^31-token KV buffer
    assert pipe.max_model_len == 32768


def test_prompt_beyond_the_limit_is_refused(pipe):
    pipe.limits = Limits(max_model_len=64)
    try:
        assert pipe.max_model_len == 64
        with pytest.raises(BagelInputError, match="max_model_len"):
            pipe.chat("word " * 200, max_new_tokens=2)
        with pytest.raises(BagelInputError, match="ask for at most"):
            pipe.chat("hi", max_new_tokens=100)
        assert pipe.chat("hi", max_new_tokens=3).text is not None
    finally:
        pipe.limits = Limits()


def test_timesteps_beyond_the_limit_are_refused(pipe):
    pipe.limits = Limits(max_timesteps=5)
    try:
        with pytest.raises(BagelInputError, match="max_timesteps"):
            pipe.generate("a red circle", height=32, width=32, num_timesteps=6)
        assert pipe.generate("a red circle", height=32, width=32, num_timesteps=5).image.size == (32, 32)
    finally:
        pipe.limits = Limits()


def test_text_decoding_reports_each_token_and_can_be_stopped(pipe):
    """The server cancels a chat whose client left through this callback, between two tokens."""
    seen = []

    class Stop(Exception):
        pass

    def callback(k, total):
        seen.append((k, total))
        if k == 5:
            raise Stop

    with pytest.raises(Stop):
        pipe.chat("hi", max_new_tokens=200, callback=callback)
    assert seen == [(k, 199) for k in range(1, 6)]
    full = pipe.chat("hi", max_new_tokens=200, callback=lambda k, t: None)
    assert full.text == pipe.chat("hi", max_new_tokens=200).text
