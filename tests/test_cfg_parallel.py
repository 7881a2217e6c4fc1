"""CFG-parallel (issue 14): the guidance branches of each step on their own gloo process give the
one-process result: an edit (three branches over three ranks), a text-to-image (two branches, one rank
idle), with and without a given seed (the ranks agree on a drawn one). The edit's input is a drawn picture:
a generated one may differ by one unit in a pixel between thread layouts (float rounding at a .5), and an edit
amplifies that past the tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import bagel_engine
from bagel_engine.shapes.world import Obj, draw

FAST = dict(num_timesteps=6)


def _jobs(pipe):
    picture = draw([Obj("red", "circle", 12, 32, 8)])
    edit = pipe.edit(picture, "make the circle blue", seed=7, **FAST)
    t2i = pipe.generate("two blue squares", seed=3, **FAST)
    drawn = pipe.generate("a green square", **FAST)  # no seed: one is drawn
    return {"edit": edit.latents,
            "t2i": t2i.latents, "drawn": drawn.latents, "drawn_seed": drawn.seed}


def _rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pipe = bagel_engine.load("bagel-shapes", device="cpu", cfg_parallel_size=world)
    torch.save(_jobs(pipe), f"{out}.{rank}")
    dist.destroy_process_group()


def test_three_ranks_give_the_one_process_result(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(3, f"file://{tmp_path / 'rendezvous'}", out), nprocs=3)
    pipe = bagel_engine.load("bagel-shapes", device="cpu")
    ranks = [torch.load(f"{out}.{r}") for r in range(3)]
    assert ranks[0]["drawn_seed"] == ranks[1]["drawn_seed"] == ranks[2]["drawn_seed"]
    for name in ("edit", "t2i"):
        for r in ranks:  # every rank holds the same latent...
            assert torch.equal(r[name], ranks[0][name])
    alone = _jobs(pipe)
    for name in ("edit", "t2i"):  # ... equal to one process within float rounding
        torch.testing.assert_close(ranks[0][name], alone[name], rtol=1e-4, atol=1e-4)
    again = pipe.generate("a green square", seed=ranks[0]["drawn_seed"], **FAST).latents
    torch.testing.assert_close(ranks[0]["drawn"], again, rtol=1e-4, atol=1e-4)
    assert isinstance(pipe.generate("a red circle", seed=1, **FAST).image, Image.Image)


def test_without_torchrun_it_says_how(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    pipe = bagel_engine.load("bagel-shapes", device="cpu")
    with pytest.raises(bagel_engine.BagelInputError, match="torchrun --nproc-per-node 2"):
        pipe.enable_cfg_parallel(2)


def test_a_batch_job_needs_as_many_processes_as_the_model_runs_over(tmp_path):
    """A model-parallel batch job runs one model over all its processes: one process for CFG-parallel 2 is refused
    with the command to run (not a hang)."""
    from bagel_engine.batch.runner import BatchJob, run_batch

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red circle"}\n')
    job = BatchJob(input=rows, task="t2i", output_dir=tmp_path / "out", model="bagel-shapes",
                   load_options={"cfg_parallel_size": 2})
    with pytest.raises(bagel_engine.BagelInputError, match="torchrun --nproc-per-node 2 \\(running 1\\)"):
        run_batch(job)
