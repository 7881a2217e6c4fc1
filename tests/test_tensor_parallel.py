"""Tensor parallel (issue 14) on gloo processes: every rank holds a share of the heads and MLP columns, and
together they give the one-process result: t2i and edit latents within float rounding, greedy answers exactly;
alone (2 ranks) and as a 2 x 2 mesh with CFG-parallel (4 ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import bagel_engine
from bagel_engine.shapes.world import Obj, draw

FAST = dict(num_timesteps=6)
PICTURE = [Obj("red", "circle", 12, 32, 8)]


def _layer_params(pipe) -> int:
    return sum(p.numel() for p in pipe.model.decoder.layers.parameters())


def _jobs(pipe):
    picture = draw(PICTURE)
    drawn = pipe.generate("a green square", **FAST)  # no seed: the ranks agree on a drawn one
    return {"t2i": pipe.generate("two blue squares", seed=3, **FAST).latents,
            "edit": pipe.edit(picture, "make the circle blue", seed=7, **FAST).latents,
            "answer": pipe.understand(picture, "What color is the circle?").text,
            "chat": pipe.chat("a red circle", max_new_tokens=8).text,
            "drawn": drawn.latents, "drawn_seed": drawn.seed, "layer_params": _layer_params(pipe),
            "kv_heads": pipe.model.decoder.kv_heads, "vit_heads": pipe.model.vit_model.vision_model.encoder.layers[0].self_attn.num_heads}


def _rank(rank: int, world: int, init: str, out: str, cfg: int | None, tp: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pipe = bagel_engine.load("bagel-shapes", device="cpu", cfg_parallel_size=cfg, tensor_parallel_size=tp)
    torch.save(_jobs(pipe), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def alone():
    torch.set_num_threads(1)
    pipe = bagel_engine.load("bagel-shapes", device="cpu")
    return pipe, _jobs(pipe)


@pytest.mark.parametrize("cfg,tp", [(None, 2), (2, 2)], ids=["tp2", "cfg2xtp2"])
def test_ranks_give_the_one_process_result(tmp_path, alone, cfg, tp):
    pipe, one = alone
    world = (cfg or 1) * tp
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(world, f"file://{tmp_path / 'rendezvous'}", out, cfg, tp), nprocs=world)
    ranks = [torch.load(f"{out}.{r}") for r in range(world)]
    for r in ranks:  # each rank holds its share of the layers, heads and KV heads
        assert r["layer_params"] < 0.55 * one["layer_params"]
        assert r["kv_heads"] == one["kv_heads"] // tp and r["vit_heads"] == one["vit_heads"] // tp
        assert r["drawn_seed"] == ranks[0]["drawn_seed"]
        assert (r["answer"], r["chat"]) == (one["answer"], one["chat"])  # greedy text exactly
        for name in ("t2i", "edit"):
            torch.testing.assert_close(r[name], one[name], rtol=1e-4, atol=1e-4)
    again = pipe.generate("a green square", seed=ranks[0]["drawn_seed"], **FAST).latents
    torch.testing.assert_close(ranks[0]["drawn"], again, rtol=1e-4, atol=1e-4)


def test_shards_that_do_not_divide_are_refused():
    from bagel_engine.weights.tensor_parallel import check_divisible

    pipe = bagel_engine.load("bagel-shapes", device="meta")
    check_divisible(pipe.model, 2)
    with pytest.raises(ValueError, match="decoder attention heads 4.*divide by 3|divide by 3"):
        check_divisible(pipe.model, 3)


def test_without_torchrun_it_says_how(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(bagel_engine.BagelInputError, match="tensor parallel over 2 processes runs under torchrun: "
                                                           "torchrun --nproc-per-node 2"):
        bagel_engine.load("bagel-shapes", device="cpu", tensor_parallel_size=2)
    with pytest.raises(bagel_engine.BagelInputError, match="CFG-parallel with tensor parallel over 6 processes"):
        bagel_engine.load("bagel-shapes", device="cpu", cfg_parallel_size=3, tensor_parallel_size=2)


def test_the_cli_under_torchrun_answers_once_as_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 --no-python bagel understand ... --tensor-parallel-size 2``: rank 0 alone
    prints, and the answer is the one process's."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    picture = tmp_path / "circle.png"
    draw(PICTURE).save(picture)
    bin_dir = Path(sys.executable).parent
    bagel, torchrun = shutil.which("bagel", path=str(bin_dir)), shutil.which("torchrun", path=str(bin_dir))
    if not (bagel and torchrun):
        pytest.skip("the bagel and torchrun commands are not installed beside this python")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    args = ["understand", str(picture), "-p", "What color is the circle?", "-m", "bagel-shapes", "--device", "cpu",
            "--json"]
    one = subprocess.run([bagel, *args], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(port), "--no-python", bagel, *args,
                          "--tensor-parallel-size", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone
    assert json.loads(lines[0])["text"] == json.loads(one.stdout.strip().splitlines()[-1])["text"]


def test_a_tensor_parallel_batch_job_writes_each_row_once(tmp_path):
    """``torchrun --nproc-per-node 2 bagel batch ... --tensor-parallel-size 2``: both ranks run every row in step,
    rank 0 writes it; the manifest and pictures are the one process's (a bad row recorded, the job goes on)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(["a red circle", "", "two blue squares"])]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--task", "t2i", "--model", "bagel-shapes", "--num-timesteps", "4", "--no-progress", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "bagel_engine.cli.main", "batch", str(src), "-o", str(tmp_path / "one"),
                          *common], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 3, one.stderr[-2000:]  # the empty prompt failed
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                          "bagel_engine.cli.main", "batch", str(src), "-o", str(tmp_path / "two"), *common,
                          "--tensor-parallel-size", "2"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert "3 rows: 2 ok, 1 failed" in two.stderr, two.stderr[-3000:]

    def manifest(folder):
        return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]

    a, b = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert [(x["id"], x["status"], x["seed"]) for x in a] == [(x["id"], x["status"], x["seed"]) for x in b]
    assert {x["rank"] for x in b} == {0}  # written by rank 0 alone, once
    for record in a:
        if record["status"] == "ok":
            x = np.asarray(Image.open(tmp_path / "one" / record["output"]), dtype=int)
            y = np.asarray(Image.open(tmp_path / "two" / record["output"]), dtype=int)
            assert np.abs(x - y).max() <= 2  # float rounding of the partial sums
    assert sorted(p.name for p in (tmp_path / "two").glob("*.part*")) == []


