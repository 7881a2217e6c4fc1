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
    """Floors a little below what the shipped model scores here (seed 97, 12 per category: t2i single
    0.75 / position 0.58, t2i 0.33, edit 0.33, vqa 0.62), far above an untrained model (0 for pictures; about
    0.31 for answers by chance). The issue's targets (0.90 / 0.85 / 0.95) are not reached yet: see
    docs/demo-model.md."""
    report = run_shapes(pipe, n=12, seed=SEED)
    scores = report.scores()
    print(report.table())
    cats = scores["t2i"]["categories"]
    assert (cats["single"] + cats["position"]) / 2 >= 0.55, report.table()
    assert scores["t2i"]["overall"] >= 0.25, report.table()
    assert scores["edit"]["overall"] >= 0.22, report.table()
    assert scores["vqa"]["overall"] >= 0.50, report.table()


def test_the_readme_main_job_runs_and_sometimes_draws_what_it_says(tmp_path, pipe):
    """The command writes a 64x64 picture; over 16 seeds the prompt is drawn right at least 10 times (15 of
    16 when measured; docs/demo-model.md)."""
    out = tmp_path / "circle.png"
    cmd = [sys.executable, "-m", "bagel_engine", "generate", "a red circle on the left", "--model", "bagel-shapes",
           "--seed", "3", "-o", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["size"] == [64, 64] and out.exists()
    spec = Spec({("red", "circle"): 1}, position=(("red", "circle"), "left"))
    outs = pipe.generate(["a red circle on the left"] * 16, seed=list(range(16)))
    assert sum(judge_picture(o.image, spec).correct for o in outs) >= 10


def test_it_answers_in_the_worlds_words(pipe):
    from bagel_engine.shapes.world import COLORS, POSITIONS, Obj, draw

    picture = draw([Obj("blue", "triangle", 48, 32, 8)])
    assert pipe.understand(picture, "What color is the triangle?").text.strip().lower() in COLORS
    assert pipe.understand(picture, "Where is the blue triangle?").text.strip().lower() in POSITIONS
    assert pipe.understand(picture, "Is there a blue triangle?").text.strip().lower() in ("yes", "no")
