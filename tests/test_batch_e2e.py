"""`bagel batch` end to end with the tiny golden checkpoint: good and bad rows, resume, retry,
overwrite, knob precedence, every task and input format, shards, kill -9, and two processes
under torchrun (gloo on the CPU) against one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import bagel_engine
import bagel_engine.cli.batch_cmd  # noqa: F401 - registers `batch`
from bagel_engine.batch import manifest as M
from bagel_engine.image_metadata import read_png_metadata
from bagel_engine.knobs import derive_seed
from bagel_engine.think_text import split_think
from bagel_engine.cli.main import app

DATA = Path(__file__).parent / "data" / "tiny-v1"
MODEL = DATA / "model"
IMAGE = DATA / "inputs" / "image_a.png"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    return bagel_engine.load(MODEL)


def batch(*args, env=None):
    env = {"BAGEL_MODEL": str(MODEL), **(env or {})}
    return CliRunner().invoke(app, ["batch", *[str(a) for a in args]], env=env)


def pixels(source) -> tuple:
    """A picture's size and pixels: written PNGs also carry metadata (prompt, seed, knobs)."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    return image.size, image.convert("RGB").tobytes()


def manifest(out: Path, stem: str = "manifest") -> list[dict]:
    return [json.loads(line) for line in (out / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines()]


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name.startswith("manifest.part-"))


