"""How fast does a model learn the easiest question of the shapes world? A diagnostic for the demo model's
weak answers: colour questions about ONE object on white (the colour is the mean of a few patches), trained
alone for a few hundred steps with the generation expert frozen, CE printed as it goes.

    python benchmarks/shapes_vqa_probe.py MODEL_DIR [--steps 300] [--lr 3e-4] [--category color] [--single]
        [--vit-position-table official|contrast]

Measured 2026-12-02 on the stage-1 weights of bagel-shapes v2 (2 cores, ~0.24 s a step): with --single, CE
(answer word and end token averaged) went 0.65 -> about 0.3 in 300 steps at lr 3e-4 and stayed about 0.4 at
lr 1e-3: slow for a question a linear probe of the patches answers, while the ViT tokens do carry the colour
(they differ between a red and a blue square on the object's patches only). Their scale is far from the text
tokens' (ViT-token norms 20-70 after the connector, the position table's 9, text embeddings' 0.3): the first
thing to look at next.

Measured 2026-12-03 on the shipped v3 weights, ``--steps 300 --lr 1e-3 --category where --single`` (where-questions
about one object, alone): CE stayed at chance (0.80 = ln 5 / 2, answer word and end token averaged) all along, and at
chance with the stored table times 8; with ``--vit-position-table contrast`` (``shapes.recipe.contrast_position_table``
in place of the stored ``vit_pos_embed``) it fell to ~0.1 after ~250 steps. The official sin-cos table (base 10000)
barely varies over an 8 x 8 grid: docs/demo-model.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

from bagel_engine.shapes import tasks as shape_tasks
from bagel_engine.shapes import world as shapes_world
from bagel_engine.train import TrainConfig, Trainer


def write_rows(folder: Path, category: str, single: bool, count: int, seed: int) -> Path:
    rng, rows = random.Random(seed), []
    (folder / "img").mkdir(parents=True, exist_ok=True)
    while len(rows) < count:
        q = shape_tasks.vqa_task(rng, category)
        if single and len(q.scene) != 1:
            continue
        path = folder / "img" / f"{len(rows)}.png"
        shapes_world.draw(q.scene).save(path)
        rows.append({"image": str(path), "question": q.question, "answer": q.answer})
    out = folder / "rows.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def with_contrast_vit_table(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose stored ``vit_pos_embed`` is the contrast table."""
    from safetensors.torch import load_file, save_file

    from bagel_engine.shapes.recipe import contrast_position_table

    shutil.copytree(model, out, ignore=shutil.ignore_patterns("trainer"))
    state = load_file(out / "ema.safetensors")
    side, dim = round(state["vit_pos_embed.pos_embed"].shape[0] ** 0.5), state["vit_pos_embed.pos_embed"].shape[1]
    state["vit_pos_embed.pos_embed"] = contrast_position_table(side, dim, 100.0)
    save_file(state, out / "ema.safetensors", metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--category", default="color")
    ap.add_argument("--single", action="store_true", help="only pictures of one object")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--vit-position-table", choices=("official", "contrast"), default="official",
                    help="contrast: replace the stored vit_pos_embed by shapes.recipe.contrast_position_table (norm 100)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqa-probe-"))
    try:
        data = write_rows(work, args.category, args.single, args.rows, args.seed)
        model = args.model
        if args.vit_position_table == "contrast":
            model = str(with_contrast_vit_table(Path(args.model), work / "model"))
        cfg = TrainConfig(model=model, data=str(data), output_dir=str(work / "run"), steps=args.steps, lr=args.lr,
                          warmup_steps=10, max_tokens=1024, save_every=10**9, log_every=10, device="cpu",
                          progress=False, freeze=("gen",))
        Trainer(cfg).run()
        for line in (work / "run" / "train_log.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "ce" in record:
                print(f"step {record['step']:5d}  ce {record['ce']:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
