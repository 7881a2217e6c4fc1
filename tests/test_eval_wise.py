"""`bagel eval wise`: the official WISE generation's settings (gen_images_mp_wise.py's main(), think on as
run_wise.sh runs it), its guidance contexts with think, the layout WISE's scorer reads, resume, bad entries."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import bagel_engine
from bagel_engine.eval.wise import PRESET, WiseJob, read_prompts, run_wise
from bagel_engine.params import ImageParams, TextParams
from bagel_engine.runtime.engine import Request
from bagel_engine.think_text import simple_think

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"
ENTRIES = [{"prompt_id": 1, "Prompt": "A dish from Japan", "Category": "Cultural knowledge"},
           {"prompt_id": 2},
           {"prompt_id": 1, "Prompt": "the same id again"},
           {"prompt_id": 7, "Prompt": "Ice in a warm room after an hour"}]
FAST = {"num_timesteps": 3, "max_think_token_n": 4}
SHORT, IMAGE = TextParams(max_think_token_n=4), ImageParams(num_timesteps=3)


def metadata(tmp_path: Path) -> Path:
    path = tmp_path / "final_data.json"
    path.write_text(json.dumps(ENTRIES))
    return path


def test_the_preset_is_the_official_script_s():
    # gen_images_mp_wise.py main(): cfg_scale 4, cfg_interval [0.4, 1.0], timestep_shift 3.0, 50 steps,
    # renorm_min 0 (global); the think text: do_sample, temperature 0.3, max_length 2048
    assert PRESET == {"cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.4, 1.0), "timestep_shift": 3.0,
                      "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "global", "do_sample": True,
                      "text_temperature": 0.3, "max_think_token_n": 2048}
    job = WiseJob(Path("m"), Path("o"))
    assert (job.think, job.simple_think, job.resolution, job.seed) == (True, False, 1024, 42)  # run_wise.sh


def test_simple_think_keeps_what_follows_the_plan():
    assert simple_think("<think>plan it</think>  a red apple ") == "a red apple"
    assert simple_think("<think>plan it</think>") == "<think>plan it</think>"  # nothing after: the whole text
    assert simple_think("no tags at all") == "no tags at all"


def test_think_guidance_contexts_are_the_script_s():
    """With think, the app's text-unconditional branch holds the system prompt; WISE's script's holds nothing."""
    pipe = bagel_engine.load(TINY, device="cpu")
    contexts = {}
    for mode in ("app", "eval"):
        trace = {}
        pipe.engine.run([Request(["a red apple"], think=True, image_shape=(32, 32), seed=3, trace=trace,
                                 think_contexts=mode, text=SHORT, image=IMAGE)])
        contexts[mode] = trace["contexts"]
    assert contexts["app"]["cfg_text"].length > 0 and contexts["eval"]["cfg_text"].length == 0
    assert contexts["app"]["gen"].length == contexts["eval"]["gen"].length  # the conditional branch is the same
    try:
        Request(["x"], think_contexts="official")
    except ValueError as e:
        assert "think_contexts" in str(e)
    else:
        raise AssertionError("an unknown think_contexts was accepted")


def test_simple_think_conditions_the_picture_on_the_processed_text(monkeypatch):
    import bagel_engine.runtime.engine as engine

    pipe = bagel_engine.load(TINY, device="cpu")
    seen = []
    monkeypatch.setattr(engine, "simple_think", lambda text: seen.append(text) or "")
    trace = {}
    pipe.engine.run([Request(["a red apple"], think=True, simple_think=True, image_shape=(32, 32), seed=3,
                             trace=trace, text=SHORT, image=IMAGE)])
    full = {}
    pipe.engine.run([Request(["a red apple"], think=True, image_shape=(32, 32), seed=3, trace=full, text=SHORT,
                             image=IMAGE)])
    assert len(seen) == 1  # the think text went through simple_think before it joined the context
    assert trace["contexts"]["gen"].length < full["contexts"]["gen"].length


def test_layout_resume_and_bad_entries(tmp_path):
    pipe = bagel_engine.load(TINY, device="cpu")
    out = tmp_path / "images"
    job = WiseJob(metadata(tmp_path), out, resolution=32, knobs=FAST)
    rows = read_prompts(job.metadata_file)
    assert isinstance(rows[1], str) and "Prompt" in rows[1] and "repeated" in rows[2]
    counts = run_wise(pipe, job)
    assert counts == {"prompts": 4, "generated": 2, "skipped": 0, "failed": 2}
    for pid in (1, 7):
        picture = Image.open(out / f"{pid}.png")
        assert picture.size[0] <= 32 and picture.size[1] <= 32  # cropped to its bounding box at most
        assert (out / f"{pid}.txt").exists()  # the think text beside it
    bad = [json.loads(x) for x in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert [b["index"] for b in bad] == [1, 2]
    first = np.asarray(Image.open(out / "7.png"))
    (out / "7.png").unlink()
    stamp = (out / "1.png").stat().st_mtime_ns
    counts = run_wise(pipe, job)
    assert counts == {"prompts": 4, "generated": 1, "skipped": 1, "failed": 2}
    assert np.array_equal(np.asarray(Image.open(out / "7.png")), first)  # its own seed: the same picture
    assert (out / "1.png").stat().st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp*"))
    # without think: no .txt, and another picture
    plain = run_wise(pipe, WiseJob(metadata(tmp_path), tmp_path / "plain", think=False, resolution=32, knobs=FAST))
    assert plain["generated"] == 2 and not list((tmp_path / "plain").glob("*.txt"))


def test_the_command(tmp_path):
    out = tmp_path / "images"
    cmd = [sys.executable, "-m", "bagel_engine", "eval", "wise", str(metadata(tmp_path)), "-m", str(TINY), "-o",
           str(out), "--resolution", "32", "--num-timesteps", "2", "--max-think-tokens", "3", "--limit", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"prompts": 1, "generated": 1, "skipped": 0, "failed": 0}
    assert summary["settings"]["max_think_token_n"] == 3 and summary["settings"]["cfg_interval"] == [0.4, 1.0]
    assert summary["think"] is True
    assert (out / "1.png").exists() and (out / "1.txt").exists()
    assert "gpt_eval_mp.py" in r.stderr  # how to score it