# ----------------------------------------------------------------------------- edit: good and bad rows
def diffgentor_edit_file(folder: Path) -> Path:
    """A diffgentor-style BAGEL edit file: instruction + input_images (+ one of our knob columns)."""
    Image.open(IMAGE).save(folder / "a.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    csv = folder / "edits.csv"
    csv.write_text(
        "id,instruction,input_images,cfg_text_scale\n"
        "e1,make it blue,a.png,\n"
        'e2,make it red,"[""a.png"", ""a.png""]",5\n'
        "e3,missing image,later.png,\n"
        "e4,corrupt image,corrupt.png,\n"
        "e5,,a.png,\n"
        "e6,bad knob,a.png,lots\n"
        "e1,duplicate id,a.png,\n", encoding="utf-8")
    return csv


def test_edit_batch_good_and_bad_rows_resume_retry_overwrite(tmp_path, pipe):
    csv = diffgentor_edit_file(tmp_path)
    out = tmp_path / "out"
    r = batch(csv, "--task", "edit", "--output-dir", out, "--num-timesteps", 3)
    assert r.exit_code == 3, r.output
    assert "7 rows: 2 ok, 5 failed" in r.stderr
    records = manifest(out)
    assert [x["id"] for x in records] == ["e1", "e2", "e3", "e4", "e5", "e6", "e1@row6"]
    assert [x["status"] for x in records] == ["ok", "ok"] + ["failed"] * 5
    errors = {x["id"]: x["error"] for x in records}
    assert "'later.png' not found" in errors["e3"]
    assert "corrupt.png" in errors["e4"] and "image" in errors["e4"]
    assert "empty prompt" in errors["e5"]
    assert "column 'cfg_text_scale': expected a number" in errors["e6"]
    assert "duplicate id 'e1'" in errors["e1@row6"]
    rows = by_id(records)
    # the row's seed comes from the base seed (0) and its id; the image is what the API draws
    assert rows["e1"]["seed"] == derive_seed(0, "e1") and rows["e1"]["output"] == "e1.png"
    expected = pipe.edit(Image.open(IMAGE), "make it blue", seed=derive_seed(0, "e1"), num_timesteps=3)
    assert pixels(out / "e1.png") == pixels(expected.image)
    meta = read_png_metadata(out / "e1.png")  # the picture says how it was made
    assert (meta["task"], meta["prompt"], meta["seed"]) == ("edit", "make it blue", derive_seed(0, "e1"))
    assert meta["parameters"]["num_timesteps"] == 3
    assert rows["e2"]["params"]["cfg_text_scale"] == 5.0 and rows["e2"]["params"]["num_timesteps"] == 3
    assert rows["e2"]["inputs"] == ["a.png", "a.png"] and rows["e2"]["timings"]["denoise_s"] > 0
    assert sorted(p.name for p in out.glob("*.png")) == ["e1.png", "e2.png"]
    csv_lines = (out / "manifest.csv").read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("id,index,status,output,text,think,answer,error,seed") and len(csv_lines) == 8
    assert leftovers(out) == []

    # resume: nothing to do, nothing changes
    r = batch(csv, "--task", "edit", "--output-dir", out, "--num-timesteps", 3)
    assert r.exit_code == 3 and "0 this run, 7 from earlier runs" in r.stderr
    assert manifest(out) == records

    # the missing image appears: --retry-failed redoes the failed rows only
    Image.open(IMAGE).save(tmp_path / "later.png")
    r = batch(csv, "--task", "edit", "--output-dir", out, "--num-timesteps", 3, "--retry-failed", "--json")
    assert r.exit_code == 3
    summary = json.loads(r.stdout)
    assert (summary["ok"], summary["failed"], summary["processed"], summary["skipped"]) == (3, 4, 5, 2)
    after = by_id(manifest(out))
    assert after["e3"]["status"] == "ok" and (out / "e3.png").exists()
    assert after["e1"] == rows["e1"]  # finished rows untouched

    # --overwrite redoes everything; the same seeds give the same images
    before = (out / "e1.png").read_bytes()
    r = batch(csv, "--task", "edit", "--output-dir", out, "--num-timesteps", 3, "--overwrite")
    assert r.exit_code == 3 and "7 this run" in r.stderr
    assert by_id(manifest(out))["e1"]["finished_at"] > rows["e1"]["finished_at"]
    assert (out / "e1.png").read_bytes() == before


def test_a_diffgentor_job_output_names_results_csv_variables_and_preset(tmp_path, pipe):
    Image.open(IMAGE).save(tmp_path / "a.png")
    csv = tmp_path / "dg.csv"
    csv.write_text(
        "index,instruction,input_images,output_path,category\n"
        "0,make it blue,a.png,shapes/combo.jpg,colour\n"
        "1,make it red,a.png,b/two.webp,colour\n"
        "2,make it green,a.png,,colour\n"
        "3,escape,a.png,../escape.png,bad\n"
        "4,animated,a.png,x.gif,bad\n", encoding="utf-8")
    out = tmp_path / "out"
    env = {"DG_BAGEL_NUM_TIMESTEPS": "3", "DG_BAGEL_CFG_TXT_SCALE": "9"}
    r = batch(csv, "--task", "edit", "-o", out, "--output-name-column", "output_path", env=env)
    assert r.exit_code == 3, r.output
    assert "DG_BAGEL_CFG_TXT_SCALE is not one bagel reads and is ignored (did you mean DG_BAGEL_CFG_TEXT_SCALE?)" \
        in r.stderr
    assert "diffgentor's defaults (DG_BAGEL_* variables are set" in r.stderr
    # the row's own path, sub-folders made, the suffix choosing the format; a blank cell: the default name
    assert Image.open(out / "shapes" / "combo.jpg").format == "JPEG"
    assert Image.open(out / "b" / "two.webp").format == "WEBP"
    assert (out / "000002.png").exists() and not (tmp_path / "escape.png").exists()
    rows = by_id(manifest(out))
    assert rows["0"]["output"] == "shapes/combo.jpg"
    assert "not a relative path inside the output folder" in rows["3"]["error"]
    assert "ends in .gif" in rows["4"]["error"]
    # diffgentor's defaults under the variables: its guidance, renorm and interval, our step count from DG_BAGEL_*
    params = rows["2"]["params"]
    assert (params["cfg_text_scale"], params["cfg_img_scale"], params["cfg_renorm_type"], params["num_timesteps"]) == (
        3.0, 1.5, "global", 3) and list(params["cfg_interval"]) == [0.4, 1.0]
    expected = pipe.edit(Image.open(IMAGE), "make it green", seed=derive_seed(0, "2"), num_timesteps=3,
                         cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
    assert pixels(out / "000002.png") == pixels(expected.image)
    # results.csv: the input columns plus output_image, as diffgentor writes it
    import csv as csv_module

    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        results = list(csv_module.DictReader(f))
    assert list(results[0]) == ["index", "instruction", "input_images", "output_path", "category", "output_image"]
    assert [x["output_image"] for x in results] == ["shapes/combo.jpg", "b/two.webp", "000002.png", "", ""]
    assert results[1]["category"] == "colour"
    # resume finds the named outputs; --preset official keeps the official edit defaults under the same variables
    r = batch(csv, "--task", "edit", "-o", out, "--output-name-column", "output_path", env=env)
    assert "0 this run" in r.stderr, r.stderr
    r = batch(csv, "--task", "edit", "-o", tmp_path / "official", "--rows", "2", "--preset", "official", env=env)
    params = by_id(manifest(tmp_path / "official"))["2"]["params"]
    assert (params["cfg_text_scale"], params["cfg_img_scale"], params["cfg_renorm_type"]) == (4.0, 2.0, "text_channel")


# ----------------------------------------------------------------------------- t2i: knobs and seeds
def test_t2i_knob_precedence_row_flag_variable_default(tmp_path, pipe):
    src = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "prompt": "a red fox", "height": 32, "width": 32},
        {"id": "b", "prompt": "a blue car", "height": 32, "width": 48, "cfg_text_scale": 6, "seed": 11,
         "num_timesteps": 4, "cfg_interval": "0.2,0.8"},
        {"id": "c", "prompt": "a poster", "think": True, "max_think_tokens": 5, "height": 32, "width": 32},
        {"id": "d", "prompt": "too big", "height": 1024, "width": 32},
    ])
    env = {"DG_BAGEL_CFG_TEXT_SCALE": "3.0", "DG_BAGEL_TIMESTEP_SHIFT": "2.0", "DG_BAGEL_NUM_TIMESTEPS": "5",
           "DG_BAGEL_THINK": "false"}
    out = tmp_path / "out"
    r = batch(src, "--task", "t2i", "-o", out, "--num-timesteps", 3, "--seed", 5, "--cfg-renorm-type", "channel",
              env=env)
    assert r.exit_code == 3, r.output
    rows = by_id(manifest(out))
    a, b, c, d = (rows[k] for k in "abcd")
    assert a["params"]["cfg_text_scale"] == 3.0  # variable
    assert a["params"]["timestep_shift"] == 2.0  # variable
    assert a["params"]["num_timesteps"] == 3  # flag beats variable
    assert a["params"]["cfg_renorm_type"] == "channel"  # flag
    assert a["params"]["cfg_img_scale"] == 1.5  # the API's text-to-image default
    assert a["seed"] == derive_seed(5, "a")
    assert (b["params"]["cfg_text_scale"], b["params"]["num_timesteps"], b["seed"]) == (6.0, 4, 11)  # row
    assert b["params"]["cfg_interval"] == [0.2, 0.8]
    expected = pipe.generate("a blue car", height=32, width=48, cfg_text_scale=6.0, timestep_shift=2.0,
                             num_timesteps=4, cfg_interval=(0.2, 0.8), cfg_renorm_type="channel", seed=11)
    assert pixels(out / "b.png") == pixels(expected.image)
    expected = pipe.generate("a poster", height=32, width=32, think=True, max_think_token_n=5, cfg_text_scale=3.0,
                             timestep_shift=2.0, num_timesteps=3, cfg_renorm_type="channel",
                             seed=derive_seed(5, "c"))
    assert c["text"] == expected.text and c["text"]  # the think text is kept
    assert pixels(out / "c.png") == pixels(expected.image)
    assert d["status"] == "failed" and "height 1024 is not supported" in d["error"]
    Image.open(out / "a.png").load()


