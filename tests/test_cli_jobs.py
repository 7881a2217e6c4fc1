"""`bagel generate / edit / understand / chat` end to end with the tiny golden checkpoint.

Each command must write what the public API computes for the same knobs, byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import bagel_engine
import bagel_engine.cli.batch_cmd  # noqa: F401 - registers `batch`
import bagel_engine.cli.jobs  # noqa: F401 - registers the single jobs
from bagel_engine.cli.main import app

DATA = Path(__file__).parent / "data" / "tiny-v1"
MODEL = DATA / "model"
IMAGE = DATA / "inputs" / "image_a.png"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL)


def invoke(*args, env=None):
    env = {"BAGEL_MODEL": None, **(env or {})}
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def pixels(source) -> tuple:
    """A picture's size and pixels: written PNGs also carry metadata (prompt, seed, knobs)."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    return image.size, image.convert("RGB").tobytes()


def test_generate_writes_what_the_api_draws(tmp_path, pipe):
    out = tmp_path / "sub" / "fox.png"
    r = invoke("generate", "a red fox", "--model", MODEL, "--height", 32, "--width", 48, "--num-timesteps", 3,
               "--seed", 7, "--cfg-text-scale", 5, "--cfg-img-scale", 1.2, "--cfg-interval", 0.1, 0.9,
               "--cfg-renorm-type", "channel", "--cfg-renorm-min", 0.2, "--timestep-shift", 2, "-o", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out} (48x32, seed 7" in r.stdout
    assert "denoising" in r.stderr and "2/2" in r.stderr  # step progress bar
    expected = pipe.generate("a red fox", height=32, width=48, num_timesteps=3, seed=7, cfg_text_scale=5.0,
                             cfg_img_scale=1.2, cfg_interval=(0.1, 0.9), cfg_renorm_type="channel",
                             cfg_renorm_min=0.2, timestep_shift=2.0)
    assert pixels(out) == pixels(expected.image)


def test_generate_think_json_and_model_from_env(tmp_path, pipe, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("generate", "a poster", "--height", 32, "--width", 32, "--num-timesteps", 3, "--seed", 3, "--think",
               "--max-think-tokens", 6, "--json", env={"BAGEL_MODEL": str(MODEL)})
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    expected = pipe.generate("a poster", height=32, width=32, num_timesteps=3, seed=3, think=True,
                             max_think_token_n=6)
    assert result["text"] == expected.text and result["text"]
    assert result["output"] == "generate-3.png" and result["seed"] == 3 and result["size"] == [32, 32]
    assert result["params"]["think"] is True and result["params"]["max_think_token_n"] == 6
    assert set(result["timings"]) >= {"think_s", "denoise_s", "total_s"}
    assert pixels(tmp_path / "generate-3.png") == pixels(expected.image)
    r = invoke("generate", "a poster", "--height", 32, "--width", 32, "--num-timesteps", 3, "--seed", 3,
               "--think", "--max-think-tokens", 6, "-o", "p.png", env={"BAGEL_MODEL": str(MODEL)})
    assert r.exit_code == 0 and "think:" in r.stdout and expected.text.strip() in r.stdout


def test_edit_several_images(tmp_path, pipe):
    second = tmp_path / "second.png"
    Image.open(IMAGE).convert("RGB").resize((40, 24)).save(second)
    out = tmp_path / "edited.png"
    r = invoke("edit", IMAGE, second, "--prompt", "swap the colors", "--model", MODEL, "--num-timesteps", 3,
               "--seed", 11, "--cfg-img-scale", 1.5, "-o", out)
    assert r.exit_code == 0, r.output
    expected = pipe.edit([Image.open(IMAGE), Image.open(second)], "swap the colors", num_timesteps=3, seed=11,
                         cfg_img_scale=1.5)
    assert pixels(out) == pixels(expected.image)
    assert Image.open(out).size == expected.image.size  # the last image's resized size


def test_understand_and_chat_print_the_answer(tmp_path, pipe):
    r = invoke("understand", IMAGE, "-p", "What is in the picture?", "--model", MODEL, "--max-new-tokens", 8,
               "--think", "-o", tmp_path / "answer.txt")
    assert r.exit_code == 0, r.output
    expected = pipe.understand(Image.open(IMAGE), "What is in the picture?", max_new_tokens=8, think=True)
    assert r.stdout.rstrip("\n") == expected.text
    assert (tmp_path / "answer.txt").read_text(encoding="utf-8") == expected.text + "\n"

    r = invoke("chat", "Name three colors.", "--model", MODEL, "--max-think-tokens", 9, "--do-sample",
               "--temperature", 0.8, "--seed", 1, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    expected = pipe.chat("Name three colors.", max_new_tokens=9, do_sample=True, text_temperature=0.8, seed=1)
    assert result["text"] == expected.text and result["seed"] == 1 and result["output"] is None
    assert result["params"]["do_sample"] is True and result["params"]["text_temperature"] == 0.8


@pytest.mark.parametrize("args,message,as_json", [
    (["generate", "x", "--num-timesteps", 3], "height 1024 is not supported", False),
    (["generate", "x", "--height", 30, "--width", 32], "height 30 is not supported", True),
    (["generate", "  ", "--height", 32, "--width", 32], "prompt must be a non-empty string", False),
    (["edit", "missing.png", "-p", "x"], "image 1 'missing.png' not found", True),
    (["understand", __file__, "-p", "x"], "is not an image", False),
    (["generate", "x", "--model", "/no/such/model"], "cannot load model", True),
])
def test_bad_input_exits_2_with_a_clear_message(args, message, as_json):
    args = list(args)
    if "--model" not in args:
        args += ["--model", MODEL]
    r = invoke(*args, *(["--json"] if as_json else []))
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    if as_json:
        assert message in json.loads(r.stdout)["error"]


def test_usage_errors():
    r = invoke("generate", "x", "--height", 32, "--width", 32)
    assert r.exit_code == 2 and "no model" in r.stderr
    r = invoke("generate", "x", "--model", MODEL, "--cfg-renorm-type", "local")
    assert r.exit_code == 2 and "local" in r.output
    r = invoke("edit", IMAGE, "--model", MODEL)  # no --prompt
    assert r.exit_code == 2 and "--prompt" in r.output


def test_help_teaches_with_examples():
    r = invoke("--help")
    for command in ("generate", "edit", "understand", "chat", "batch"):
        assert command in r.stdout
    for command, example in [("generate", "bagel generate"), ("edit", "bagel edit"),
                             ("understand", "bagel understand"), ("chat", "bagel chat"), ("batch", "torchrun")]:
        r = invoke(command, "--help")
        assert r.exit_code == 0 and "Examples" in r.stdout and example in r.stdout, command
    r = invoke("generate", "--help")
    for flag in ("--cfg-text-scale", "--cfg-img-scale", "--cfg-interval", "--cfg-renorm-type", "--cfg-renorm-min",
                 "--timestep-shift", "--num-timesteps", "--seed", "--height", "--width", "--think",
                 "--max-think-tokens", "--do-sample", "--temperature", "--model", "--output", "--device",
                 "--dtype", "--json", "BAGEL_MODEL"):
        assert flag in r.stdout, flag


def test_the_installed_entry_point_runs(tmp_path):
    """The real process entry (python -m bagel_engine.cli.main), as a user's shell runs it."""
    env = {**os.environ, "BAGEL_MODEL": str(MODEL)}
    out = tmp_path / "x.png"
    p = subprocess.run([sys.executable, "-m", "bagel_engine.cli.main", "generate", "a cat", "--height", "32",
                        "--width", "32", "--num-timesteps", "3", "--seed", "2", "-o", str(out), "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["output"] == str(out)
    Image.open(out).load()
