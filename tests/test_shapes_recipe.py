"""The bagel-shapes recipe end to end at toy scale: every stage runs, the result loads as a model
with its own task defaults, and a rerun resumes instead of redoing."""

import json

import pytest
import torch

import bagel_engine
from bagel_engine.shapes.recipe import Recipe


def test_the_recipe_runs_end_to_end_and_resumes(tmp_path):
    recipe = Recipe(tmp_path / "work", t2i_rows=12, edit_rows=6, vqa_rows=6, eval_rows=2, ae_steps=3, ae_batch=2,
                    ae_eval_pictures=4, steps=2, max_tokens=1024, progress=False, refine_steps=2,
                    refine_t2i_rows=6, refine_edit_rows=3, refine_vqa_rows=6, retable_steps=2)
    out = recipe.run()
    assert (out / "ema.safetensors").exists() and (out / "ae.safetensors").exists()
    assert not (out / "trainer").exists()
    report = json.loads((recipe.work / "ae_report.json").read_text())
    assert report["steps"] == 3 and report["psnr_db"]["mean"] > 0
    ae_config = json.loads((out / "ae_config.json").read_text())
    assert ae_config["scale_factor"] == report["scale_factor"] != 1.0
    timings = json.loads((recipe.work / "timings.json").read_text())
    assert set(timings) >= {"data", "base", "autoencoder", "init", "train", "refine data", "refine"}
    # stage 2 started from stage 1's exported weights, on its own rows
    assert (recipe.stage1 / "ema.safetensors").exists()
    refine_log = [json.loads(line) for line in (recipe.refine_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in refine_log if "mse" in r] == [2]
    assert json.loads((recipe.refine_data / "dataset.json").read_text())["seed"] == recipe.seed + 1
    # stage 3 started from stage 2's export with the position tables of contrast, on rows of seed + 2
    from safetensors.torch import load_file

    from bagel_engine.shapes.recipe import contrast_position_table
    assert json.loads((recipe.retable_data / "dataset.json").read_text())["seed"] == recipe.seed + 2
    stage2, shipped = load_file(recipe.stage2 / "ema.safetensors"), load_file(out / "ema.safetensors")
    assert torch.equal(shipped["vit_pos_embed.pos_embed"], contrast_position_table(8, 160, 100.0))
    assert torch.equal(shipped["latent_pos_embed.pos_embed"], stage2["latent_pos_embed.pos_embed"])  # kept
    assert not torch.equal(stage2["vit_pos_embed.pos_embed"], shipped["vit_pos_embed.pos_embed"])
    assert [json.loads(line)["step"] for line in (recipe.retable_dir / "train_log.jsonl").read_text().splitlines()
            if "mse" in json.loads(line)] == [2]

    pipe = bagel_engine.load(out, device="cpu")
    assert (pipe.task_defaults.height, pipe.task_defaults.width) == (64, 64)
    img = pipe.generate("a red circle", seed=0, num_timesteps=3).image
    assert img.size == (64, 64)
    assert pipe.understand(img, "What color is the circle?", max_new_tokens=3).text is not None

    # a rerun finds every stage done: nothing is trained again
    before = (out / "ema.safetensors").stat().st_mtime_ns
    ae_before = (recipe.base / "ae.safetensors").stat().st_mtime_ns
    Recipe(tmp_path / "work", t2i_rows=12, edit_rows=6, vqa_rows=6, eval_rows=2, ae_steps=3, ae_batch=2,
           ae_eval_pictures=4, steps=2, max_tokens=1024, progress=False, refine_steps=2,
           refine_t2i_rows=6, refine_edit_rows=3, refine_vqa_rows=6, retable_steps=2).run()
    assert (recipe.base / "ae.safetensors").stat().st_mtime_ns == ae_before
    log = [json.loads(line) for line in (recipe.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "mse" in r] == [2]  # logged once (the last step), not trained again
    refine_log = (recipe.refine_dir / "train_log.jsonl").read_text().splitlines()
    assert len([line for line in refine_log if '"mse"' in line]) == 1
    assert (out / "ema.safetensors").stat().st_mtime_ns >= before


def test_the_v3_recipe_has_the_shipped_model_s_architecture():
    """--recipe v3 (the default) is the recipe of the shipped model: its configs are the shipped ones (the
    autoencoder's shift and scale are measured by the run); v4, the experiment, has tokens of 16 px."""
    from pathlib import Path

    shipped = Path(bagel_engine.__file__).parent / "assets" / "bagel-shapes"
    v3 = Recipe.of("v3", Path("w")).configs()
    for part, name in (("llm", "llm_config.json"), ("vit", "vit_config.json"), ("bagel", "bagel_config.json")):
        assert v3[part] == json.loads((shipped / name).read_text()), part
    ae = json.loads((shipped / "ae_config.json").read_text())
    assert {k: v for k, v in v3["ae"].items() if not k.endswith("_factor")} == {
        k: v for k, v in ae.items() if not k.endswith("_factor")}
    v4 = Recipe.of("v4", Path("w"))
    assert v4.configs()["vit"]["patch_size"] == 16 and v4.configs()["ae"]["ch_mult"] == [1, 2, 2, 2]
    assert (v4.steps, v4.refine_steps, v4.max_tokens) == (10000, 0, 1024)
    v5 = Recipe.of("v5", Path("w"))  # v3's architecture, other position tables at init, a shorter stage 2
    assert v5.configs() == v3 and v5.position_tables == "contrast" and v5.refine_steps < Recipe.refine_steps
    v3_recipe = Recipe.of("v3", Path("w"))
    assert (v3_recipe.steps, v3_recipe.refine_steps, v3_recipe.max_tokens, v3_recipe.tokens_px) == (
        Recipe.steps, Recipe.refine_steps, Recipe.max_tokens, Recipe.tokens_px)  # the defaults are the shipped recipe's


def test_the_contrast_position_table_tells_the_patches_of_a_small_grid_apart():
    import torch

    from bagel_engine.shapes.recipe import contrast_position_table
    from bagel_engine.weights.loader import sincos_table_2d

    def spread(table):  # smallest distance between two rows, against the mean row norm
        d = torch.cdist(table, table) + torch.eye(len(table)) * 1e9
        return (d.min() / table.norm(dim=1).mean()).item()

    table = contrast_position_table(8, 160, 100.0)
    assert table.shape == (64, 160)
    assert abs(table.norm(dim=1).mean().item() - 100.0) < 1e-3
    assert table.mean(0).abs().max() < 1e-4  # no constant part: every row is its position only
    # neighbours differ by a good part of a row; the official table's rows are nearly the same on 8 x 8
    assert spread(table) > 0.6
    assert spread(sincos_table_2d(8, 160)) < 0.25


def test_position_tables_of_contrast_from_the_init(tmp_path):
    """--recipe v5's init: both position tables are tables of contrast at the recipe's norms, the rest random."""
    from safetensors.torch import load_file

    from bagel_engine.shapes.recipe import contrast_position_table

    recipe = Recipe.of("v5", tmp_path / "work", t2i_rows=6, edit_rows=3, vqa_rows=3, eval_rows=1, progress=False)
    recipe.make_data()
    recipe.make_base()
    recipe.init_weights()
    state = load_file(recipe.base / "ema.safetensors")
    assert torch.equal(state["vit_pos_embed.pos_embed"], contrast_position_table(8, 160, 100.0))
    assert torch.equal(state["latent_pos_embed.pos_embed"], contrast_position_table(16, 160, 9.0))
    assert state["vit_pos_embed.pos_embed"].shape == (64, 160) and state["latent_pos_embed.pos_embed"].shape == (256, 160)
    with pytest.raises(ValueError, match="position_tables must be"):
        Recipe(tmp_path / "other", position_tables="learned")