# ----------------------------------------------------------------------------- text tasks and Parquet
def test_understand_from_parquet_bytes_and_chat_from_jsonl(tmp_path, pipe):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = IMAGE.read_bytes()
    pq.write_table(pa.table({
        "index": [0, 1, 2],
        "question": ["What is it?", "Which color?", "Broken?"],
        "image": [{"bytes": data, "path": "a.png"}, {"bytes": data, "path": None}, {"bytes": b"junk", "path": None}],
        "max_new_tokens": [6, 4, 6],
    }), tmp_path / "qa.parquet")
    out = tmp_path / "qa"
    r = batch(tmp_path / "qa.parquet", "--task", "understand", "-o", out, "--json")
    assert r.exit_code == 3, r.output
    rows = by_id(manifest(out))
    expected = pipe.understand(Image.open(IMAGE), "Which color?", max_new_tokens=4, seed=derive_seed(0, "1"))
    assert rows["1"]["status"] == "ok" and rows["1"]["text"] == expected.text and rows["1"]["output"] is None
    assert rows["0"]["inputs"] == ["a.png"]
    assert rows["2"]["status"] == "failed" and "not an image" in rows["2"]["error"]
    assert list(out.glob("*.png")) == []

    chats = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "Hi"}, {"prompt": "Name a color.", "temperature": 0.9,
                                                                       "do_sample": "true"}])
    out = tmp_path / "chat"
    r = batch(chats, "--task", "chat", "-o", out, "--max-think-tokens", 7)  # the answer length for text tasks
    assert r.exit_code == 0, r.output
    rows = by_id(manifest(out))
    expected = pipe.chat("Name a color.", max_new_tokens=7, do_sample=True, text_temperature=0.9,
                         seed=derive_seed(0, "1"))
    assert rows["1"]["text"] == expected.text and rows["1"]["params"]["max_think_token_n"] == 7


