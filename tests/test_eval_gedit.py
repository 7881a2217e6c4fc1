"""`bagel eval gedit`: the official GEdit-Bench generation's settings (gen_images_gedit.py as run_gedit.sh runs it),
the dataset read from parquet in its own columns (as the hub serves it), the layout VIEScore reads, the
interleaved shards, resume, bad rows, and think's contexts as the eval scripts build them."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

import bagel_engine
from bagel_engine.eval.gedit import PRESET, GEditJob, parquet_files, read_rows, run_gedit
from bagel_engine.params import ImageParams, TextParams
from bagel_engine.runtime.engine import Request

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), color).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [
    {"key": "k0", "task_type": "color_alter", "instruction_language": "en", "instruction": "make it blue",
     "input_image": {"bytes": _png((200, 30, 30)), "path": None}},
    {"key": "k1", "task_type": "color_alter", "instruction_language": "cn", "instruction": "变成绿色",
     "input_image": {"bytes": _png((30, 200, 30)), "path": None}},
    {"key": "k2", "task_type": "subject-add", "instruction_language": "en", "instruction": "",
     "input_image": {"bytes": _png((30, 30, 200)), "path": None}},
    {"key": "k3", "task_type": "subject-add", "instruction_language": "en", "instruction": "add a cat",
     "input_image": {"bytes": b"not a picture", "path": None}},
    {"key": "k4", "task_type": "style_change", "instruction_language": "en", "instruction": "as a sketch",
     "input_image": {"bytes": _png((230, 230, 30)), "path": None}},
]
FAST = {"num_timesteps": 3}


def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "GEdit-Bench" / "data"
    folder.mkdir(parents=True)
    # two shards, as the hub lays the dataset out: read in name order, the dataset's order
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), folder / "train-00000-of-00002.parquet")
    return folder.parent


def test_the_preset_is_the_official_script_s():
    # process_dataset() from main(): cfg_text 4, cfg_img 1.5, interval [0.4, 1.0], renorm_min 0, text_channel,
    # shift 3.0, seed 42 before each edit; editing_with_text_img_cfg's 50 steps; think: temperature 0.3, 10240
    assert PRESET == {"cfg_text_scale": 4.0, "cfg_img_scale": 1.5, "cfg_interval": (0.4, 1.0), "timestep_shift": 3.0,
                      "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "text_channel",
                      "do_sample": True, "text_temperature": 0.3, "max_think_token_n": 10240}
    job = GEditJob("stepfun-ai/GEdit-Bench", Path("o"))
    assert (job.think, job.seed, job.language) == (False, 42, None)


def test_rows_are_read_in_the_dataset_s_order(tmp_path):
    rows = read_rows(parquet_files(str(dataset(tmp_path))))
    assert [r["key"] for r in rows] == ["k0", "k1", "k2", "k3", "k4"]


def test_layout_shards_resume_and_bad_rows(tmp_path):
    pipe = bagel_engine.load(TINY, device="cpu")
    data = str(dataset(tmp_path))
    out = tmp_path / "gen_image"
    counts = run_gedit(pipe, GEditJob(data, out, knobs=FAST))
    assert counts == {"rows": 5, "generated": 3, "skipped": 0, "failed": 2}
    for key, task, lang, color in (("k0", "color_alter", "en", (200, 30, 30)), ("k1", "color_alter", "cn", (30, 200, 30))):
        folder = out / "fullset" / task / lang
        assert Image.open(folder / f"{key}_SRCIMG.png").getpixel((0, 0)) == color  # the input, as it was
        edited = Image.open(folder / f"{key}.png")
        assert edited.size == pipe.edit(Image.new("RGB", (40, 24)), "x", seed=42, **FAST).image.size
    bad = [json.loads(x) for x in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert [b["index"] for b in bad] == [2, 3] and "instruction" in bad[0]["error"] and "is not an image" in bad[1]["error"]
    # every edit is made with seed 42, as set_seeds(42) before each: the picture of the edit made alone
    alone = pipe.edit(Image.open(io.BytesIO(ROWS[4]["input_image"]["bytes"])), "as a sketch", seed=42,
                      **(PRESET | FAST))
    made = out / "fullset" / "style_change" / "en" / "k4.png"
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(alone.image))
    # resume: only the lost edit is made again
    made.unlink()
    stamp = (out / "fullset" / "color_alter" / "en" / "k0.png").stat().st_mtime_ns
    counts = run_gedit(pipe, GEditJob(data, out, knobs=FAST))
    assert counts == {"rows": 5, "generated": 1, "skipped": 2, "failed": 2}
    assert (out / "fullset" / "color_alter" / "en" / "k0.png").stat().st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp*"))
    # the official shards are interleaved; --language keeps one language
    assert run_gedit(pipe, GEditJob(data, tmp_path / "r1", knobs=FAST, rank=1, world=2))["rows"] == 2  # rows 1, 3
    assert (tmp_path / "r1" / "fullset" / "color_alter" / "cn" / "k1.png").exists()
    assert run_gedit(pipe, GEditJob(data, tmp_path / "en", knobs=FAST, language="cn"))["generated"] == 1


def test_think_text_joins_the_image_unconditional_context_in_the_eval_scripts():
    pipe = bagel_engine.load(TINY, device="cpu")
    picture = Image.new("RGB", (40, 24), (200, 30, 30))
    contexts = {}
    for mode in ("app", "eval"):
        trace = {}
        pipe.engine.run([Request([picture, "make it blue"], think=True, seed=1, trace=trace, think_contexts=mode,
                                 text=TextParams(max_think_token_n=4), image=ImageParams(num_timesteps=3))])
        contexts[mode] = trace["contexts"]
    assert contexts["eval"]["cfg_img"].length > contexts["app"]["cfg_img"].length  # + the think text
    assert contexts["eval"]["gen"].length == contexts["app"]["gen"].length
    assert contexts["eval"]["cfg_text"].length == contexts["app"]["cfg_text"].length  # the snapshot after the image


def test_the_command(tmp_path):
    out = tmp_path / "gen_image"
    cmd = [sys.executable, "-m", "bagel_engine", "eval", "gedit", "--data", str(dataset(tmp_path)), "-m", str(TINY),
           "-o", str(out), "--num-timesteps", "2", "--limit", "2", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"rows": 2, "generated": 2, "skipped": 0, "failed": 0}
    assert summary["settings"]["cfg_renorm_type"] == "text_channel" and summary["settings"]["num_timesteps"] == 2
    assert (out / "fullset" / "color_alter" / "cn" / "k1.png").exists()
    assert "test_gedit_score.py" in r.stderr
    missing = subprocess.run([sys.executable, "-m", "bagel_engine", "eval", "gedit", "--data", str(tmp_path / "none"),
                              "-m", str(TINY), "-o", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no such file" in (missing.stdout + missing.stderr)
