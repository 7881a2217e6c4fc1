"""``bagel bench -w serve``: a real server over loopback under concurrent clients.

For each load (``images``: text to image of two sizes in turn; ``chat``: streamed answers of up to
``max_new_tokens``; ``mix``: both in turn) and each concurrency ``c``, ``c`` clients send one request
each at the same moment; the server runs with ``--max-batch N`` (the engine's scheduler batches them
step by step) and, for the ratio, with ``--max-batch 1`` (one request at a time, the others queued).
Reported: wall time of the round, images per minute, tokens per second, p50 / p95 latency and the
time to first token of streamed answers. Every request is checked to succeed.

Where the server runs: in this process, in a thread (``run_serve_benchmark``: the clients' threads share the
interpreter with it), or as its own ``bagel serve`` process (``server_process``, ``--server-process``: the clients
take nothing from the server's interpreter, as with real users; the model is loaded once per ``--max-batch``).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import httpx

from bagel_engine.engine_protocol import Pipeline
from bagel_engine.serve import ServeSettings, create_app
from bagel_engine.serve.threaded import ThreadedServer

LOADS = ("images", "chat", "mix")
PROMPTS = ("a red circle on the left", "two blue squares", "a green triangle above a yellow square",
           "a purple circle in the center")
QUESTIONS = ("Tell me a long story about a lighthouse keeper.", "Describe the sea at night in detail.",
             "Write a letter to a friend about a journey.", "Explain how bread is made, step by step.")


@dataclass
class ServeBench:
    sizes: tuple[tuple[int, int], ...] = ((64, 64), (64, 32))  # (width, height), used in turn
    num_timesteps: int = 25
    max_new_tokens: int = 64
    concurrency: tuple[int, ...] = (1, 4, 8)
    max_batch: int = 8
    loads: tuple[str, ...] = LOADS
    seed: int = 0


@dataclass
class Round:
    load: str
    concurrency: int
    max_batch: int
    wall_s: float
    images: int
    tokens: int
    latency_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_s)
        out = {"load": self.load, "concurrency": self.concurrency, "max_batch": self.max_batch,
               "wall_s": round(self.wall_s, 3), "images_per_min": round(60 * self.images / self.wall_s, 1),
               "tokens_per_s": round(self.tokens / self.wall_s, 1), "p50_s": round(_pct(lat, 50), 3),
               "p95_s": round(_pct(lat, 95), 3)}
        if self.ttft_s:
            out["ttft_p50_s"] = round(_pct(sorted(self.ttft_s), 50), 3)
        return out


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _image_request(client: httpx.Client, cfg: ServeBench, k: int) -> tuple[int, int, float | None]:
    w, h = cfg.sizes[k % len(cfg.sizes)]
    r = client.post("/v1/images/generations", json={
        "prompt": PROMPTS[k % len(PROMPTS)], "size": f"{w}x{h}", "num_timesteps": cfg.num_timesteps,
        "seed": cfg.seed + k})
    r.raise_for_status()
    data = r.json()["data"][0]["b64_json"]
    if not base64.b64decode(data):
        raise RuntimeError("an empty picture came back")
    return 1, 0, None


def _chat_request(client: httpx.Client, cfg: ServeBench, k: int) -> tuple[int, int, float | None]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
            "max_tokens": cfg.max_new_tokens, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return 0, tokens, ttft


def _send(load: str) -> Callable[[httpx.Client, ServeBench, int], tuple[int, int, float | None]]:
    if load == "images":
        return _image_request
    if load == "chat":
        return _chat_request
    return lambda client, cfg, k: (_image_request if k % 2 == 0 else _chat_request)(client, cfg, k)


def run_round(base_url: str, load: str, concurrency: int, max_batch: int, cfg: ServeBench) -> Round:
    """``concurrency`` clients, one request each, all sent at once; returns the round's figures."""
    send = _send(load)

    def one(k: int) -> tuple[int, int, float | None, float]:
        with httpx.Client(base_url=base_url, timeout=600) as client:
            t0 = time.perf_counter()
            images, tokens, ttft = send(client, cfg, k)
            return images, tokens, ttft, time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(concurrency)))
    wall = time.perf_counter() - t0
    return Round(load, concurrency, max_batch, wall, sum(r[0] for r in results), sum(r[1] for r in results),
                 [r[3] for r in results], [r[2] for r in results if r[2] is not None])