def test_manifest_has_think_and_answer_iso_times_params_of_failed_rows_and_names_typos(tmp_path, pipe):
    src = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "plain", "prompt": "Name a color.", "max_new_tokens": 6},
        {"id": "thinks", "prompt": "Name a color.", "think": True, "max_new_tokens": 9},
        {"id": "bad", "prompt": "Name a color.", "temperature": "hot", "do_sample": "yes"},
        {"id": "typo", "prompt": "Hi", "max_new_tokns": 3, "cfg_text_scale": 4, "category": "greeting"},
    ])
    out = tmp_path / "out"
    r = batch(src, "--task", "chat", "-o", out, "--max-think-tokens", 5)
    assert r.exit_code == 3, r.output
    # the misspelt column and the picture knob are named; a column that is no knob's look-alike is carried silently
    assert "column 'max_new_tokns' is not a knob and is ignored (did you mean 'max_new_tokens'?)" in r.stderr
    assert "column 'cfg_text_scale' sets cfg_text_scale, which applies to t2i, edit, not chat: ignored" in r.stderr
    assert "category" not in r.stderr
    rows = by_id(manifest(out))
    plain = pipe.chat("Name a color.", max_new_tokens=6, seed=derive_seed(0, "plain"))
    assert rows["plain"]["answer"] == rows["plain"]["text"] == plain.text and rows["plain"]["think"] is None
    thinks = pipe.chat("Name a color.", think=True, max_new_tokens=9, seed=derive_seed(0, "thinks"))
    assert rows["thinks"]["text"] == thinks.text
    assert (rows["thinks"]["think"], rows["thinks"]["answer"]) == split_think(thinks.text)
    # a row that fails before its knobs parse keeps what it asked for
    assert rows["bad"]["status"] == "failed" and "column 'temperature'" in rows["bad"]["error"]
    assert rows["bad"]["params"] == {"max_new_tokens": 5, "temperature": "hot", "do_sample": "yes"}
    when = datetime.fromisoformat(rows["plain"]["finished_at"])  # ISO-8601, in UTC
    assert when.utcoffset() == timedelta(0) and abs(when.timestamp() - time.time()) < 600
    header = (out / "manifest.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert header[header.index("text"):header.index("text") + 3] == ["text", "think", "answer"]


def test_bad_job_input_exits_2(tmp_path):
    r = batch(tmp_path / "none.csv", "--task", "edit", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "input not found" in r.stderr
    src = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "x"}])
    r = batch(src, "--task", "t2i", "-o", tmp_path / "o", "--shard", "2/2")
    assert r.exit_code == 2 and "--shard" in r.stderr
    r = batch(src, "--task", "t2i", "-o", tmp_path / "o", env={"DG_BAGEL_CFG_INTERVAL": "wide"})
    assert r.exit_code == 2 and "DG_BAGEL_CFG_INTERVAL" in r.stderr
    r = batch(src, "--task", "paint", "-o", tmp_path / "o")
    assert r.exit_code == 2
    r = batch(src, "--task", "t2i", "-o", tmp_path / "o", env={"BAGEL_MODEL": None})
    assert r.exit_code == 2 and "no model" in r.stderr


