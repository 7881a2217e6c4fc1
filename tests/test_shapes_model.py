"""The shipped demo model bagel-shapes really draws, edits and answers: a small `bagel eval shapes`
(seeds the documented scores do not use), judged by the program, and the README's main job."""

import json
import subprocess
import sys

import pytest

import bagel_engine
from bagel_engine.eval.shapes import run_shapes
from bagel_engine.shapes.judge import judge_picture
from bagel_engine.shapes.tasks import Spec

SEED = 97  # docs/demo-model.md reports seed 1234


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load("bagel-shapes", device="cpu")


def test_the_shipped_model_is_small_and_in_the_official_layout():
    from bagel_engine.weights.loader import EMBEDDED_MODELS

    d = EMBEDDED_MODELS["bagel-shapes"]
    names = {p.name for p in d.iterdir()}
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json",
            "vocab.json", "merges.txt", "task_defaults.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 25 * 2**20


def test_small_eval_scores(pipe):
    report = run_shapes(pipe, n=6, seed=SEED)
    scores = report.scores()
    print(report.table())
    assert scores["t2i"]["overall"] >= 0.80, report.table()
    assert scores["edit"]["overall"] >= 0.75, report.table()
    assert scores["vqa"]["overall"] >= 0.90, report.table()


def test_the_readme_main_job_draws_what_it_says(tmp_path):
    out = tmp_path / "circle.png"
    cmd = [sys.executable, "-m", "bagel_engine", "generate", "a red circle on the left", "--model", "bagel-shapes",
           "--seed", "3", "-o", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["size"] == [64, 64]
    from PIL import Image

    spec = Spec({("red", "circle"): 1}, position=(("red", "circle"), "left"))
    assert judge_picture(Image.open(out), spec).correct


def test_it_answers(pipe):
    from bagel_engine.shapes.world import Obj, draw

    picture = draw([Obj("blue", "triangle", 48, 32, 8)])
    assert "blue" in pipe.understand(picture, "What color is the triangle?").text.lower()
    assert "right" in pipe.understand(picture, "Where is the blue triangle?").text.lower()