def run_serve_benchmark(pipe: Pipeline, cfg: ServeBench, log: Callable[[str], None] = lambda m: None) -> dict:
    """Every load and concurrency with ``max_batch`` 1 and ``cfg.max_batch``, on one loaded pipeline served in a
    thread of this process."""

    def in_thread(max_batch: int):
        settings = ServeSettings(max_batch=max_batch, queue_size=max(cfg.concurrency) * 2,
                                 max_timesteps=max(250, cfg.num_timesteps))
        return _threaded_url(ThreadedServer(create_app(pipe, settings)))

    return run_serve_benchmark_on(in_thread, cfg, log)


@contextlib.contextmanager
def _threaded_url(server: ThreadedServer):
    with server as srv:
        yield srv.base_url


def run_serve_benchmark_on(start_server: Callable[[int], ContextManager[str]], cfg: ServeBench,
                           log: Callable[[str], None] = lambda m: None) -> dict:
    """The rounds against the servers ``start_server(max_batch)`` starts (a context giving the base URL), with
    ``max_batch`` 1 and ``cfg.max_batch``; the ratios of the two."""
    rounds: list[Round] = []
    for max_batch in dict.fromkeys((1, cfg.max_batch)):
        with start_server(max_batch) as base_url:
            for load in cfg.loads:  # warm-up: one of each kind, not measured
                run_round(base_url, load, 1, max_batch, cfg)
            for load in cfg.loads:
                for c in cfg.concurrency:
                    r = run_round(base_url, load, c, max_batch, cfg)
                    log(f"max-batch {max_batch:2d}  {load:6s} x{c}: {r.wall_s:6.2f} s  {r.summary()}")
                    rounds.append(r)
    rows = [r.summary() for r in rounds]
    ratios = []
    if cfg.max_batch != 1:
        by = {(r.load, r.concurrency, r.max_batch): r for r in rounds}
        for load in cfg.loads:
            for c in cfg.concurrency:
                one, many = by[(load, c, 1)], by[(load, c, cfg.max_batch)]
                ratios.append({"load": load, "concurrency": c, "wall_ratio": round(many.wall_s / one.wall_s, 3),
                               "p50_ratio": round(statistics.median(many.latency_s) / statistics.median(one.latency_s), 3)})
    return {"config": asdict(cfg), "rounds": rows, "ratios": ratios}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(model: str, max_batch: int, cfg: ServeBench, serve_args: Sequence[str] = (),
                   ready_timeout: float = 600.0):
    """``bagel serve MODEL --max-batch N`` in its own process on a free loopback port, until the context ends
    (stopped with SIGTERM, then killed); yields its base URL once ``/health`` answers. ``serve_args``: more
    ``bagel serve`` options (``--device``, ``--dtype``, load options)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "bagel_engine", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--queue-size", str(max(cfg.concurrency) * 2),
           "--max-timesteps", str(max(250, cfg.num_timesteps)), "--no-ui", "--log-level", "warning", *serve_args]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    err.seek(0)
                    raise RuntimeError(f"bagel serve exited with {proc.returncode} before it was ready: "
                                       f"{err.read()[-2000:].strip()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bagel serve was not ready after {ready_timeout:.0f} s")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def format_serve(result: dict) -> str:
    cfg = result["config"]
    lines = [f"serve benchmark: sizes {cfg['sizes']}, {cfg['num_timesteps']} timesteps, chat {cfg['max_new_tokens']} "
             f"tokens, max-batch {cfg['max_batch']} against 1, the server "
             f"{'in its own process' if result.get('server') == 'process' else 'in a thread of this process'}",
             f"{'load':6s} {'conc':>4s} {'batch':>5s} {'wall s':>8s} {'img/min':>8s} {'tok/s':>7s} {'p50 s':>7s} "
             f"{'p95 s':>7s} {'ttft s':>7s}"]
    for r in result["rounds"]:
        lines.append(f"{r['load']:6s} {r['concurrency']:4d} {r['max_batch']:5d} {r['wall_s']:8.2f} "
                     f"{r['images_per_min']:8.1f} {r['tokens_per_s']:7.1f} {r['p50_s']:7.2f} {r['p95_s']:7.2f} "
                     f"{r.get('ttft_p50_s', float('nan')):7.2f}")
    if result["ratios"]:
        lines.append(f"wall time with max-batch {cfg['max_batch']} over max-batch 1 (same requests, same server):")
        for q in result["ratios"]:
            lines.append(f"  {q['load']:6s} x{q['concurrency']}: {q['wall_ratio']:.2f}  (p50 latency {q['p50_ratio']:.2f})")
    return "\n".join(lines)