def _count_tiles(pipe) -> dict:
    """Count the VAE's decode and encode calls (one per tile when tiled)."""
    counts = {"decode": 0, "encode": 0}
    decode, encode = pipe.vae.decode, pipe.vae.encode_moments

    def counted(fn, name):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    pipe.vae.decode, pipe.vae.encode_moments = counted(decode, "decode"), counted(encode, "encode")
    return counts


def _vae_rank(rank: int, world: int, init: str, out: str) -> None:
    import numpy as np
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pipe = bagel_engine.load("bagel-shapes", device="cpu", vae_patch_parallel_size=world)
    assert pipe.engine.vae_tiling is not None  # on with it
    pipe.enable_vae_tiling(8, 2)  # tiles small enough for 64 px pictures
    tiles = _count_tiles(pipe)
    t2i = pipe.generate("two blue squares", seed=3, **FAST)
    edit = pipe.edit(draw(PICTURE), "make the circle blue", seed=7, **FAST)
    torch.save({"t2i": t2i.latents, "t2i_picture": np.asarray(t2i.image), "edit": edit.latents,
                "edit_picture": np.asarray(edit.image), "tiles": tiles}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_vae_patch_parallel_spreads_the_tiles_and_gives_the_tiled_result(tmp_path):
    """--vae-patch-parallel-size 2: each rank encodes and decodes a share of the tiles; the pictures and the edit's
    latents are one process's with the same tiling."""
    import numpy as np

    out = str(tmp_path / "result")
    mp.spawn(_vae_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    torch.set_num_threads(1)
    pipe = bagel_engine.load("bagel-shapes", device="cpu").enable_vae_tiling(8, 2)
    tiles = _count_tiles(pipe)
    t2i = pipe.generate("two blue squares", seed=3, **FAST)
    edit = pipe.edit(draw(PICTURE), "make the circle blue", seed=7, **FAST)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for name in ("decode", "encode"):  # the tiles shared out: every one run once, on one rank
        assert tiles[name] > 2 and sum(g["tiles"][name] for g in ranks) == tiles[name]
        assert all(0 < g["tiles"][name] < tiles[name] for g in ranks)
    for got in ranks:
        torch.testing.assert_close(got["t2i"], t2i.latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["edit"], edit.latents, rtol=1e-4, atol=1e-4)  # the input encoded in shares
        for name, image in (("t2i_picture", t2i.image), ("edit_picture", edit.image)):
            assert np.abs(got[name].astype(int) - np.asarray(image, dtype=int)).max() <= 1
    with pytest.raises(bagel_engine.BagelInputError, match="--vae-patch-parallel-size must be 4"):
        from bagel_engine.distributed import parallel_groups
        parallel_groups(2, 2, torch.device("cpu"), vae_size=2)


def test_a_tensor_parallel_server_answers_cancels_and_goes_on(tmp_path):
    """``torchrun --nproc-per-node 2 bagel serve --tensor-parallel-size 2``: rank 0 serves HTTP and rank 1 follows
    its calls; answers and pictures are one process's, a request whose client went away is cancelled on both ranks
    at the same step, and the next request is answered (the ranks are still in step)."""
    import base64
    import io
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import numpy as np
    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "bagel_engine.cli.main", "serve", "-m", "bagel-shapes", "--device", "cpu",
                                 "--port", "0", "--no-ui", "--tensor-parallel-size", "2", "--log-level", "warning"],
                                cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
            port = int(m.group(1)) if m else time.sleep(0.1)
        assert port, log_path.read_text(errors="replace")[-3000:]
        url = f"http://127.0.0.1:{port}"
        torch.set_num_threads(1)
        pipe = bagel_engine.load("bagel-shapes", device="cpu")
        chat = {"model": "bagel", "messages": [{"role": "user", "content": "a red circle"}], "max_tokens": 8}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert answer == pipe.chat("a red circle", max_new_tokens=8).text
        body = {"prompt": "two blue squares", "size": "64x64", "seed": 3, "num_timesteps": 6}
        r = httpx.post(url + "/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))), dtype=int)
        alone = np.asarray(pipe.generate("two blue squares", width=64, height=64, seed=3, num_timesteps=6).image, dtype=int)
        assert np.abs(served - alone).max() <= 2
        with pytest.raises(httpx.TimeoutException):  # the client goes away mid-picture: its job is cancelled
            httpx.post(url + "/v1/images/generations", json={**body, "num_timesteps": 250}, timeout=0.5)
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == answer
        metrics = httpx.get(url + "/metrics", timeout=30).text
        assert re.search(r'bagel_jobs_total\{[^}]*outcome="cancelled"[^}]*\} 1', metrics), metrics[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def _sharded_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from bagel_engine.weights.sharded import held_fraction

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pipe = bagel_engine.load("bagel-shapes", device="cpu", shard_weights=True)
    jobs = _jobs(pipe)
    jobs["held"] = held_fraction(pipe.model)
    torch.save(jobs, f"{out}.{rank}")
    dist.destroy_process_group()


def test_sharded_weights_give_the_one_process_result(tmp_path, alone):
    """--shard-weights: each rank holds half of the decoder layers' weights (FSDP2 units, gathered as each layer
    runs) and the results are one process's."""
    pipe, one = alone
    out = str(tmp_path / "result")
    mp.spawn(_sharded_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", out), nprocs=2)
    for r in range(2):
        got = torch.load(f"{out}.{r}", weights_only=False)
        assert got["held"] == pytest.approx(0.5, abs=0.01)
        assert (got["answer"], got["chat"]) == (one["answer"], one["chat"])
        for name in ("t2i", "edit"):
            torch.testing.assert_close(got[name], one[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(bagel_engine.BagelInputError, match="not with --cfg-parallel-size or --tensor-parallel-size"):
        from bagel_engine.distributed import parallel_groups
        parallel_groups(1, 2, torch.device("cpu"), shard_weights=True)
    from bagel_engine.weights.placement import Placement

    with pytest.raises(ValueError, match="not with offload, quantize or tensor parallel"):
        Placement(torch.device("cpu"), torch.float32, quantize="int8", shard_weights=object())


def test_the_layers_split_over_devices_give_the_one_device_result(alone):
    """--devices (the official app's multi-GPU mode): the decoder's layers over several devices of one process, here
    all the CPU; the layers, their KV caches and the activations follow the split; the results are one device's."""
    from bagel_engine.weights.layer_split import layer_counts

    pipe, one = alone
    assert layer_counts(28, 2) == [14, 14] and layer_counts(27, 2) == [13, 14] and layer_counts(6, 4) == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="adding up to the 6 decoder layers"):
        layer_counts(6, 2, [2, 3])
    # "cpu:0" is the CPU under another name: every layer boundary then moves the activations (a no-op copy), so the
    # moving code runs as it would between two cards
    split = bagel_engine.load("bagel-shapes", devices="cpu,cpu:0", layer_split=[2, 4])
    assert split.model.decoder.layer_devices == [torch.device("cpu")] * 2 + [torch.device("cpu:0")] * 4
    got = _jobs(split)
    assert (got["answer"], got["chat"]) == (one["answer"], one["chat"])
    for name in ("t2i", "edit"):
        torch.testing.assert_close(got[name], one[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(bagel_engine.BagelInputError, match="two or more"):
        bagel_engine.load("bagel-shapes", devices="cpu")


def test_a_memory_budget_per_device_places_the_layers_in_order(alone):
    """--max-memory (device_map="auto" with max_memory, as the official app): the first device holds the rest of the
    model and the layers its budget leaves room for, the next ones the next layers; too little is refused with what
    is missing."""
    from bagel_engine.weights.layer_split import parse_memory

    pipe, one = alone
    layer = sum(t.numel() * t.element_size() for t in pipe.model.decoder.layers[0].state_dict().values())
    whole = sum(t.numel() * t.element_size() for t in (*pipe.model.parameters(), *pipe.model.buffers()))
    rest = whole - 6 * layer
    assert parse_memory("24GB", 2) == [24 * 10**9] * 2 and parse_memory("1.5GiB,500MB", 2) == [3 * 2**29, 5 * 10**8]
    with pytest.raises(ValueError, match="one size for every device or one per device"):
        parse_memory("1GB,2GB,3GB", 2)
    split = bagel_engine.load("bagel-shapes", devices="cpu,cpu:0", max_memory=[rest + 2 * layer + 100, 10**9])
    assert split.model.decoder.layer_devices == [torch.device("cpu")] * 2 + [torch.device("cpu:0")] * 4
    assert split.chat("Is there a red circle?", max_new_tokens=6).text == \
        pipe.chat("Is there a red circle?", max_new_tokens=6).text
    with pytest.raises(ValueError, match=r"2 of the 6 decoder layers .* do not fit"):
        bagel_engine.load("bagel-shapes", devices="cpu,cpu:0", max_memory=[rest + 2 * layer + 100, 2 * layer + 100])
    with pytest.raises(bagel_engine.BagelInputError, match="give devices too"):
        bagel_engine.load("bagel-shapes", max_memory="1GB")
    with pytest.raises(bagel_engine.BagelInputError, match="cannot read a memory size"):
        bagel_engine.load("bagel-shapes", devices="cpu,cpu:0", max_memory="lots")


def test_the_cli_takes_the_layer_split():
    from bagel_engine.cli.load_options import load_flags, load_kwargs

    options = load_kwargs({"devices": "0,1", "layer_split": "12,16"})
    assert options == {"devices": "0,1", "layer_split": [12, 16]}
    assert load_flags(options) == ["--devices", "0,1", "--layer-split", "12,16"]
    options = load_kwargs({"devices": "0,1", "max_memory": "20GB,24GB"})
    assert options == {"devices": "0,1", "max_memory": "20GB,24GB"}
    assert load_flags(options) == ["--devices", "0,1", "--max-memory", "20GB,24GB"]
