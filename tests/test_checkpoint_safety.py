"""Resuming reads the trainer state without unpickling arbitrary objects."""

import os

import pytest
import torch

from bagel_engine.params import BagelInputError
from bagel_engine.train import checkpoint as C


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_state_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint-000001"
    (ckpt / "trainer").mkdir(parents=True)
    torch.save({"step": 1, "payload": Evil(marker)}, ckpt / "trainer" / "state.pt")
    with pytest.raises(BagelInputError, match="refused"):
        C.load_checkpoint(ckpt)
    assert not marker.exists()


def test_a_plain_state_loads(tmp_path):
    ckpt = tmp_path / "checkpoint-000001"
    (ckpt / "trainer").mkdir(parents=True)
    state = {"step": 3, "rng": torch.Generator().get_state(), "history": [{"mse": 0.5}], "config": {"betas": (0.9, 0.95)}}
    torch.save(state, ckpt / "trainer" / "state.pt")
    _, loaded = C.load_checkpoint(ckpt)
    assert loaded["step"] == 3 and loaded["config"]["betas"] == (0.9, 0.95)
