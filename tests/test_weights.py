"""Loading: configs with the official overrides, the full-size tensor manifest, strict streaming
of safetensors, the hub client, and `bagel inspect`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bagel_engine
from bagel_engine.weights.config import ConfigError, load_model_config
from bagel_engine.weights.loader import CheckpointError, expected_tensors, parse_dtype
from golden import MODEL_DIR, REAL_CONFIG_DIR

MANIFEST = json.loads((REAL_CONFIG_DIR / "manifest.json").read_text())


def test_full_size_model_matches_official_manifest():
    expected = expected_tensors(load_model_config(REAL_CONFIG_DIR))
    for fname, count in (("ema.safetensors", 1223), ("ae.safetensors", 244)):
        official = {k: tuple(v) for k, v in MANIFEST[fname]["shapes"].items()}
        assert len(official) == count == MANIFEST[fname]["tensors"]
        assert expected[fname].keys() == official.keys(), (
            f"{fname}: missing {sorted(official.keys() - expected[fname].keys())[:5]}, "
            f"extra {sorted(expected[fname].keys() - official.keys())[:5]}"
        )
        assert expected[fname] == official
        assert sum(math.prod(s) for s in expected[fname].values()) == MANIFEST[fname]["parameters"]


def test_official_overrides_applied():
    cfg = load_model_config(REAL_CONFIG_DIR)
    assert cfg.vit.num_hidden_layers == 26  # json says 27: the official app drops one
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings
    assert cfg.bagel.max_latent_size == 64 and cfg.vae.downsample == 8 and cfg.vae.scale_factor == 0.3611
    assert cfg.latent_downsample == 16 and cfg.max_image_side == 1024


def test_meta_device_reads_no_weights(tmp_path):
    # Full-size configs beside the tiny tokenizer, and no weight file at all.
    for f in ("llm_config.json", "vit_config.json"):
        shutil.copy(REAL_CONFIG_DIR / f, tmp_path / f)
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(MODEL_DIR / f, tmp_path / f)
    pipe = bagel_engine.load(tmp_path, device="meta")
    params = list(pipe.model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == MANIFEST["ema.safetensors"]["parameters"]


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32),
                                            (torch.bfloat16, torch.bfloat16)])
def test_load_dtype(dtype, expected):
    pipe = bagel_engine.load(MODEL_DIR, device="cpu", dtype=dtype)
    assert {p.dtype for p in pipe.model.parameters()} == {expected}
    assert pipe.vae.dtype == torch.float32  # the VAE stays float32 (official)


def test_bad_dtype_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float64x")
    with pytest.raises(ConfigError, match="neither a model directory nor a hub id"):
        bagel_engine.load(tmp_path / "nope" / "deeper")
    with pytest.raises(ConfigError, match="no weights in .*expected ema.safetensors"):
        bagel_engine.load(tmp_path)


def _copy_model(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(MODEL_DIR, dst)
    return dst


def test_missing_tensor_is_named(tmp_path):
    model = _copy_model(tmp_path)
    sd = load_file(str(model / "ema.safetensors"))
    del sd["llm2vae.bias"]
    save_file(sd, str(model / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): llm2vae.bias"):
        bagel_engine.load(model, device="cpu")
    report = bagel_engine.inspect_model(model)
    assert report["files"]["ema.safetensors"]["missing"] == ["llm2vae.bias"]
    assert not report["ok"]


def test_max_latent_size_mismatch_hint(tmp_path):
    model = _copy_model(tmp_path)
    cfg = json.loads((model / "bagel_config.json").read_text())
    cfg["max_latent_size"] = 32
    (model / "bagel_config.json").write_text(json.dumps(cfg))
    report = bagel_engine.inspect_model(model)
    ema = report["files"]["ema.safetensors"]
    assert ema["wrong_shape"]["latent_pos_embed.pos_embed"] == {"expected": [1024, 64], "found": [576, 64]}
    assert any("max_latent_size=24" in h for h in ema["hints"])
    with pytest.raises(CheckpointError, match="max_latent_size"):
        bagel_engine.load(model, device="cpu")


def _bagel(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bagel_engine.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_inspect_json_and_text():
    r = _bagel("inspect", str(REAL_CONFIG_DIR), "--json")
    data = json.loads(r.stdout)
    assert {k: len(v) for k, v in data["expected"].items()} == {"ema.safetensors": 1223, "ae.safetensors": 244}
    assert data["expected"]["ema.safetensors"]["latent_pos_embed.pos_embed"] == [4096, 3584]
    r = _bagel("inspect", str(MODEL_DIR))
    assert r.returncode == 0, r.stderr
    assert "ema.safetensors: expects 111 tensors" in r.stdout and "status: OK" in r.stdout


def test_cli_inspect_mismatch_exit_code(tmp_path):
    model = _copy_model(tmp_path)
    sd = load_file(str(model / "ae.safetensors"))
    sd["decoder.extra.weight"] = torch.zeros(2)
    save_file(sd, str(model / "ae.safetensors"))
    r = _bagel("inspect", str(model))
    assert r.returncode == 1
    assert "unexpected: decoder.extra.weight" in r.stdout


def test_hub_id_through_the_hub_cache_offline(tmp_path):
    """A hub id resolves through huggingface-hub's cache (HF_HUB_OFFLINE=1: no network)."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-bagel"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    shutil.copytree(MODEL_DIR, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import bagel_engine; p = bagel_engine.load('tiny-org/tiny-bagel', device='cpu'); "
            "print(p.chat('hello there', max_new_tokens=4).text is not None)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"
    code_missing = "import bagel_engine; bagel_engine.load('tiny-org/absent')"
    r = subprocess.run([sys.executable, "-c", code_missing], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "could not get 'tiny-org/absent'" in r.stderr
