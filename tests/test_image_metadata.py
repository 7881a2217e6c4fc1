"""Every written PNG says what made it (issue 13, point 9): prompt, task, seed, knobs and model in its text
chunks, from the CLI, batch jobs and the server alike."""

from __future__ import annotations

import json

from typer.testing import CliRunner

import bagel_engine.cli.batch_cmd  # noqa: F401 - registers `batch`
import bagel_engine.cli.jobs  # noqa: F401 - registers the single jobs
from bagel_engine.cli.main import app
from bagel_engine.image_metadata import describe, encode_png, read_png_metadata
from bagel_engine.shapes import world


def test_round_trip_with_unicode_prompt():
    meta = {"task": "t2i", "prompt": "un renard roux — 狐", "seed": 7, "parameters": {"cfg_text_scale": 4.0}}
    got = read_png_metadata(encode_png(world.draw([]), meta))
    assert got["prompt"] == meta["prompt"] and got["seed"] == 7 and got["parameters"] == {"cfg_text_scale": 4.0}
    assert got["software"].startswith("bagel-engine")
    assert read_png_metadata(encode_png(world.draw([]))) == {"software": got["software"]}


def test_cli_and_batch_write_the_metadata(tmp_path):
    out = tmp_path / "c.png"
    r = CliRunner().invoke(app, ["generate", "a red circle", "-m", "bagel-shapes", "--seed", "3", "--num-timesteps", "3",
                                 "--negative-prompt", "blue", "-o", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["task"] == "t2i" and meta["seed"] == 3
    assert meta["negative_prompt"] == "blue" and meta["parameters"]["num_timesteps"] == 3
    assert meta["model"] == "bagel-shapes"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "prompt": "a blue square", "num_timesteps": 3}) + "\n")
    r = CliRunner().invoke(app, ["batch", str(rows), "--task", "t2i", "-o", str(tmp_path / "out"), "-m", "bagel-shapes"])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])
    meta = read_png_metadata(tmp_path / "out" / record["output"])
    assert meta["prompt"] == "a blue square" and meta["seed"] == record["seed"]
    assert meta["parameters"]["num_timesteps"] == 3


def test_describe_keeps_what_the_output_says():
    class Out:
        seed = 5
        params = {"seed": 5, "cfg_text_scale": 2.0, "negative_prompt": "fog"}

    assert describe("edit", "make it red", Out(), "m") == {
        "task": "edit", "prompt": "make it red", "seed": 5, "model": "m", "negative_prompt": "fog",
        "parameters": {"cfg_text_scale": 2.0}}
