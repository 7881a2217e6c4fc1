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


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_and_no_half_one(tmp_path, monkeypatch):
    import errno

    from bagel_engine.params import DiskFull

    base = tmp_path / "base"
    base.mkdir()
    (base / "llm_config.json").write_text("{}")
    C.save_safetensors({"w": torch.ones(2)}, base / "ema.safetensors")
    C.save_safetensors({"v": torch.ones(2)}, base / "ae.safetensors")
    out = tmp_path / "run"
    first = C.save_checkpoint(out, 1, base, {"w": torch.full((2,), 1.0)}, {"step": 1}, {"model": {"w": torch.ones(2)}})
    real = C.save_safetensors

    def full(tensors, path, *a, **kw):
        if str(path).endswith("model.safetensors"):  # the disk fills up midway through the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(C, "save_safetensors", full)
    with pytest.raises(DiskFull, match=r"checkpoint-000002 .*the previous checkpoint \(checkpoint-000001\) is intact"):
        C.save_checkpoint(out, 2, base, {"w": torch.full((2,), 2.0)}, {"step": 2}, {"model": {"w": torch.ones(2)}})
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-000001", "latest"]
    assert C.latest_checkpoint(out) == first
    monkeypatch.setattr(C, "save_safetensors", real)  # space freed: the next save works
    assert C.save_checkpoint(out, 2, base, {"w": torch.ones(2)}, {"step": 2}, {"model": {"w": torch.ones(2)}}).name \
        == "checkpoint-000002"
