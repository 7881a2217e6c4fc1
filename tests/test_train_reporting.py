"""Training dashboards and files others can read: ``report_to="tensorboard"`` writes the figures of
train_log.jsonl to an event file (read back here with TensorBoard's own reader), a warm-up longer than the
run is warned about, and checkpoint files get the mode the umask allows (0644), not safetensors' 0600."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from bagel_engine.params import BagelInputError
from bagel_engine.train import TrainConfig, train
from bagel_engine.train.sample import Dropout
from bagel_engine.weights.files import default_mode
from golden import MODEL_DIR

DATA = Path(__file__).parent / "data" / "train" / "tiny.jsonl"


def config(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(model=str(MODEL_DIR), data=str(DATA), output_dir=str(tmp_path / "run"), steps=3, lr=3e-3,
                warmup_steps=1, max_tokens=400, save_every=100, log_every=1, dropout=Dropout(0.0, 0.0, 0.0),
                progress=False)
    return TrainConfig(**(base | kw))


def test_tensorboard_gets_the_logged_figures_and_checkpoints_are_group_readable(tmp_path, caplog):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with caplog.at_level(logging.WARNING, logger="bagel_engine.train.trainer"):
        path = train(config(tmp_path, report_to="tensorboard", warmup_steps=10))
    assert "warmup_steps (10) is more than steps (3)" in caplog.text
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert {"train/mse", "train/ce", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
    for tag in ("mse", "lr"):
        seen = [(e.step, e.value) for e in events.Scalars(f"train/{tag}")]
        assert seen == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in logged], tag
    # what safetensors writes 0600 is given the umask's mode (0644 under the usual umask 022)
    for name in ("ema.safetensors", "trainer/model.safetensors", "llm_config.json"):
        mode = stat.S_IMODE(os.stat(path / name).st_mode)
        assert mode == default_mode() and mode & stat.S_IRGRP, (name, oct(mode))


def test_unknown_dashboards_are_refused(tmp_path):
    with pytest.raises(BagelInputError, match="choose one of none, tensorboard, wandb"):
        config(tmp_path, report_to="mlflow").check()
