"""Serving replicas on Ray (``bagel serve --replicas N``): a local Ray cluster on the CPU with two replicas of the
tiny checkpoint behind the real server over loopback. The replicas answer as the model in process; requests
spread over them; streaming, previews, bad inputs and cancellation behave as with one model; a replica killed
while it runs a request fails that request with a clean 503 (no hang), and Ray restarts it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from test_serve_support import INPUT_IMAGE, TINY, ServerProcess, ThreadedServer, data_url, decode_b64_image

pytest.importorskip("ray", reason="serving replicas needs the 'ray' extra")
pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
httpx = pytest.importorskip("httpx")

from bagel_engine.params import BagelInputError  # noqa: E402
from bagel_engine.serve import ServeSettings, create_app  # noqa: E402
from bagel_engine.serve.replicas import ReplicaFailed, ReplicaPool, check_resources  # noqa: E402
from bagel_engine.serve.worker import JobCancelled  # noqa: E402

FAST = {"num_timesteps": 3}


@pytest.fixture(scope="module")
def pool():
    p = ReplicaPool(str(TINY), 2, {"device": "cpu"}, cpus_per_replica=1, probe_every=0.5, probe_timeout=6,
                    down_wait=8,
                    ray_init={"num_cpus": 2, "object_store_memory": 80 * 1024 * 1024, "log_to_driver": False})
    yield p
    p.close()


@pytest.fixture(scope="module")
def pipe():
    import bagel_engine

    return bagel_engine.load(str(TINY))


@pytest.fixture(scope="module")
def server(pool):
    # as `bagel serve --replicas 2 --max-batch 1` builds it: the front runs max_batch jobs per replica
    settings = ServeSettings(queue_size=8, max_batch=pool.max_batch * pool.replicas, max_timesteps=100000)
    srv = ThreadedServer(create_app(pool, settings))
    yield srv
    srv.stop()


def _close(a: Image.Image, b: Image.Image, tol: int = 2) -> bool:
    """Pictures equal but for float rounding between thread layouts (one unit at a .5, seen between layouts)."""
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    return x.shape == y.shape and int(np.abs(x - y).max()) <= tol


def _calls(pool: ReplicaPool) -> list[int]:
    return [pool.info(i)["calls"] for i in range(pool.replicas)]


def test_replicas_answer_as_the_model_in_process(pool, pipe):
    assert pool.config == pipe.config and pool.replicas == 2
    assert pool.chat("Hello there", max_new_tokens=12).text == pipe.chat("Hello there", max_new_tokens=12).text
    image = Image.open(INPUT_IMAGE).convert("RGB")
    assert pool.understand(image, "What is it?", max_new_tokens=10).text == \
        pipe.understand(image, "What is it?", max_new_tokens=10).text
    assert _close(pool.generate("a red fox", height=64, width=48, seed=3, **FAST).image,
                  pipe.generate("a red fox", height=64, width=48, seed=3, **FAST).image)
    assert _close(pool.edit(image, "make it blue", seed=5, **FAST).image,
                  pipe.edit(image, "make it blue", seed=5, **FAST).image)


def test_callbacks_come_back_from_the_replica(pool, pipe):
    steps, pieces, previews = [], [], []
    out = pool.chat("Tell me", max_new_tokens=10, callback=lambda k, n: steps.append((k, n)), on_text=pieces.append)
    assert "".join(pieces) == out.text and steps and steps[-1][0] == len(steps)
    pool.generate("a cat", height=32, width=32, seed=1, num_timesteps=6, on_step=lambda p: previews.append(
        (p.step, p.total, p.image().size)))
    assert [p[0] for p in previews] == [1, 2, 3, 4, 5] and all(p[2] == (32, 32) for p in previews)


def test_a_bad_input_is_the_same_error_and_a_cancel_stops_the_replica(pool):
    with pytest.raises(BagelInputError, match="height 63"):
        pool.generate("a cat", height=63, width=64)
    before = sum(pool.info(i)["cancelled"] for i in range(pool.replicas))

    def cancel_at_2(k: int, n: int) -> None:
        if k >= 2:
            raise JobCancelled("the client left")

    with pytest.raises(JobCancelled):
        pool.generate("a cat", height=32, width=32, num_timesteps=1000, callback=cancel_at_2)
    deadline = time.monotonic() + 30
    while sum(pool.info(i)["cancelled"] for i in range(pool.replicas)) == before:
        assert time.monotonic() < deadline, "the replica kept running a cancelled call"
        time.sleep(0.1)
    while any(r["in_flight"] for r in pool.status()):  # counted until it has stopped, then released
        assert time.monotonic() < deadline, "the cancelled call was never released"
        time.sleep(0.05)
    # a streamed answer without a step callback is cancelled through its text callback
    pieces: list[str] = []

    def leave_after_3(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise JobCancelled("the client left")

    with pytest.raises(JobCancelled):
        pool.chat("Tell me a long story", max_new_tokens=400, on_text=leave_after_3)
    deadline = time.monotonic() + 30
    while any(r["in_flight"] for r in pool.status()):  # the replica stopped it (400 tokens would take longer)
        assert time.monotonic() < deadline, "the replica kept writing a cancelled answer"
        time.sleep(0.1)
    with pytest.raises(TypeError, match="cannot go to a replica"):
        pool.chat("hi", stop_when=lambda: True)


def test_the_server_spreads_requests_over_the_replicas(server, pool, pipe):
    expected = pipe.chat("Say something", max_new_tokens=8).text
    before = _calls(pool)
    body = {"model": "bagel", "messages": [{"role": "user", "content": "Say something"}], "max_tokens": 8}
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            answers = list(ex.map(lambda _: c.post("/v1/chat/completions", json=body), range(6)))
        assert [r.status_code for r in answers] == [200] * 6
        assert {r.json()["choices"][0]["message"]["content"] for r in answers} == {expected}
        after = _calls(pool)
        assert all(a > b for a, b in zip(after, before)), (before, after)  # both replicas took requests
        health = c.get("/health").json()
        assert [r["up"] for r in health["replicas"]] == [True, True]

        # streaming text and live previews, relayed from a replica
        events = []
        with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[6:]))
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == expected
        kinds = []
        with c.stream("POST", "/v1/images/generations", json={"prompt": "a fox", "size": "32x32", "stream": True,
                                                              "partial_images": 2, "seed": 4, "num_timesteps": 7}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    kinds.append(event["type"])
                    if event["type"].endswith("completed"):
                        final = decode_b64_image(event["b64_json"])
        assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert _close(final, pipe.generate("a fox", height=32, width=32, seed=4, num_timesteps=7).image)

        bad = c.post("/v1/images/edits", json={"prompt": "x", "images": [{"image_url": data_url(b"not a png")}]})
        assert bad.status_code == 400


def test_a_killed_replica_fails_its_request_cleanly_and_comes_back(server, pool):
    calls_before = _calls(pool)
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            long = ex.submit(c.post, "/v1/images/generations",
                             json={"prompt": "a long one", "size": "32x32", "num_timesteps": 100000})
            deadline = time.monotonic() + 30
            while not any(r["in_flight"] for r in pool.status()):
                assert time.monotonic() < deadline, "the request never reached a replica"
                time.sleep(0.05)
            victim = next(r["replica"] for r in pool.status() if r["in_flight"])
            while pool.info(victim)["calls"] == calls_before[victim]:  # it runs there now (not only sent)
                assert time.monotonic() < deadline, "the replica never started the request"
                time.sleep(0.05)
            other = 1 - victim
            old_pid = pool.info(victim)["pid"]
            os.kill(old_pid, signal.SIGKILL)
            answer = long.result(timeout=60)  # an answer, not a hang
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "replica_failed"
        assert "restarts it" in answer.json()["error"]["message"]

        body = {"model": "bagel", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 4}
        served = pool.info(other)["calls"]
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert pool.info(other)["calls"] == served + 1  # the other replica served it meanwhile
        deadline = time.monotonic() + 180
        while not all(r["up"] for r in c.get("/health").json()["replicas"]):
            assert time.monotonic() < deadline, "Ray did not bring the replica back"
            time.sleep(0.5)
        assert pool.info(victim)["pid"] != old_pid  # a new process, the model loaded again
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            answers = list(ex.map(lambda _: c.post("/v1/chat/completions", json=body), range(4)))
        assert [r.status_code for r in answers] == [200] * 4


def _wait(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_the_monitor_sees_silent_replicas_and_replaces_one_dead_for_good(server, pool, pipe):
    """A replica that stops answering (SIGSTOP: alive, silent) is marked down and calls go to the other; with none
    up a call fails after ``down_wait`` and /health answers 503; answering again, both are up. One killed for good
    (no restart) is replaced by a new actor that serves."""
    pids = [pool.info(i)["pid"] for i in range(2)]
    os.kill(pids[0], signal.SIGSTOP)
    try:
        _wait(lambda: not pool.status()[0]["up"], "the silent replica was not marked down", 60)
        served = pool.info(1)["calls"]
        assert pool.chat("Hi", max_new_tokens=4).text == pipe.chat("Hi", max_new_tokens=4).text
        assert pool.info(1)["calls"] == served + 1  # not sent to the silent one
        os.kill(pids[1], signal.SIGSTOP)
        _wait(lambda: not any(r["up"] for r in pool.status()), "the second silent replica was not marked down", 60)
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "no replica up"
        with pytest.raises(ReplicaFailed, match="no replica is up"):
            pool.chat("Hi", max_new_tokens=4)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    _wait(lambda: all(r["up"] for r in pool.status()), "the replicas did not come back up", 60)

    import ray

    before = pool.replaced
    ray.kill(pool._actors[1], no_restart=True)
    _wait(lambda: pool.replaced == before + 1, "the replica dead for good was not replaced", 60)
    _wait(lambda: all(r["up"] for r in pool.status()), "the new replica never came up")
    new_pid = pool.info(1)["pid"]
    assert new_pid != pids[1] and pool.info(1)["calls"] == 0
    for _ in range(4):
        assert pool.chat("Hi", max_new_tokens=4).text == pipe.chat("Hi", max_new_tokens=4).text
    assert pool.info(1)["calls"] >= 1  # the new actor serves


def test_replicas_that_cannot_fit_are_refused_at_once():
    check_resources(2, 1.0, 0.0, {"CPU": 2.0})
    with pytest.raises(ValueError, match="3 replica.s. of 1 CPU each need 3 CPU, and this machine's Ray has 2"):
        check_resources(3, 1.0, 0.0, {"CPU": 2.0})
    with pytest.raises(ValueError, match="need 2 GPU.*has 0"):
        check_resources(2, 0.5, 1.0, {"CPU": 16.0})


def test_bagel_serve_replicas_from_the_command_line(pool):
    """``bagel serve --replicas 2``: its own local Ray (beside the tests' one), two replicas, one front; replicas
    that the machine cannot hold are refused with what to change."""
    srv = ServerProcess("--no-ui", "--replicas", "2", "--cpus-per-replica", "0.5", "--log-level", "warning",
                        startup_timeout=240)
    try:
        with srv.client(timeout=120) as c:
            health = c.get("/health").json()
            assert [r["up"] for r in health["replicas"]] == [True, True] and health["max_batch"] == 16
            body = {"model": "bagel", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
                pool.chat("Hello", max_new_tokens=6).text
    finally:
        srv.stop()
    with pytest.raises(RuntimeError, match=r"server exited with 2:[\s\S]*need 200000 CPU, and this machine's Ray has"):
        ServerProcess("--no-ui", "--replicas", "2", "--cpus-per-replica", "100000", startup_timeout=240)
