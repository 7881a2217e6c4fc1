"""The BAGEL family's checkpoint layouts load as they are and draw what the official layout draws:
Zebra-CoT's model_bf16.safetensors, a trainer's model.safetensors, sharded weights with an index, one file
with its configs in the metadata, a directory without configs (--base-config), --weights-file and
--task-defaults. The tiny-v1 checkpoint is re-laid out in each shape."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import bagel_engine
from bagel_engine.inspection import inspect_model
from bagel_engine.params import ConfigError
from bagel_engine.weights.layout import find_checkpoint

TINY = Path(__file__).parent / "data" / "tiny-v1" / "model"
SMALL_FILES = ["ae.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json"]
JOB = dict(seed=3, height=32, width=32, num_timesteps=3)


def draw(model_dir, **load):
    pipe = bagel_engine.load(model_dir, device="cpu", **load)
    return np.asarray(pipe.generate("a red circle", **JOB).image)


@pytest.fixture(scope="module")
def official():
    return draw(TINY)


def copy_without_weights(dst: Path, configs: bool = True) -> Path:
    dst.mkdir()
    names = SMALL_FILES + (["llm_config.json", "vit_config.json", "ae_config.json", "bagel_config.json"]
                           if configs else [])
    for name in names:
        shutil.copy(TINY / name, dst / name)
    return dst


def test_zebra_and_trainer_single_files_load_and_draw_the_same(tmp_path, official):
    for name, words in [("model_bf16.safetensors", "Zebra"), ("model.safetensors", "trainer")]:
        d = copy_without_weights(tmp_path / name)
        shutil.copy(TINY / "ema.safetensors", d / name)
        assert words in find_checkpoint(d).layout
        np.testing.assert_array_equal(draw(d), official)


def test_sharded_weights_with_an_index(tmp_path, official):
    d = copy_without_weights(tmp_path / "sharded")
    state = load_file(str(TINY / "ema.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(d / name))
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = find_checkpoint(d)
    assert ck.layout.startswith("sharded (2 files") and len(ck.weights) == 2
    np.testing.assert_array_equal(draw(d), official)
    report = inspect_model(d)
    assert report["ok"] and "sharded" in report["layout"]


def test_a_missing_shard_is_named(tmp_path):
    d = copy_without_weights(tmp_path / "sharded")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(ConfigError, match="model-00001.safetensors"):
        bagel_engine.load(d, device="cpu")


def test_one_file_with_its_configs_in_the_metadata(tmp_path, official):
    d = copy_without_weights(tmp_path / "single", configs=False)
    meta = {name: (TINY / f"{name}.json").read_text() for name in ("llm_config", "vit_config", "ae_config",
                                                                    "bagel_config")}
    save_file(load_file(str(TINY / "ema.safetensors")), str(d / "bagel_tiny.safetensors"), metadata=meta)
    ck = find_checkpoint(d)
    assert "single file (bagel_tiny.safetensors)" in ck.layout and "metadata" in ck.layout
    np.testing.assert_array_equal(draw(d), official)


def test_configs_from_the_base_model(tmp_path, official):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(TINY / "ema.safetensors", d / "ema.safetensors")
    with pytest.raises(ConfigError, match="--base-config"):
        bagel_engine.load(d, device="cpu")
    ck = find_checkpoint(d, base_config=TINY)
    assert ck.config_dir == TINY and ck.vae == TINY / "ae.safetensors" and ck.tokenizer_dir == TINY
    assert ck.filled_from == str(TINY)
    np.testing.assert_array_equal(draw(d, base_config=str(TINY)), official)


def test_the_shipped_real_configs_describe_the_7b_model(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    pipe = bagel_engine.load(d, device="meta", base_config="bagel-7b-mot")
    assert pipe.config.llm.hidden_size == 3584 and pipe.config.llm.num_hidden_layers == 28
    with pytest.raises(ConfigError, match="neither a model directory"):
        find_checkpoint(d, base_config="no-such-thing", need_weights=False)


def test_weights_file_picks_among_several(tmp_path, official):
    d = copy_without_weights(tmp_path / "several")
    shutil.copy(TINY / "ema.safetensors", d / "step_1000.safetensors")
    shutil.copy(TINY / "ema.safetensors", d / "step_2000.safetensors")
    with pytest.raises(ConfigError, match="--weights-file"):
        bagel_engine.load(d, device="cpu")
    np.testing.assert_array_equal(draw(d, weights_file="step_2000.safetensors"), official)
    with pytest.raises(ConfigError, match="step_3000"):
        find_checkpoint(d, weights_file="step_3000.safetensors")


def test_task_defaults_from_a_file_replace_the_directory_s(tmp_path):
    f = tmp_path / "defaults.json"
    f.write_text(json.dumps({"t2i": {"height": 16, "width": 48, "num_timesteps": 2}}))
    pipe = bagel_engine.load(TINY, device="cpu", task_defaults=str(f))
    out = pipe.generate("a red circle", seed=1)
    assert out.image.size == (48, 16) and out.params["num_timesteps"] == 2
    with pytest.raises(ConfigError, match="not found"):
        bagel_engine.load(TINY, device="meta", task_defaults=str(tmp_path / "missing.json"))


def test_inspect_names_the_layout_and_where_files_come_from(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(TINY / "ema.safetensors", d / "model_bf16.safetensors")
    done = subprocess.run([sys.executable, "-m", "bagel_engine", "inspect", str(d), "--base-config", str(TINY)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Zebra" in done.stdout and str(TINY) in done.stdout


@pytest.mark.parametrize("layout", ["zebra", "single file", "bare"])
def test_training_from_another_layout_writes_an_official_checkpoint(tmp_path, layout):
    """Fine-tuning Zebra-CoT's or a single-file checkpoint: the run's checkpoint is in the official layout
    (ema.safetensors, the configs as files, the VAE), without the base's weight file, and it loads."""
    from bagel_engine.train import TrainConfig, train
    from bagel_engine.train.sample import Dropout

    base = copy_without_weights(tmp_path / "base", configs=layout == "zebra") if layout != "bare" else tmp_path / "base"
    options = {}
    if layout == "bare":  # the weights alone: configs, tokenizer and VAE from --base-config, a custom file name
        base.mkdir()
        shutil.copy(TINY / "ema.safetensors", base / "step_500.safetensors")
        shutil.copy(TINY / "ema.safetensors", base / "step_900.safetensors")
        options = {"weights_file": "step_900.safetensors", "base_config": str(TINY)}
    elif layout == "zebra":
        shutil.copy(TINY / "ema.safetensors", base / "model_bf16.safetensors")
    else:
        meta = {n: (TINY / f"{n}.json").read_text() for n in ("llm_config", "vit_config", "ae_config", "bagel_config")}
        save_file(load_file(str(TINY / "ema.safetensors")), str(base / "bagel_tiny.safetensors"), metadata=meta)
    data = Path(__file__).parent / "data" / "train" / "tiny.jsonl"
    path = train(TrainConfig(model=str(base), data=str(data), output_dir=str(tmp_path / "run"), steps=1,
                             warmup_steps=0, max_tokens=400, save_every=100, dropout=Dropout(0.0, 0.0, 0.0), progress=False,
                             **options))
    names = {p.name for p in path.iterdir()}
    assert {"ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "bagel_config.json",
            "tokenizer.json"} <= names
    assert not names & {"model_bf16.safetensors", "bagel_tiny.safetensors", "step_500.safetensors",
                        "step_900.safetensors"}
    assert find_checkpoint(path).layout.startswith("official")
    assert bagel_engine.load(path, device="cpu").generate("a red circle", **JOB).image.size == (32, 32)