# ----------------------------------------------------------------------------- shards
def test_shards_then_one_merged_manifest(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"thing {i}"} for i in range(5)])
    out = tmp_path / "out"
    common = ["--task", "t2i", "-o", out, "--height", 32, "--width", 32, "--num-timesteps", 3]
    for k in range(2):
        r = batch(src, *common, "--shard", f"{k}/2")
        assert r.exit_code == 0, r.output
    assert [x["id"] for x in manifest(out, "manifest.shard0of2")] == ["0", "2", "4"]
    assert [x["id"] for x in manifest(out, "manifest.shard1of2")] == ["1", "3"]
    r = batch(src, *common)  # everything is done: only merges
    assert r.exit_code == 0 and "0 this run, 5 from earlier runs" in r.stderr
    assert [x["id"] for x in manifest(out)] == ["0", "1", "2", "3", "4"]
    before = by_id(manifest(out))
    r = batch(src, *common, "--rows", "1:3", "--overwrite", "--json")
    summary = json.loads(r.stdout)
    assert (summary["rows"], summary["processed"], summary["skipped"]) == (2, 2, 0)
    after = by_id(manifest(out))  # rows outside --rows keep their records
    assert list(after) == ["0", "1", "2", "3", "4"]
    assert [k for k in after if after[k] != before[k]] == ["1", "2"]


# ----------------------------------------------------------------------------- processes
def cli(*args) -> list[str]:
    return [sys.executable, "-m", "bagel_engine.cli.main", "batch", *[str(a) for a in args]]


def test_two_processes_give_the_one_process_images(tmp_path):
    rows = [{"prompt": f"scene {i}", "width": 32 if i % 2 else 48} for i in range(7)]
    rows[3] = {"prompt": "", "width": 32}  # a failed row on rank 1
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    common = ["--task", "t2i", "--height", 32, "--num-timesteps", 3, "--model", MODEL, "--no-progress"]
    # torchrun gives each process one thread; the single process gets one too, so the float math is the same
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(cli(src, "-o", tmp_path / "one", *common), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 3, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "bagel_engine.cli.main", "batch", str(src), "-o", str(tmp_path / "two"), *map(str, common)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode != 0  # a row failed: every rank exits 3, torchrun reports it
    assert "7 rows: 6 ok, 1 failed" in two.stderr and "on 2 processes" in two.stderr
    a, b = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert [(x["id"], x["status"], x["seed"], x["error"]) for x in a] == [
        (x["id"], x["status"], x["seed"], x["error"]) for x in b]
    assert {x["rank"] for x in b} == {0, 1} and {x["rank"] for x in a} == {0}
    images = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(images) == 6 and images == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in images:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert leftovers(tmp_path / "two") == []


def test_kill_9_mid_batch_then_resume(tmp_path, pipe):
    n = 40
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i:02d}", "prompt": f"picture {i}"} for i in range(n)])
    out = tmp_path / "out"
    args = [src, "--task", "t2i", "-o", out, "--height", 64, "--width", 64, "--num-timesteps", 10, "--model", MODEL]
    proc = subprocess.Popen(cli(*args, "--no-progress"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    part = M.part_path(out, None, 0, 1)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        second = batch(*args)  # a second job on the same folder while the first runs: refused, nothing touched
        assert second.exit_code == 2 and f"in use by another batch job (pid {proc.pid}" in second.output
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.jsonl").exists()  # killed before the end
    done_before = {r["id"] for r in M.read_records(part)}
    assert 5 <= len(done_before) < n

    assert (out / ".bagel-lock-all.json").exists()  # the killed job's lock, stale: the resume takes it over
    r = batch(*args, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ok"] == n and summary["skipped"] == len(done_before)
    assert summary["processed"] == n - len(done_before)
    records = manifest(out)
    assert [x["id"] for x in records] == [f"r{i:02d}" for i in range(n)]  # every row exactly once
    assert all(x["status"] == "ok" for x in records)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"r{i:02d}.png" for i in range(n)] + ["manifest.csv", "manifest.jsonl", "results.csv"])  # no temp or part files
    for i in range(n):
        with Image.open(out / f"r{i:02d}.png") as im:
            im.load()
            assert im.size == (64, 64)
    # a row done before the kill and one done after are both what the API draws for their seeds
    first_after = next(f"r{i:02d}" for i in range(n) if f"r{i:02d}" not in done_before)
    for key in ("r00", first_after):
        i = int(key[1:])
        expected = pipe.generate(f"picture {i}", height=64, width=64, num_timesteps=10, seed=derive_seed(0, key))
        assert pixels(out / f"{key}.png") == pixels(expected.image), key


# ----------------------------------------------------------------------------- t2i rows denoised together
def test_t2i_batch_size_groups_rows_and_keeps_each_rows_image(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"a small house number {i}"} for i in range(5)]
    rows.insert(2, {"id": "bad", "prompt": ""})
    rows.append({"id": "big", "prompt": "a wide one", "width": 48})  # other size: its own group
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    common = ["--task", "t2i", "--height", 32, "--width", 32, "--num-timesteps", 3, "--no-progress"]
    one = batch(src, "-o", tmp_path / "one", *common)
    many = batch(src, "-o", tmp_path / "many", *common, "--batch-size", 4)
    assert one.exit_code == many.exit_code == 3, many.output
    a, b = by_id(manifest(tmp_path / "one")), by_id(manifest(tmp_path / "many"))
    assert b["bad"]["status"] == "failed" and "prompt" in b["bad"]["error"]
    assert {k for k, r in b.items() if r["status"] == "ok"} == {k for k, r in a.items() if r["status"] == "ok"}
    # Chunks of 4 rows in order: [r0 r1 bad r2] -> one call for 3 images; [r3 r4 big] -> 2 + 1.
    stepped_with = {k: r["timings"]["batch"] for k, r in b.items() if r["status"] == "ok"}
    assert stepped_with == {"r0": 3, "r1": 3, "r2": 3, "r3": 2, "r4": 2, "big": 1}
    assert all(r["timings"]["batch"] == 1 for r in a.values() if r["status"] == "ok")
    for key, record in b.items():
        if record["status"] != "ok":
            continue
        assert record["seed"] == a[key]["seed"]
        x = Image.open(tmp_path / "many" / record["output"])
        y = Image.open(tmp_path / "one" / a[key]["output"])
        assert x.size == y.size
        # The same image up to float rounding of a batched forward (a pixel may move by one level).
        diff = [abs(p - q) for p, q in zip(x.tobytes(), y.tobytes())]
        assert max(diff) <= 1 and sum(d > 0 for d in diff) <= 0.005 * len(diff)


