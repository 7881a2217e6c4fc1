"""Hub models through the real huggingface_hub client against a stand-in hub over loopback (tests/fake_hub.py):
`bagel inspect HUB_ID` and `bagel train --check` read configs, tokenizer and safetensors headers only;
revisions (--revision, org/name@rev), a cache folder and tokens reach every download."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save

from bagel_engine.params import ConfigError
from bagel_engine.weights.hub import HubOptions, looks_like_hub_id, split_id

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub, Repo  # noqa: E402

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"
TRAIN_ROWS = Path(__file__).parent / "data" / "train" / "tiny.jsonl"
MAIN = {p.name: p.read_bytes() for p in sorted(TINY.iterdir()) if p.is_file()}
WEIGHT_BYTES = {n: len(b) for n, b in MAIN.items() if n.endswith(".safetensors")}


def _revisions() -> dict[str, dict[str, bytes]]:
    state = load_file(str(TINY / "ema.safetensors"))
    dropped = sorted(state)[0]
    broken = save({k: v for k, v in state.items() if k != dropped})
    configs = {n: (TINY / f"{n}.json").read_text() for n in ("llm_config", "vit_config", "ae_config", "bagel_config")}
    comfy = {n: b for n, b in MAIN.items() if not n.endswith("_config.json") and n != "ema.safetensors"}
    comfy["bagel_tiny.safetensors"] = save(state, metadata=configs)
    return {"main": MAIN, "v1": {**MAIN, "task_defaults.json": json.dumps({"t2i": {"height": 16, "width": 48}}).encode()},
            "broken": {**MAIN, "ema.safetensors": broken}, "comfy": comfy}


@pytest.fixture(scope="module")
def hub():
    with FakeHub({"tiny-org/tiny": Repo(_revisions()), "tiny-org/private": Repo({"main": MAIN}, token="hf_secret")}) as h:
        yield h


def run(hub, tmp_path, *args, code=None):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "default-cache"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "bagel_engine", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_hub_ids_and_revisions():
    assert looks_like_hub_id("ByteDance-Seed/BAGEL-7B-MoT") and looks_like_hub_id("org/name@v2")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("name") and not looks_like_hub_id("a/b/c")
    assert split_id("org/name@v2") == ("org/name", HubOptions(revision="v2"))
    assert split_id("org/name", HubOptions(revision="v3")) == ("org/name", HubOptions(revision="v3"))
    with pytest.raises(ConfigError, match="--revision says"):
        split_id("org/name@v2", HubOptions(revision="v3"))
    with pytest.raises(ConfigError, match="nothing after '@'"):
        split_id("org/name@")


def test_inspect_reads_headers_not_weights(hub, tmp_path):
    hub.served.clear()
    r = run(hub, tmp_path, "inspect", "tiny-org/tiny", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "hub: tiny-org/tiny at main" in r.stdout and "on the hub, headers read" in r.stdout
    assert "status: OK" in r.stdout
    for name, size in WEIGHT_BYTES.items():  # a header range at most, never the file
        assert hub.served.get(name, 0) < size, (name, hub.served)
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and list((tmp_path / "cache").rglob("llm_config.json"))
    assert not (tmp_path / "default-cache").exists()  # --cache-dir was used, not the default


def test_inspect_with_a_memory_plan_asks_the_hub_nothing_more(hub, tmp_path):
    hub.requests.clear()
    assert run(hub, tmp_path, "inspect", "tiny-org/tiny", "--json", "--cache-dir", str(tmp_path / "a")).returncode == 0
    alone = sorted((method, p) for method, p, _ in hub.requests)  # downloads run in threads: any order
    hub.requests.clear()
    r = run(hub, tmp_path, "inspect", "tiny-org/tiny", "--plan", "--gpu-memory", "24GB", "--json", "--cache-dir",
            str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["plan"]
    assert sorted((method, p) for method, p, _ in hub.requests) == alone  # the hub id is resolved once, not per use


def test_inspect_a_revision_finds_what_is_wrong(hub, tmp_path):
    r = run(hub, tmp_path, "inspect", "tiny-org/tiny@broken", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["hub"] == {"repo_id": "tiny-org/tiny", "revision": "broken"}
    assert report["files"]["ema.safetensors"]["on_hub"] and len(report["files"]["ema.safetensors"]["missing"]) == 1
    r = run(hub, tmp_path, "inspect", "tiny-org/tiny", "--revision", "nope")
    assert r.returncode == 2 and "no such revision" in r.stderr


def test_inspect_a_single_file_repo_reads_its_configs_from_the_header(hub, tmp_path):
    hub.served.clear()
    r = run(hub, tmp_path, "inspect", "tiny-org/tiny", "--revision", "comfy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "single file (bagel_tiny.safetensors), configs in its metadata" in r.stdout
    assert hub.served.get("bagel_tiny.safetensors", 0) < len(_revisions()["comfy"]["bagel_tiny.safetensors"])


def test_a_private_repo_needs_its_token(hub, tmp_path):
    r = run(hub, tmp_path, "inspect", "tiny-org/private")
    assert r.returncode == 2 and "token" in r.stderr
    r = run(hub, tmp_path, "inspect", "tiny-org/private", "--token", "hf_secret")
    assert r.returncode == 0, r.stderr
    assert "Bearer hf_secret" in hub.tokens_seen


def test_train_check_downloads_no_weights(hub, tmp_path):
    hub.served.clear()
    r = run(hub, tmp_path, "train", str(TRAIN_ROWS), "-m", "tiny-org/tiny", "-o", str(tmp_path / "run"), "--check",
            "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["good"] > 0
    assert not any(n.endswith(".safetensors") for n in hub.served), hub.served


def test_load_at_a_revision(hub, tmp_path):
    code = f"""
import bagel_engine
from bagel_engine.params import ConfigError
pipe = bagel_engine.load("tiny-org/tiny", revision="v1", cache_dir={str(tmp_path / 'c')!r}, device="cpu")
print(pipe.generate("a red circle", seed=1, num_timesteps=2).image.size)
pipe = bagel_engine.load("tiny-org/tiny@v1", cache_dir={str(tmp_path / 'c')!r}, device="meta")
print(pipe.task_defaults.width)
try:
    bagel_engine.load("tiny-org/tiny@v1", revision="main", device="meta")
except ConfigError as e:
    print("error:", e)
"""
    r = run(hub, tmp_path, code=code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "(48, 16)" and lines[1] == "48" and "--revision says 'main'" in lines[2]


def test_a_token_is_never_written_down(tmp_path):
    from bagel_engine.train import TrainConfig

    cfg = TrainConfig(model="org/name", data="d.jsonl", output_dir="o", token="hf_secret_token")
    assert "token" not in cfg.public() and "hf_secret_token" not in repr(cfg)
    r = subprocess.run([sys.executable, "-m", "bagel_engine", "eval", "shapes", "-m", "bagel-shapes", "--task", "vqa",
                        "--n", "1", "--token", "hf_secret_token", "--json", "-o", str(tmp_path / "eval")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "hf_secret_token" not in r.stdout + r.stderr
    assert all("hf_secret_token" not in p.read_text() for p in (tmp_path / "eval").rglob("*.json*"))
