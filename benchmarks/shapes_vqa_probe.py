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

From a random init (``--from-scratch``: the model directory's configs, seeded random weights, the ViT table of contrast
at ``--vit-table-norm``, and optional init scales), then the answers' accuracy on fresh questions
(``--accuracy N``). Measured 2026-12-07 (bagel-shapes configs, every category with ``--category all``, 1-2 objects,
``--max-tokens 2048 --lr 1e-3 --steps 300``, 2 cores): CE over the last 50 steps and accuracy on 200 questions
(chance ~0.31): plain init 0.650 / 0.265 (0.646 at 400 steps); q/k norm weights x3 0.687 / 0.27; lr 3e-3 0.657 /
0.33; connector output x25 with the table at norm 10 0.600 / 0.31, at norm 1 0.626 / 0.31. None reads the picture
within ~7,500 samples: the plateau is not the token scales' doing alone. The plain init at ``--steps 1500``: accuracy
0.44 (colour 0.29, shape 0.41, count 0.66, where 0.37, yes/no 0.49): it starts, slowly (docs/demo-model.md).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import torch

from bagel_engine.shapes import tasks as shape_tasks
from bagel_engine.shapes import world as shapes_world
from bagel_engine.train import TrainConfig, Trainer


def write_rows(folder: Path, category: str, single: bool, count: int, seed: int, name: str = "rows") -> Path:
    rng, rows = random.Random(seed), []
    (folder / "img").mkdir(parents=True, exist_ok=True)
    while len(rows) < count:
        q = shape_tasks.vqa_task(rng, None if category == "all" else category)
        if single and len(q.scene) != 1:
            continue
        path = folder / "img" / f"{name}-{len(rows)}.png"
        shapes_world.draw(q.scene).save(path)
        rows.append({"image": str(path), "question": q.question, "answer": q.answer})
    out = folder / f"{name}.jsonl"
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


def random_init(model: Path, out: Path, vit_table_norm: float, qk_scale: float, connector_scale: float) -> Path:
    """A copy of ``model`` (configs, tokenizer, VAE) with seeded random weights: the recipe's init, the ViT table of
    contrast, the q/k norm weights and the connector's output layer scaled."""
    from bagel_engine.model.bagel import Bagel
    from bagel_engine.shapes.recipe import contrast_position_table
    from bagel_engine.weights.config import load_model_config
    from bagel_engine.weights.files import save_safetensors
    from bagel_engine.weights.loader import init_random, resolve_model_dir

    shutil.copytree(resolve_model_dir(str(model)), out, ignore=shutil.ignore_patterns("trainer"))
    with torch.device("meta"):
        bagel = Bagel(load_model_config(out))
    init_random(bagel, torch.device("cpu"), torch.float32, 0)
    state = {k: v.contiguous() for k, v in bagel.state_dict().items()}
    rows, dim = state["vit_pos_embed.pos_embed"].shape
    state["vit_pos_embed.pos_embed"] = contrast_position_table(round(rows ** 0.5), dim, vit_table_norm)
    for k in state:
        if "q_norm" in k or "k_norm" in k:
            state[k] = state[k] * qk_scale
        if k.startswith("connector.fc2"):
            state[k] = state[k] * connector_scale
    save_safetensors(state, str(out / "ema.safetensors"), metadata={"format": "pt"})
    return out


def accuracy(model: Path, rows: Path) -> dict[str, float]:
    """The share of answers holding the right word, overall and per question kind."""
    from PIL import Image

    import bagel_engine

    pipe, hits = bagel_engine.load(str(model)), {}
    for line in rows.read_text().splitlines():
        row = json.loads(line)
        answer = pipe.understand(Image.open(row["image"]), row["question"]).text.lower()
        kind = " ".join(row["question"].split()[:2])
        hits.setdefault(kind, []).append(row["answer"].lower() in answer)
    every = [h for kind in hits.values() for h in kind]
    return {"all": sum(every) / len(every), **{k: sum(v) / len(v) for k, v in hits.items()}}


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
    ap.add_argument("--from-scratch", action="store_true", help="random weights of MODEL's configs (see the doc)")
    ap.add_argument("--vit-table-norm", type=float, default=100.0, help="--from-scratch: the ViT table's row norm")
    ap.add_argument("--qk-scale", type=float, default=1.0, help="--from-scratch: q/k norm weights times this")
    ap.add_argument("--connector-scale", type=float, default=1.0, help="--from-scratch: connector.fc2 times this")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--accuracy", type=int, default=0, help="then answer N fresh questions and print the accuracy")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqa-probe-"))
    try:
        data = write_rows(work, args.category, args.single, args.rows, args.seed)
        model = args.model
        if args.from_scratch:
            model = str(random_init(Path(args.model), work / "model", args.vit_table_norm, args.qk_scale,
                                    args.connector_scale))
        elif args.vit_position_table == "contrast":
            model = str(with_contrast_vit_table(Path(args.model), work / "model"))
        cfg = TrainConfig(model=model, data=str(data), output_dir=str(work / "run"), steps=args.steps, lr=args.lr,
                          warmup_steps=10, max_tokens=args.max_tokens, save_every=args.steps, log_every=10, device="cpu",
                          progress=False, freeze=("gen",))
        Trainer(cfg).run()
        for line in (work / "run" / "train_log.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "ce" in record:
                print(f"step {record['step']:5d}  ce {record['ce']:.3f}")
        if args.accuracy:
            test = write_rows(work, args.category, args.single, args.accuracy, args.seed + 1000, name="test")
            checkpoint = sorted((work / "run").glob("checkpoint-*"))[-1]
            print("accuracy", json.dumps({k: round(v, 3) for k, v in accuracy(checkpoint, test).items()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
