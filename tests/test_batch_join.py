"""Two batch jobs on one output folder: the second stops (naming the first and --join), or with --join
shares the rows: every row done exactly once, the joiner from the end, nothing left behind."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from bagel_engine.batch.claims import RowClaims
from bagel_engine.batch.lock import HOST
from bagel_engine.batch.runner import BatchJob, run_batch
from bagel_engine.params import BagelInputError


class SlowChat:
    """A pipeline stand-in whose answers take a while; counts who answered which prompt."""

    def __init__(self, calls: list, who: str, delay: float = 0.03, started: threading.Event | None = None):
        self.calls, self.who, self.delay, self.started = calls, who, delay, started

    def chat(self, prompt, **knobs):
        self.calls.append((self.who, prompt))
        if self.started is not None and len([c for c in self.calls if c[0] == self.who]) >= 3:
            self.started.set()
        time.sleep(self.delay)
        return type("Out", (), {"text": f"answer to {prompt}", "seed": knobs.get("seed"), "params": {},
                                "timings": {}, "image": None})()


def rows_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i:02d}", "prompt": f"question {i}"}) + "\n" for i in range(n)))
    return path


def job(src: Path, out: Path, join: bool = False) -> BatchJob:
    return BatchJob(input=src, task="chat", output_dir=out, progress=False, join=join)


def test_second_job_stops_and_names_join(tmp_path):
    src, out = rows_file(tmp_path, 12), tmp_path / "out"
    calls, started = [], threading.Event()
    first = threading.Thread(target=run_batch, args=(job(src, out), lambda *a, **k: SlowChat(calls, "a", 0.05, started)))
    first.start()
    try:
        assert started.wait(20)
        with pytest.raises(BagelInputError, match="in use by another batch job .*--join"):
            run_batch(job(src, out), lambda *a, **k: SlowChat(calls, "b"))
    finally:
        first.join(30)
    assert {who for who, _ in calls} == {"a"}


def test_join_shares_the_rows_each_done_once(tmp_path):
    n = 30
    src, out = rows_file(tmp_path, n), tmp_path / "out"
    calls, started, results = [], threading.Event(), {}

    def holder():
        results["a"] = run_batch(job(src, out), lambda *a, **k: SlowChat(calls, "a", started=started))

    first = threading.Thread(target=holder)
    first.start()
    assert started.wait(20)
    results["b"] = run_batch(job(src, out, join=True), lambda *a, **k: SlowChat(calls, "b"))
    first.join(60)

    prompts = [p for _, p in calls]
    assert sorted(prompts) == sorted(f"question {i}" for i in range(n))  # every row once, none twice
    by_b = [p for who, p in calls if who == "b"]
    assert by_b and by_b[0] == f"question {n - 1}"  # the joiner works from the end
    assert [p for who, p in calls if who == "a"][:3] == ["question 0", "question 1", "question 2"]
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"r{i:02d}" for i in range(n)]
    assert all(r["status"] == "ok" for r in records)
    assert results["a"].ok + results["b"].processed >= n
    # nothing left behind: no lock, no claims, no part files
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or "part" in p.name) == []


def test_claims_free_a_dead_jobs_rows_and_keep_done_and_live_ones(tmp_path):
    a, b = RowClaims(tmp_path, "all"), RowClaims(tmp_path, "all")
    assert a.claim("r1") and a.claim("r2")
    assert not b.claim("r1")  # live (another job of this process, not finished)
    a.done("r1")
    dead = {"row": "r3", "pid": 2**22 + 12345, "host": HOST, "token": "dead", "done": False}
    a.dir.mkdir(parents=True, exist_ok=True)
    a._path("r3").write_text(json.dumps(dead))
    assert b.claim("r3")  # a dead job's unfinished row is free again
    a.release()  # r2 was claimed, not done: back to the pool
    assert b.claim("r2")
    assert not b.claim("r1")  # done in this round
    assert not a.finish()  # b still runs and holds rows
    assert b.finish() and not (tmp_path / ".bagel-claims").exists()
    assert os.getpid() > 0
