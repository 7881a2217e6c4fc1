"""Unit tests of the batch package without a model: knobs, inputs, ids, manifest, sharding."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from bagel_engine.batch import dist as D
from bagel_engine import knobs as K
from bagel_engine.batch import manifest as M
from bagel_engine.batch.reader import read_rows
from bagel_engine.batch.request import build_call, image_values, plan_rows
from bagel_engine.params import BagelInputError


def png_bytes(color=(200, 30, 30), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- knobs
def test_knob_parsers_accept_cells_json_and_env_values():
    assert K.parse_float(" 4 ") == 4.0 and K.parse_float(3) == 3.0
    assert K.parse_int("50") == 50 and K.parse_int("50.0") == 50 and K.parse_int(7.0) == 7
    assert K.parse_bool("True") is True and K.parse_bool("0") is False and K.parse_bool(False) is False
    assert K.parse_interval("0.4,1.0") == (0.4, 1.0)
    assert K.parse_interval("[0, 1]") == (0.0, 1.0)
    assert K.parse_interval("0.1 0.9") == (0.1, 0.9)
    assert K.parse_interval([0.2, 0.8]) == (0.2, 0.8)
    assert K.parse_renorm("text_channel") == "text_channel"
    for parse, bad in [(K.parse_float, "abc"), (K.parse_float, "nan"), (K.parse_int, "1.5"), (K.parse_int, True),
                       (K.parse_bool, "maybe"), (K.parse_interval, "1"), (K.parse_interval, "[1,"),
                       (K.parse_renorm, "local"), (K.parse_seed, -1)]:
        with pytest.raises(ValueError):
            parse(bad)


def test_row_knobs_aliases_blank_cells_and_task_filter():
    row = {"cfg_text_scale": "5", "steps": "12", "temperature": "0.7", "think": "yes", "height": "",
           "max_think_tokens": "64", "category": "whatever"}
    assert K.row_knobs(row, "t2i") == {"cfg_text_scale": 5.0, "num_timesteps": 12, "text_temperature": 0.7,
                                       "think": True, "max_think_token_n": 64}
    # text tasks ignore image knobs; max_think_tokens is the answer length there
    assert K.row_knobs(row, "chat") == {"text_temperature": 0.7, "think": True, "max_new_tokens": 64}
    # a knob set by two columns (its name and an alias) is an error that names both
    with pytest.raises(BagelInputError, match="columns 'num_timesteps' and 'steps' both set num_timesteps"):
        K.row_knobs({"num_timesteps": "20", "steps": "5"}, "edit")
    with pytest.raises(BagelInputError, match="column 'cfg_img_scale': expected a number"):
        K.row_knobs({"cfg_img_scale": "x"}, "edit")


def test_diffgentor_variables_and_precedence():
    env = {"DG_BAGEL_CFG_TEXT_SCALE": "3.0", "DG_BAGEL_CFG_IMG_SCALE": "1.5", "DG_BAGEL_CFG_INTERVAL": "0.4,1.0",
           "DG_BAGEL_TIMESTEP_SHIFT": "2.5", "DG_BAGEL_NUM_TIMESTEPS": "30", "DG_BAGEL_THINK": "true"}
    assert K.env_knobs("edit", env) == {"cfg_text_scale": 3.0, "cfg_img_scale": 1.5, "cfg_interval": (0.4, 1.0),
                                        "timestep_shift": 2.5, "num_timesteps": 30, "think": True}
    assert K.env_knobs("chat", env) == {"think": True}
    with pytest.raises(BagelInputError, match="DG_BAGEL_THINK"):
        K.env_knobs("edit", {"DG_BAGEL_THINK": "perhaps"})
    # cli: None means unset; max_think_token_n feeds max_new_tokens for text tasks
    assert K.cli_knobs({"cfg_text_scale": None, "num_timesteps": 5, "max_think_token_n": 9}, "edit") == {
        "num_timesteps": 5, "max_think_token_n": 9}
    assert K.cli_knobs({"num_timesteps": 5, "max_think_token_n": 9}, "understand") == {"max_new_tokens": 9}


def test_derived_seed_is_stable_and_spread():
    assert K.derive_seed(0, "e1") == 808014897  # pinned: reruns anywhere give the same seed
    seeds = {K.derive_seed(0, str(i)) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert K.derive_seed(1, "e1") != K.derive_seed(0, "e1")


# ----------------------------------------------------------------------------- inputs
def test_reads_csv_jsonl_json_and_folders(tmp_path):
    (tmp_path / "a.csv").write_text("ID,Instruction,cfg-text-scale\nx,hello,\ny,world,5\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"prompt": "p", "index": 3}\n\nnot json\n[1]\n', encoding="utf-8")
    (tmp_path / "c.json").write_text('[{"prompt": "q"}]', encoding="utf-8")
    (tmp_path / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"id": "x", "status": "ok"}\n')  # the output folder is never input
    rows = read_rows(tmp_path, exclude=out)
    assert [r.position for r in rows] == list(range(6))
    assert rows[0].data == {"id": "x", "instruction": "hello", "cfg_text_scale": None}
    assert rows[1].get("cfg_text_scale") == "5"
    assert rows[2].data == {"prompt": "p", "index": 3} and rows[2].line == 1
    assert "not valid JSON" in rows[3].error and rows[3].line == 3
    assert "expected a JSON object" in rows[4].error
    assert rows[5].source.name == "c.json"
    with pytest.raises(BagelInputError, match="input not found"):
        read_rows(tmp_path / "nope.csv")
    with pytest.raises(BagelInputError, match="expected one of"):
        read_rows(tmp_path / "notes.txt")
    (tmp_path / "latin.csv").write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(BagelInputError, match="not UTF-8"):
        read_rows(tmp_path / "latin.csv")


def test_parquet_with_embedded_bytes_is_read_lazily(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    images = [png_bytes((i * 40, 0, 0)) for i in range(5)]
    table = pa.table({"instruction": [f"edit {i}" for i in range(5)], "input_images": [[b] for b in images],
                      "index": list(range(10, 15))})
    pq.write_table(table, tmp_path / "edits.parquet", row_group_size=2)
    rows = read_rows(tmp_path / "edits.parquet")
    assert len(rows) == 5 and rows[4].get("instruction") == "edit 4"
    assert type(rows[3].data["input_images"]).__name__ == "LazyCell"
    assert rows[3].get("input_images") == [images[3]] and rows[0].get("input_images") == [images[0]]
    plans = plan_rows(rows, "edit")
    call = build_call(plans[3], "edit", {}, 0)
    assert call.args[0][0].getpixel((0, 0)) == (120, 0, 0) and call.args[1] == "edit 3"
    assert plans[3].output == "000013.png" and call.inputs == ["<%d bytes>" % len(images[3])]


def test_ids_outputs_and_duplicates(tmp_path):
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "a/b c", "prompt": "1"}, {"id": 7.0, "prompt": "2"}, {"prompt": "3"}, {"index": "4", "prompt": "4"},
        {"id": "a/b c", "prompt": "5"}, {"id": "a_b_c", "prompt": "6"}, {"index": "x", "prompt": "7"}]) + "\n")
    plans = plan_rows(read_rows(tmp_path / "x.jsonl"), "t2i")
    assert [(p.key, p.output) for p in plans[:4]] == [
        ("a/b c", "a_b_c.png"), ("7", "7.png"), ("2", "000002.png"), ("4", "000004.png")]
    assert "duplicate id 'a/b c'" in plans[4].error and plans[4].key == "a/b c@row4"
    assert "already used" in plans[5].error
    assert "column 'index'" in plans[6].error
    assert len({p.key for p in plans}) == len({p.output for p in plans}) == len(plans)
    assert all(p.output is None for p in plan_rows(read_rows(tmp_path / "x.jsonl"), "chat"))


def test_image_columns_order_and_forms(tmp_path):
    (tmp_path / "img.png").write_bytes(png_bytes())
    rows_file = tmp_path / "r.csv"
    rows_file.write_text(
        'prompt,image_url_2,image_url,input_images\n'
        'p,img.png,' + (tmp_path / "img.png").as_uri() + ',"[""img.png"", ""img.png""]"\n'
        'p,,,"img.png, img.png"\n', encoding="utf-8")
    rows = read_rows(rows_file)
    assert [c for c, _ in image_values(rows[0])] == ["image_url", "image_url_2", "input_images", "input_images"]
    assert [v for _, v in image_values(rows[1])] == ["img.png", "img.png"]
    call = build_call(plan_rows(rows, "edit")[0], "edit", {}, 0)
    assert len(call.args[0]) == 4 and all(im.size == (12, 8) for im in call.args[0])


@pytest.mark.parametrize("row,error", [
    ({"prompt": "p"}, "no input image"),
    ({"prompt": "p", "image": "missing.png"}, "image 1 \\(column image\\) 'missing.png' not found"),
    ({"prompt": "p", "image": "bad.png"}, "is not an image"),
    ({"prompt": "p", "image": "empty.png"}, "is empty"),
    ({"prompt": "  ", "image": "ok.png"}, "empty prompt"),
    ({"caption": "x", "image": "ok.png"}, "no prompt"),
    ({"prompt": "p", "image": "ok.png", "cfg_renorm_type": "nope"}, "cfg_renorm_type"),
    ({"prompt": "p", "image": "data:image/png;base64,@@@"}, "invalid base64"),
])
def test_bad_rows_raise_clear_errors(tmp_path, row, error):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "in.jsonl").write_text(json.dumps(row) + "\n")
    plan = plan_rows(read_rows(tmp_path / "in.jsonl"), "edit")[0]
    with pytest.raises(BagelInputError, match=error):
        build_call(plan, "edit", {}, 0)


def test_build_call_merges_knobs_and_seeds(tmp_path):
    import base64

    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "x", "image": data_url, "cfg_text_scale": 6},
        {"id": "b", "prompt": "y", "image": data_url, "seed": 123}]) + "\n")
    plans = plan_rows(read_rows(tmp_path / "in.jsonl"), "edit")
    base = {"cfg_text_scale": 3.0, "num_timesteps": 5}
    a, b = (build_call(p, "edit", base, 9) for p in plans)
    assert a.method == "edit" and a.kwargs == {"cfg_text_scale": 6, "num_timesteps": 5,
                                               "seed": K.derive_seed(9, "a")}
    assert b.seed == 123 and b.kwargs["cfg_text_scale"] == 3.0
    assert a.inputs[0].startswith("data:image/png;base64,") and len(a.inputs[0]) < 50


# ----------------------------------------------------------------------------- manifest
def test_atomic_write_and_temp_cleanup(tmp_path):
    target = tmp_path / "x.bin"
    M.atomic_write_bytes(target, b"one")
    M.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    dead = _dead_pid()
    (tmp_path / f".y.png.{dead}{M.TMP_MARK}").write_bytes(b"half")  # the old name (no host)
    (tmp_path / f".z.png.{dead}@{M.HOST_TAG}{M.TMP_MARK}").write_bytes(b"half")
    live = [f".w.png.{os.getppid()}@{M.HOST_TAG}{M.TMP_MARK}", f".v.png.{dead}@elsewhere{M.TMP_MARK}"]
    for name in live:  # a live writer's, and another host's (whose pids cannot be checked)
        (tmp_path / name).write_bytes(b"being written")
    assert M.remove_temp_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.bin", *live])


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    from bagel_engine.batch.lock import HOST, FolderLock

    first = FolderLock(tmp_path)
    first.acquire()
    holder = json.loads(first.path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == HOST
    with pytest.raises(BagelInputError, match=rf"in use by another batch job \(pid {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    FolderLock(tmp_path, "s0of2").acquire()  # another shard of the job: its own lock
    first.release()
    assert not first.path.exists()
    first.path.write_text(json.dumps({"pid": _dead_pid(), "host": HOST, "started": 0}))  # a killed job's
    with FolderLock(tmp_path) as again:
        assert json.loads(again.path.read_text())["pid"] == os.getpid()
    first.path.write_text(json.dumps({"pid": 1, "host": "another-machine", "started": 0}))
    with pytest.raises(BagelInputError, match="another-machine"):
        FolderLock(tmp_path).acquire()


def test_part_writer_cuts_a_truncated_line_and_readers_skip_it(tmp_path):
    part = M.part_path(tmp_path, None, 0, 1)
    with M.PartWriter(part) as w:
        w.append({"id": "a", "status": "ok", "finished_at": 1.0})
    with open(part, "ab") as f:  # a kill in the middle of a line
        f.write(b'{"id": "b", "status": "o')
    assert [r["id"] for r in M.read_records(part)] == ["a"]
    with M.PartWriter(part) as w:
        w.append({"id": "c", "status": "failed", "error": "x\ny", "finished_at": 2.0})
    assert part.read_bytes().count(b"\n") == 2
    assert [r["id"] for r in M.read_records(part)] == ["a", "c"]


def test_merge_keeps_latest_record_per_id_and_removes_own_parts(tmp_path):
    M.write_manifest(tmp_path, "manifest", [{"id": "a", "status": "failed", "finished_at": 1.0},
                                            {"id": "b", "status": "ok", "finished_at": 1.0}])
    with M.PartWriter(M.part_path(tmp_path, None, 1, 2)) as w:
        w.append({"id": "a", "status": "ok", "finished_at": 2.0, "text": "new"})
    with M.PartWriter(M.part_path(tmp_path, (0, 2), 0, 1)) as w:  # another shard's job: left alone
        w.append({"id": "c", "status": "ok", "finished_at": 3.0})
    records = M.merge(tmp_path, ["a", "b", "c", "d"], None)
    assert [(r["id"], r["status"]) for r in records] == [("a", "ok"), ("b", "ok"), ("c", "ok")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.csv", "manifest.jsonl", "manifest.part-s0of2-r0of1.jsonl"]
    csv_text = (tmp_path / "manifest.csv").read_text()
    assert csv_text.splitlines()[0].startswith("id,index,status,output,text,think,answer,error,seed")
    assert len(M.read_records(tmp_path / "manifest.jsonl")) == 3


def test_iso_times_and_the_epoch_floats_of_older_manifests_compare(tmp_path):
    old = {"id": "a", "status": "failed", "finished_at": 1_700_000_000.5}  # a manifest from before ISO times
    new = {"id": "a", "status": "ok", "finished_at": M.now()}
    assert M.finished_time(new) > M.finished_time(old) > 0
    assert M.finished_time({"id": "a", "finished_at": "2023-11-14T22:13:20.500000+00:00"}) == 1_700_000_000.5
    assert M.finished_time({"id": "a"}) == M.finished_time({"id": "a", "finished_at": "garbage"}) == 0.0
    M.write_manifest(tmp_path, "manifest", [new])
    with M.PartWriter(M.part_path(tmp_path, None, 0, 1)) as w:
        w.append(old)  # listed later, but older
    assert M.latest_records(tmp_path)["a"]["status"] == "ok"


# ----------------------------------------------------------------------------- sharding
def test_shards_ranks_and_row_selection(monkeypatch):
    assert D.parse_shard("1/4") == (1, 4) and D.parse_shard(None) is None
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(BagelInputError):
            D.parse_shard(bad)
    items = list(range(10))
    assert D.take_share(items, None, D.Dist(1, 3)) == (items, [1, 4, 7])
    assert D.take_share(items, (1, 2), D.Dist(0, 2)) == ([1, 3, 5, 7, 9], [1, 5, 9])
    parts = [D.take_share(items, (k, 2), D.Dist(r, 3))[1] for k in range(2) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert D.parse_rows("0:3,8:,5,5", 10) == [0, 1, 2, 8, 9, 5]
    assert D.parse_rows(None, 3) == [0, 1, 2]
    with pytest.raises(BagelInputError):
        D.parse_rows("12", 10)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    d = D.setup(None)
    assert (d.rank, d.world, d.initialized) == (0, 1, False) and d.broadcast("x") == "x"
    assert os.environ["RANK"] == "0"


def test_prompt_and_id_columns_can_be_named(tmp_path):
    from bagel_engine.batch.request import row_prompt

    (tmp_path / "x.csv").write_text("Key,Caption,prompt\nk1,a cat,ignored\n", encoding="utf-8")
    rows = read_rows(tmp_path / "x.csv")
    assert row_prompt(rows[0]) == "ignored" and row_prompt(rows[0], "Caption") == "a cat"
    plan = plan_rows(rows, "t2i", id_column="key")[0]
    assert (plan.key, plan.output) == ("k1", "k1.png")
    call = build_call(plan, "t2i", {"height": 32}, 0, prompt_column="caption")
    assert call.method == "generate" and call.args == ("a cat",) and call.kwargs["height"] == 32
