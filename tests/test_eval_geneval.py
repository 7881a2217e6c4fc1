"""`bagel eval geneval`: the official GenEval generation's settings and output layout (what GenEval's scorer
reads), resume without redoing a picture, bad lines recorded, the official split of prompts over ranks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bagel_engine.eval.geneval import PRESET, GenEvalJob, rank_range, read_metadata, run_geneval

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"
LINES = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
         "not json at all",
         {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}]


def metadata(tmp_path: Path) -> Path:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in LINES) + "\n")
    return path


def test_the_preset_is_the_official_script_s():
    # eval/gen/gen_images_mp.py: cfg_scale 4 (text only), interval [0, 1], shift 3, 50 steps, renorm_min 0
    assert PRESET == {"cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.0, 1.0), "timestep_shift": 3.0,
                      "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "global"}
    job = GenEvalJob(Path("m"), Path("o"))
    assert (job.n_samples, job.batch_size, job.resolution, job.seed) == (4, 1, 1024, 42)  # run_geneval.sh
    assert job.settings() == PRESET and GenEvalJob(Path("m"), Path("o"), knobs={"num_timesteps": 3}).settings()[
        "num_timesteps"] == 3


def test_prompts_are_split_as_the_official_script_splits_them():
    assert [list(rank_range(553, r, 8)) for r in (0, 7)] == [list(range(0, 70)), list(range(490, 553))]
    assert sum(len(rank_range(10, r, 3)) for r in range(3)) == 10 and len(rank_range(2, 2, 3)) == 0


def test_layout_resume_and_bad_lines(tmp_path):
    import bagel_engine

    pipe = bagel_engine.load(TINY, device="cpu")
    out = tmp_path / "images"
    job = GenEvalJob(metadata(tmp_path), out, n_samples=2, resolution=32, knobs={"num_timesteps": 3})
    assert isinstance(read_metadata(job.metadata_file)[1], str)
    counts = run_geneval(pipe, job)
    assert counts == {"prompts": 3, "generated": 2, "skipped": 0, "failed": 1}
    for index in (0, 2):
        assert json.loads((out / f"{index:05d}" / "metadata.jsonl").read_text()) == LINES[index]
        for k in range(2):
            picture = Image.open(out / f"{index:05d}" / "samples" / f"{k:05d}.png")
            assert picture.size[0] <= 32 and picture.size[1] <= 32  # cropped to its bounding box at most
    bad = [json.loads(x) for x in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert bad[0]["index"] == 1 and "not JSON" in bad[0]["error"]
    first = np.asarray(Image.open(out / "00002" / "samples" / "00001.png"))
    # a lost picture is the only one made again, and it comes out the same (its own seed)
    (out / "00002" / "samples" / "00001.png").unlink()
    stamp = (out / "00000" / "samples" / "00000.png").stat().st_mtime_ns
    counts = run_geneval(pipe, job)
    assert counts == {"prompts": 3, "generated": 1, "skipped": 1, "failed": 1}
    assert np.array_equal(np.asarray(Image.open(out / "00002" / "samples" / "00001.png")), first)
    assert (out / "00000" / "samples" / "00000.png").stat().st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp*"))


def test_the_command(tmp_path):
    out = tmp_path / "images"
    cmd = [sys.executable, "-m", "bagel_engine", "eval", "geneval", str(metadata(tmp_path)), "-m", str(TINY), "-o",
           str(out), "--n-samples", "1", "--resolution", "32", "--num-timesteps", "2", "--limit", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"prompts": 1, "generated": 1, "skipped": 0, "failed": 0}
    assert summary["settings"]["num_timesteps"] == 2 and summary["settings"]["cfg_text_scale"] == 4.0
    assert (out / "00000" / "samples" / "00000.png").exists() and not (out / "00002").exists()
    assert "evaluate_images" in r.stderr  # how to score it


def test_two_processes_draw_what_one_draws(tmp_path):
    """Under torchrun each rank takes its contiguous range; the pictures are those of one process."""
    import os

    common = [str(metadata(tmp_path)), "-m", str(TINY), "--n-samples", "1", "--resolution", "32",
              "--num-timesteps", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun gives each process one thread: the same float math
    one = subprocess.run([sys.executable, "-m", "bagel_engine", "eval", "geneval", "-o", str(tmp_path / "one"), *common],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bagel_engine.cli.main", "eval", "geneval", "-o", str(tmp_path / "two"), *common],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    summaries = sorted((json.loads(x) for x in two.stdout.splitlines() if x.startswith("{")), key=lambda s: s["rank"])
    assert [(s["rank"], s["world"], s["counts"]["prompts"]) for s in summaries] == [(0, 2, 2), (1, 2, 1)]
    for index in (0, 2):
        a, b = (np.asarray(Image.open(tmp_path / d / f"{index:05d}" / "samples" / "00000.png")) for d in ("one", "two"))
        assert np.array_equal(a, b), index
    assert "not JSON" in (tmp_path / "two" / "bad_rows.jsonl").read_text()
