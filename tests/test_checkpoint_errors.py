"""A broken checkpoint gets an error that names the file and what is wrong, in inspect and load alike."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import bagel_engine
from bagel_engine.inspection import inspect_model
from bagel_engine.weights.loader import CheckpointError

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    return d


def truncate(d):
    data = (d / "ema.safetensors").read_bytes()
    (d / "ema.safetensors").write_bytes(data[: len(data) // 2])


def bad_header(d):
    (d / "ema.safetensors").write_bytes(b"\xff" * 64 + b"not safetensors at all")


def ints(d):
    state = load_file(str(d / "ema.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key] = state[key].to(__import__("torch").int32)
    save_file(state, str(d / "ema.safetensors"))
    return key


@pytest.mark.parametrize("damage,words", [(truncate, ["ema.safetensors", "truncated"]),
                                          (bad_header, ["ema.safetensors", "not a readable safetensors"])])
def test_unreadable_files_are_named(model_dir, damage, words):
    damage(model_dir)
    with pytest.raises(CheckpointError) as e:
        bagel_engine.load(model_dir, device="cpu")
    for w in words:
        assert w in str(e.value)
    report = inspect_model(str(model_dir))
    entry = report["files"]["ema.safetensors"]
    assert not entry["ok"] and not report["ok"] and "ema.safetensors" in entry["error"]


def test_integer_weights_are_a_mismatch(model_dir):
    key = ints(model_dir)
    report = inspect_model(str(model_dir))
    assert report["files"]["ema.safetensors"]["wrong_dtype"] == {key: "I32"}
    assert not report["ok"]
    with pytest.raises(CheckpointError, match="stored as I32"):
        bagel_engine.load(model_dir, device="cpu")


def test_the_commands_say_it_without_a_traceback(model_dir):
    truncate(model_dir)
    r = subprocess.run([sys.executable, "-m", "bagel_engine", "inspect", str(model_dir)], capture_output=True, text=True)
    assert r.returncode == 1 and "UNREADABLE" in r.stdout and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "bagel_engine", "chat", "hi", "-m", str(model_dir), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "ema.safetensors" in json.loads(r.stdout.strip().splitlines()[-1])["error"]
