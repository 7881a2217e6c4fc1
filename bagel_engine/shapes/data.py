"""The shapes world's data, deterministic from a seed: pictures for the autoencoder, and rows of
text to image, editing and questions in the formats ``bagel train`` reads (JSONL, images as PNG
files beside it).

    bagel shapes data OUT --t2i 20000 --edit 10000 --vqa 10000 --seed 0
    # -> OUT/train.jsonl (one row per sample, shuffled), OUT/images/*.png, OUT/eval.jsonl

Rows: t2i ``{"prompt", "image"}``, edit ``{"instruction", "image", "output_image"}``, questions
``{"image", "question", "answer"}``, each with ``"category"`` (the judge's category; ``bagel
train`` ignores it). Held-out colour-shape pairs never appear in a picture to generate.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from bagel_engine.runtime.image_transforms import image_to_tensor
from bagel_engine.shapes import tasks
from bagel_engine.shapes import world as shapes_world


def random_scene(rng: random.Random, size: int = shapes_world.CANVAS) -> list[shapes_world.Obj]:
    """Zero to three objects of any kinds anywhere (what the autoencoder learns to reconstruct)."""
    placer = shapes_world.Placer(rng, size)
    objs: list[shapes_world.Obj] = []
    for _ in range(rng.choice((1, 1, 2, 2, 3, 3, 0))):
        o = placer.place(rng.choice(list(shapes_world.COLORS)), rng.choice(shapes_world.SHAPES), objs)
        if o is not None:
            objs.append(o)
    return objs


def picture_tensor(objs: list[shapes_world.Obj], size: int = shapes_world.CANVAS) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: the engine's own image-to-tensor rule, as it feeds the VAE."""
    return image_to_tensor(shapes_world.draw(objs, size))


@dataclass
class PictureStream:
    """Batches of random pictures for autoencoder training: batch ``k`` depends only on ``(seed, k)``
    (so a resumed run sees the same pictures)."""

    seed: int = 0
    size: int = shapes_world.CANVAS

    def __call__(self, step: int, batch: int) -> torch.Tensor:
        rng = random.Random(self.seed * 1_000_003 + step)
        return torch.stack([picture_tensor(random_scene(rng, self.size), self.size) for _ in range(batch)])


def _save_png(objs: list[shapes_world.Obj], path: Path, size: int) -> str:
    shapes_world.draw(objs, size).save(path, optimize=True)
    return f"images/{path.name}"


def task_rows(kind: str, count: int, seed: int, images: Path, size: int = shapes_world.CANVAS, prefix: str = "",
              new_color: str | None = None) -> list[dict]:
    """``count`` rows of ``kind`` (t2i / edit / vqa) drawn from ``seed``, their pictures written to
    ``images``; ``new_color``: t2i prompts that each name an object of that extra colour."""
    rng = random.Random(f"{kind}-{seed}" + (f"-{new_color}" if new_color else ""))
    rows = []
    for i in range(count):
        name = f"{prefix}{kind}{'_' + new_color if new_color else ''}_{i:06d}"
        if kind == "t2i":
            t = tasks.t2i_task(rng, held_out="exclude", size=size, new_color=new_color)
            rows.append({"prompt": t.prompt, "image": _save_png(t.scene, images / f"{name}.png", size),
                         "category": t.category})
        elif kind == "edit":
            e = tasks.edit_task(rng, held_out="exclude", size=size)
            rows.append({"instruction": e.instruction, "image": _save_png(e.source, images / f"{name}_in.png", size),
                         "output_image": _save_png(e.target, images / f"{name}_out.png", size),
                         "category": e.category})
        elif kind == "vqa":
            q = tasks.vqa_task(rng, size=size)
            rows.append({"image": _save_png(q.scene, images / f"{name}.png", size), "question": q.question,
                         "answer": q.answer, "category": q.category})
        else:
            raise ValueError(f"unknown row kind {kind!r}")
    return rows


def _write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_dataset(out: str | Path, t2i: int, edit: int, vqa: int, seed: int = 0, size: int = shapes_world.CANVAS,
                  eval_rows: int = 30, new_color: str | None = None, new_color_rows: int = 0) -> Path:
    """Write ``out/train.jsonl`` (shuffled with ``seed``), ``out/eval.jsonl`` (``eval_rows`` of each
    kind from another seed) and their pictures; returns ``out/train.jsonl``. ``new_color_rows``
    more t2i rows name an object of ``new_color`` (an extra colour to teach). Rerunning with the same
    arguments does nothing once the files exist."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    done = out / "dataset.json"
    want = {"t2i": t2i, "edit": edit, "vqa": vqa, "seed": seed, "size": size, "eval_rows": eval_rows}
    if new_color_rows:
        shapes_world.palette((new_color,))  # a known extra colour
        want |= {"new_color": new_color, "new_color_rows": new_color_rows}
    if done.exists() and json.loads(done.read_text()) == want and (out / "train.jsonl").exists():
        return out / "train.jsonl"
    rows = []
    for kind, count in (("t2i", t2i), ("edit", edit), ("vqa", vqa)):
        rows += task_rows(kind, count, seed, images, size)
    if new_color_rows:
        rows += task_rows("t2i", new_color_rows, seed, images, size, new_color=new_color)
    random.Random(seed).shuffle(rows)
    _write_jsonl(rows, out / "train.jsonl")
    held = []
    for kind in ("t2i", "edit", "vqa"):
        held += task_rows(kind, eval_rows, seed + 7919, images, size, prefix="eval_")
    _write_jsonl(held, out / "eval.jsonl")
    done.write_text(json.dumps(want))
    return out / "train.jsonl"