# ----------------------------------------------------------------------------- disk full
def test_disk_full_stops_the_batch_cleanly_and_the_rerun_resumes(tmp_path, monkeypatch):
    import errno

    n = 6
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"picture {i}"} for i in range(n)])
    out = tmp_path / "out"
    args = [src, "--task", "t2i", "-o", out, "--height", 32, "--width", 32, "--num-timesteps", 2]
    real_fsync, full = os.fsync, {"after": 3, "writes": 0}

    def fsync(fd):  # the disk fills up after 3 images: the 4th image's fsync fails with ENOSPC
        if os.readlink(f"/proc/self/fd/{fd}").endswith(M.TMP_MARK):
            full["writes"] += 1
            if full["writes"] > full["after"]:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(M.os, "fsync", fsync)
    r = batch(*args)
    assert r.exit_code == 2 and "no space left on the device" in r.output and "rerun the same command" in r.output
    assert sorted(p.name for p in out.glob("*.png")) == ["r0.png", "r1.png", "r2.png"]
    assert leftovers(out) == ["manifest.part-all-r0of1.jsonl"]  # no temp file, no lock: only the finished rows
    assert [x["id"] for x in M.read_records(out / "manifest.part-all-r0of1.jsonl")] == ["r0", "r1", "r2"]
    full["after"] = 10**9  # space freed
    r = batch(*args, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ok"] == n and summary["skipped"] == 3 and summary["processed"] == 3
    assert leftovers(out) == []


def test_a_record_that_cannot_be_written_leaves_no_half_line(tmp_path, monkeypatch):
    import errno

    from bagel_engine.params import DiskFull

    part = M.part_path(tmp_path, None, 0, 1)
    with M.PartWriter(part) as w:
        w.append({"id": "a", "status": "ok"})
        real_write = os.write

        def half_then_full(fd, data):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(M.os, "write", half_then_full)
        with pytest.raises(DiskFull, match="record of row 'b'"):
            w.append({"id": "b", "status": "ok", "text": "x" * 100})
        monkeypatch.setattr(M.os, "write", real_write)
        w.append({"id": "c", "status": "ok"})
    assert [x["id"] for x in M.read_records(part)] == ["a", "c"] and part.read_bytes().count(b"\n") == 2
