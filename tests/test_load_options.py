"""--quantize / --offload / --compile / --attention / --official-numerics reach `bagel_engine.load`
from every front end: single jobs, batch jobs, the server and the UI."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

import bagel_engine.cli.batch_cmd  # noqa: F401 - registers the commands
import bagel_engine.cli.jobs  # noqa: F401
import bagel_engine.cli.serve_cmd  # noqa: F401
from bagel_engine.cli.main import app
from golden import MODEL_DIR

COMMON = ["--model", str(MODEL_DIR), "--height", "32", "--width", "32", "--num-timesteps", "3", "--seed", "5"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_with_layer_offload_equals_plain(tmp_path):
    plain = run("generate", "a boat", *COMMON, "-o", tmp_path / "plain.png")
    offloaded = run("generate", "a boat", *COMMON, "--offload", "layer", "-o", tmp_path / "off.png")
    assert plain.exit_code == 0 and offloaded.exit_code == 0, offloaded.output
    assert (tmp_path / "plain.png").read_bytes() == (tmp_path / "off.png").read_bytes()


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed (extra: quant)")
def test_generate_and_chat_with_int8(tmp_path):
    r = run("generate", "a boat", *COMMON, "--quantize", "int8", "-o", tmp_path / "q.png", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["size"] == [32, 32]
    r = run("chat", "hello", "--model", str(MODEL_DIR), "--quantize", "int8", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output


def test_bad_quantize_value_is_a_usage_error():
    r = run("generate", "a boat", *COMMON, "--quantize", "int3")
    assert r.exit_code == 2 and "int3" in r.output


def test_batch_passes_load_options(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": "a", "prompt": "a boat"}\n{"id": "b", "prompt": "a car"}\n')
    common = ["--task", "t2i", "--model", str(MODEL_DIR), "--height", "32", "--width", "32", "--num-timesteps", "3",
              "--no-progress"]
    assert run("batch", src, "-o", tmp_path / "plain", *common).exit_code == 0
    r = run("batch", src, "-o", tmp_path / "off", *common, "--offload", "model", "--official-numerics")
    assert r.exit_code == 0, r.output
    for name in ("a.png", "b.png"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "off" / name).read_bytes()


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_serve_and_ui_pass_load_options(command, monkeypatch):
    seen = {}

    class Stop(RuntimeError):
        pass

    def fake_load(model, device=None, dtype=None, **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr("bagel_engine.serve._engine.load_pipeline", fake_load)
    r = run(command, "--model", str(MODEL_DIR), "--quantize", "int8", "--offload", "layer", "--compile",
            "--attention", "sdpa")
    assert isinstance(r.exception, Stop)
    assert seen == {"quantize": "int8", "offload": "layer", "compile": True, "attention": "sdpa"}
