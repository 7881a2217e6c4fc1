"""`bagel eval imgedit | kris | rise`: the official edit scripts' settings (gen_images_mp_{imgedit,kris,rise}.py as
run_*.sh run them), each benchmark's metadata and layout, the output at the first image's size, think's files
and contexts, resume, bad items, the command."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import bagel_engine
from bagel_engine.eval.edit_suites import PRESET, SUITES, EditSuiteJob, read_items, run_edit_suite

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"
FAST = {"num_timesteps": 3, "max_think_token_n": 4}


def _picture(path: Path, size, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def imgedit(tmp_path: Path) -> Path:
    root = tmp_path / "Benchmark" / "singleturn"
    _picture(root / "animal" / "a.jpg", (40, 24), (200, 30, 30))
    _picture(root / "style" / "b.png", (24, 40), (30, 30, 200))
    meta = {"1082": {"id": "animal/a.jpg", "prompt": "Add a hat", "edit_type": "add"},
            "1083": {"id": "style/missing.png", "prompt": "Make it a sketch", "edit_type": "style"},
            "1084": {"id": "style/b.png", "prompt": "", "edit_type": "style"},
            "1085": {"id": "style/b.png", "prompt": "Make it a sketch", "edit_type": "style"}}
    (root / "singleturn.json").write_text(json.dumps(meta))
    return root / "singleturn.json"


def kris(tmp_path: Path) -> Path:
    root = tmp_path / "kris"
    _picture(root / "KRIS_Bench" / "viewpoint_change" / "1.jpg", (40, 24), (30, 200, 30))
    _picture(root / "KRIS_Bench" / "multi-element_composition" / "2a.jpg", (24, 40), (200, 200, 30))
    _picture(root / "KRIS_Bench" / "multi-element_composition" / "2b.jpg", (40, 40), (30, 30, 200))
    meta = [{"type": "viewpoint_change", "id": 1, "ori_img": "1.jpg", "ins_en": "Show it from the top"},
            {"type": "multi-element_composition", "id": 2, "ori_img": ["2a.jpg", "2b.jpg"], "ins_en": "Put them together"},
            {"type": "../escape", "id": 3, "ori_img": "1.jpg", "ins_en": "x"}]
    (root / "final_data.json").write_text(json.dumps(meta))
    return root / "final_data.json"


def rise(tmp_path: Path) -> Path:
    root = tmp_path / "rise" / "data"
    _picture(root / "images" / "t1.png", (40, 24), (200, 30, 200))
    meta = [{"index": "temporal_1", "category": "temporal", "image": "images/t1.png", "instruction": "Ten years later"},
            {"index": "causal_2", "category": "causal", "instruction": "What happens next"}]
    (root / "datav2_total_w_subtask.json").write_text(json.dumps(meta))
    return root / "datav2_total_w_subtask.json"


def test_the_preset_is_the_official_scripts_():
    # main() of the three scripts: cfg_text 4, cfg_img 1.5 (argparse), interval [0, 1], shift 3, 50 steps,
    # renorm_min 0; editing_image's text_channel renorm; think: temperature 0.3, max_length 2048
    assert PRESET == {"cfg_text_scale": 4.0, "cfg_img_scale": 1.5, "cfg_interval": (0.0, 1.0), "timestep_shift": 3.0,
                      "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "text_channel",
                      "do_sample": True, "text_temperature": 0.3, "max_think_token_n": 2048}
    assert {name: s.think for name, s in SUITES.items()} == {"imgedit": False, "kris": True, "rise": True}  # run_*.sh


def test_each_benchmark_s_metadata_and_image_root(tmp_path):
    items = read_items(EditSuiteJob("imgedit", imgedit(tmp_path), tmp_path / "o"))
    assert [getattr(i, "name", None) for i in items] == ["1082", "1083", None, "1085"]
    assert items[0].images == (tmp_path / "Benchmark" / "singleturn" / "animal" / "a.jpg",)
    items = read_items(EditSuiteJob("kris", kris(tmp_path), tmp_path / "o"))
    assert items[1].name == "multi-element_composition/2" and len(items[1].images) == 2
    assert items[0].images[0] == tmp_path / "kris" / "KRIS_Bench" / "viewpoint_change" / "1.jpg"
    assert isinstance(items[2], str) and "path" in items[2]  # a name that would leave OUT
    items = read_items(EditSuiteJob("rise", rise(tmp_path), tmp_path / "o"))
    assert items[0].name == "temporal/temporal_1" and isinstance(items[1], str)


def test_imgedit_layout_resume_and_bad_items(tmp_path):
    pipe = bagel_engine.load(TINY, device="cpu")
    out = tmp_path / "bagel"
    job = EditSuiteJob("imgedit", imgedit(tmp_path), out, knobs=FAST)
    assert run_edit_suite(pipe, job) == {"prompts": 4, "generated": 2, "skipped": 0, "failed": 2}
    assert (out / "1082.png").exists() and (out / "1085.png").exists() and not list(out.glob("*.txt"))  # no think
    bad = [json.loads(x) for x in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert [b["index"] for b in bad] == [1, 2] and "not found (looked at" in bad[0]["error"]
    first = np.asarray(Image.open(out / "1085.png"))
    (out / "1085.png").unlink()
    stamp = (out / "1082.png").stat().st_mtime_ns
    assert run_edit_suite(pipe, job) == {"prompts": 4, "generated": 1, "skipped": 1, "failed": 2}
    assert np.array_equal(np.asarray(Image.open(out / "1085.png")), first)  # its own seed: the same edit
    assert (out / "1082.png").stat().st_mtime_ns == stamp and not list(out.rglob("*.tmp*"))


def test_kris_thinks_and_sizes_the_output_by_the_first_image(tmp_path):
    pipe = bagel_engine.load(TINY, device="cpu")
    out = tmp_path / "bagel"
    counts = run_edit_suite(pipe, EditSuiteJob("kris", kris(tmp_path), out, knobs=FAST))
    assert counts == {"prompts": 3, "generated": 2, "skipped": 0, "failed": 1}
    assert (out / "viewpoint_change" / "1.txt").exists() and (out / "multi-element_composition" / "2.txt").exists()
    # two inputs: the output takes the first one's size, the app's edit the last one's
    a, b = (Image.open(tmp_path / "kris" / "KRIS_Bench" / "multi-element_composition" / n) for n in ("2a.jpg", "2b.jpg"))
    first = pipe.edit([a, b], "x", seed=0, size_from=0, num_timesteps=2).image.size
    last = pipe.edit([a, b], "x", seed=0, num_timesteps=2).image.size
    assert first != last and first == pipe.edit(a, "x", seed=0, num_timesteps=2).image.size
    made = Image.open(out / "multi-element_composition" / "2.png").size
    assert made[0] <= first[0] and made[1] <= first[1]  # cropped to its box at most


def test_the_command(tmp_path):
    out = tmp_path / "bagel"
    cmd = [sys.executable, "-m", "bagel_engine", "eval", "rise", str(rise(tmp_path)), "-m", str(TINY), "-o", str(out),
           "--num-timesteps", "2", "--no-think", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"prompts": 2, "generated": 1, "skipped": 0, "failed": 1}
    assert summary["think"] is False and summary["settings"]["cfg_img_scale"] == 1.5
    assert (out / "temporal" / "temporal_1.png").exists() and not (out / "temporal" / "temporal_1.txt").exists()
    assert "gpt_eval.py" in r.stderr
