"""A model directory's own task defaults (task_defaults.json) are what the task methods use when the
caller sets nothing; the caller's values still win; a bad file is a clear error."""

import json
import shutil
from pathlib import Path

import pytest

import bagel_engine
from bagel_engine.params import BagelInputError, TaskDefaults

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    (d / "task_defaults.json").write_text(json.dumps({
        "t2i": {"height": 32, "width": 48, "num_timesteps": 4, "cfg_text_scale": 2.0, "cfg_interval": [0.0, 1.0]},
        "edit": {"num_timesteps": 3, "cfg_img_scale": 1.25},
        "understand": {"max_new_tokens": 5}, "chat": {"max_new_tokens": 7}}))
    return d


def test_the_model_defaults_apply_when_nothing_is_set(model_dir):
    pipe = bagel_engine.load(model_dir, device="cpu")
    out = pipe.generate("a red circle", seed=1)
    assert out.image.size == (48, 32)
    assert out.params["num_timesteps"] == 4 and out.params["cfg_text_scale"] == 2.0
    assert out.params["cfg_interval"] == (0.0, 1.0)
    assert out.params["cfg_img_scale"] == 1.5  # not in the file: the app's default
    edit = pipe.edit([out.image], "make it blue", seed=1)
    assert edit.params["num_timesteps"] == 3 and edit.params["cfg_img_scale"] == 1.25
    assert pipe.understand(out.image, "what?").params["max_think_token_n"] == 5
    assert pipe.chat("hi").params["max_think_token_n"] == 7


def test_the_caller_wins(model_dir):
    pipe = bagel_engine.load(model_dir, device="cpu")
    out = pipe.generate("a red circle", seed=1, height=16, width=16, num_timesteps=3, cfg_text_scale=1.0)
    assert out.image.size == (16, 16)
    assert out.params["num_timesteps"] == 3 and out.params["cfg_text_scale"] == 1.0
    assert pipe.chat("hi", max_new_tokens=3).params["max_think_token_n"] == 3


def test_without_a_file_the_official_defaults_hold():
    pipe = bagel_engine.load(TINY, device="meta")
    assert pipe.task_defaults == TaskDefaults()
    assert (pipe.task_defaults.height, pipe.task_defaults.width) == (1024, 1024)
    assert pipe.task_defaults.t2i.num_timesteps == 50


@pytest.mark.parametrize("content,message", [
    ({"t2i": {"num_steps": 3}}, "num_steps"),
    ({"video": {}}, "video"),
    ({"t2i": {"height": 0}}, "height"),
    ({"edit": {"cfg_renorm_type": "nope"}}, "cfg_renorm_type"),
    ({"chat": {"max_new_tokens": -1}}, "max_new_tokens"),
])
def test_a_bad_file_names_what_is_wrong(model_dir, content, message):
    (model_dir / "task_defaults.json").write_text(json.dumps(content))
    with pytest.raises(BagelInputError, match=message):
        bagel_engine.load(model_dir, device="meta")
