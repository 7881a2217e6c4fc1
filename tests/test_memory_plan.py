"""The memory plan (``bagel inspect MODEL --plan --gpu-memory 24GB``): sizes from the full-size
configs, recommendations for 80 / 24 / 12 GB cards, and the estimates against measured peaks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import bagel_engine
from bagel_engine import memory_plan as mp
from bagel_engine.weights.config import load_model_config
from golden import MODEL_DIR, REAL_CONFIG_DIR

GB = 1e9


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(REAL_CONFIG_DIR)


def test_real_model_sizes(cfg):
    w = mp.weight_bytes(cfg)
    assert abs((w["und"] + w["gen"] + w["small"]) / GB - 29.21) < 0.01  # 14.6 B parameters in bf16
    assert mp.parameter_count(cfg) == 14_607_260_128
    assert abs(w["und"] / GB - 13.05) < 0.01 and w["und"] == w["gen"]
    assert abs(w["vae"] / GB - 0.168) < 0.001
    assert mp.kv_bytes_per_token(cfg) == 28 * 2 * 4 * 128 * 2 == 56 * 1024
    tok = mp.context_tokens(cfg, 1024, 1024)
    assert tok["vae_image"] == 64 * 64 + 2 and tok["vit_image"] == 70 * 70 + 2 and tok["latent"] == 4096
    # quantized decoder weights: int8 about half, nf4 about a quarter (+ scales)
    q8, q4 = mp.weight_bytes(cfg, "int8"), mp.weight_bytes(cfg, "nf4")
    assert 0.5 < q8["und"] / w["und"] < 0.51 and 0.28 < q4["und"] / w["und"] < 0.29
    assert q8["small"] == w["small"]  # embeddings, lm_head, ViT, glue, norms are not quantized


def test_estimates_order(cfg):
    est = {(q, o): mp.estimate(cfg, 1024, 1024, quantize=q, offload=o) for _, q, o in mp.OPTIONS}
    bf16 = est[(None, None)]
    assert 33 * GB < bf16.total < 38 * GB and bf16.host_pinned == 0
    assert est[("int8", None)].weights_gpu < bf16.weights_gpu
    assert est[("nf4", None)].weights_gpu < est[("int8", None)].weights_gpu
    assert est[(None, "layer")].total < est[(None, "model")].total < bf16.total
    assert est[(None, "model")].host_pinned == pytest.approx(26.1 * GB, rel=0.01)
    small = mp.estimate(cfg, 512, 512)
    assert small.activations < bf16.activations / 3 and small.kv_cache < bf16.kv_cache


@pytest.mark.parametrize("gpu,expect", [("80GB", (None, None)), ("24GB", (None, "model")), ("12GB", (None, "layer"))])
def test_recommendations(cfg, gpu, expect):
    p = mp.plan(cfg, gpu, 1024, 1024)
    r = p.recommended
    assert r is not None and (r.quantize, r.offload) == expect
    assert r.fits and r.total <= mp.parse_size(gpu)
    # everything ranked before it does not fit
    for e in p.options:
        if e is r:
            break
        assert not e.fits or e.quantize == "fp8"
    text = mp.format_plan(p)
    assert "recommended: " + r.label in text


def test_fp8_recommended_only_when_the_gpu_has_it(cfg):
    assert mp.plan(cfg, "22GB").recommended.quantize == "int8"
    assert mp.plan(cfg, "22GB", fp8=True).recommended.quantize == "fp8"


def test_nothing_fits(cfg):
    p = mp.plan(cfg, "4GB")
    assert p.recommended is None and "nothing fits" in mp.format_plan(p)
    with pytest.raises(ValueError, match="multiples of 16"):
        mp.plan(cfg, "24GB", 1000, 1024)


@pytest.mark.parametrize("text,value", [("24GB", 24e9), ("24 GiB", 24 * 2**30), ("24G", 24e9), ("12000MB", 12e9),
                                        ("80", 80e9), ("1.5TB", 1.5e12), (24, 24e9)])
def test_parse_size(text, value):
    assert mp.parse_size(text) == int(value)


@pytest.mark.parametrize("bad", ["", "GB", "24 XB", "twelve", "24i"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError, match="memory size"):
        mp.parse_size(bad)


def test_peak_tracker_counts_live_bytes():
    w = torch.randn(256, 256)
    with mp.PeakTracker() as t:
        a = torch.randn(64, 256)  # 64 KiB
        b = a @ w  # 64 KiB
        c = b.t()  # a view: not counted
        del a
        d = torch.relu(b)  # 64 KiB
        del b, c, d
    assert t.peak == 2 * 64 * 1024 and t.current == 0


def test_vae_decode_estimate_matches_measurement():
    """The VAE decode estimate against the live bytes measured on the tiny VAE (float32)."""
    pipe = bagel_engine.load(MODEL_DIR)
    cfg = pipe.config
    z = torch.randn(1, cfg.vae.z_channels, 96 // cfg.vae.downsample, 96 // cfg.vae.downsample)
    with torch.inference_mode(), mp.PeakTracker() as t:
        pipe.vae.decode(z)
    est = mp.vae_decode_bytes(cfg, 96, 96, act_bytes=4)
    assert 0.5 * t.peak < est < 2 * t.peak, (t.peak, est)


def _bagel(*args):
    from typer.testing import CliRunner

    from bagel_engine.cli.main import _register, app

    _register()
    return CliRunner().invoke(app, list(args))


def test_cli_plan():
    r = _bagel("inspect", str(REAL_CONFIG_DIR), "--plan", "--gpu-memory", "24GB")
    assert r.exit_code == 0, r.output
    assert "memory plan" in r.stdout and "29.2 GB" in r.stdout
    assert "recommended: offload=model" in r.stdout and "--offload model" in r.stdout
    assert "ema.safetensors: expects 1223 tensors" in r.stdout  # the usual report is still there
    r = _bagel("inspect", str(REAL_CONFIG_DIR), "--json", "--gpu-memory", "12GB", "--height", "512", "--width", "768")
    report = json.loads(r.stdout)
    assert {"model_dir", "config", "expected", "files", "tokenizer_files", "ok"} <= report.keys()
    assert report["plan"]["width"] == 768 and report["plan"]["recommended"]
    r = _bagel("inspect", str(REAL_CONFIG_DIR), "--gpu-memory", "lots")
    assert r.exit_code == 2 and "memory size" in r.output
    r = _bagel("inspect", str(REAL_CONFIG_DIR), "--json")
    assert "plan" not in json.loads(r.stdout)


def test_cli_plan_as_a_user_runs_it():
    r = subprocess.run([sys.executable, "-m", "bagel_engine.cli.main", "inspect", str(REAL_CONFIG_DIR), "--plan",
                        "--gpu-memory", "24GB"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "recommended: offload=model" in r.stdout


def test_two_cards_plan_tensor_parallel(cfg):
    """--gpus 2: per-card figures of the layers split over the cards; bf16 over two 24 GB cards fits where one
    card needs offload; a model that fits one card stays on one."""
    one, two = mp.estimate(cfg), mp.estimate(cfg, tensor_parallel=2)
    w = mp.weight_bytes(cfg)
    assert two.weights_gpu == pytest.approx(one.weights_gpu - (w["und"] + w["gen"] + w["vit"]) / 2)
    assert two.kv_cache == pytest.approx(one.kv_cache / 2)
    p = mp.plan(cfg, "24GB", gpus=2)
    assert (p.recommended.label, p.recommended.tensor_parallel, p.recommended.offload) == ("bf16 + tp=2", 2, None)
    assert p.as_dict()["recommended_options"]["tensor_parallel_size"] == 2
    assert "--tensor-parallel-size 2" in mp.format_plan(p) and "torchrun --nproc-per-node 2" in mp.format_plan(p)
    assert mp.tensor_parallel_size(cfg, 3) == 2 and mp.tensor_parallel_size(cfg, 8) == 4  # 4 KV heads
    big = mp.plan(cfg, "80GB", gpus=2)
    assert big.recommended.tensor_parallel == 1 and "fits on one card" in mp.format_plan(big)
    assert all(e.tensor_parallel == 1 for e in mp.plan(cfg, "24GB").options)  # one card: no split rows
    with pytest.raises(ValueError, match="offload does not run with tensor parallel"):
        mp.estimate(cfg, offload="model", tensor_parallel=2)


def test_cli_plan_for_two_cards():
    r = _bagel("inspect", str(REAL_CONFIG_DIR), "--plan", "--gpus", "2", "--gpu-memory", "24GB")
    assert r.exit_code == 0, r.output
    assert "on 2 GPUs of 24.0 GB" in r.stdout and "recommended: bf16 + tp=2" in r.stdout


def test_a_layer_split_over_cards_is_planned_on_its_fullest_card(cfg):
    """--gpus N also lists the layers split over the cards of one process (--devices): the first card holds the rest
    of the model too; 3 x 16 GB (no tensor parallel over 3: 4 KV heads) fit bf16 that way."""
    split = mp.estimate(cfg, split=2)
    w = mp.weight_bytes(cfg)
    assert split.weights_gpu == pytest.approx((w["und"] + w["gen"]) / 2 + w["small"] + w["vae"])
    assert split.kv_cache == pytest.approx(mp.estimate(cfg).kv_cache / 2) and split.split == 2
    p = mp.plan(cfg, "16GB", gpus=3)
    assert (p.recommended.label, p.recommended.split) == ("bf16 + split=3", 3)
    assert "--devices 0,1,2" in mp.format_plan(p) and p.as_dict()["recommended_options"]["devices"] == 3
    with pytest.raises(ValueError, match="layer split"):
        mp.estimate(cfg, offload="layer", split=2)
