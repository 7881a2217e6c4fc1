"""``bagel eval shapes``: the shapes world's benchmark, scored by the programmatic judge.

Prompts, edits and questions are drawn from the world's templates with a seed (``n`` per
category), run through the public API (``generate`` / ``edit`` / ``understand``, the model's own
task defaults unless knobs are given) and judged by ``bagel_engine.shapes.judge``:

- t2i: single, position, count, two objects, relation (held-out colour-shape pairs excluded), and
  ``held_out``: the same templates naming purple triangles, orange squares or green circles, which
  the demo model never saw as pictures to draw;
- edit: recolour, move, remove, add;
- vqa: colour, shape, count, where, yes/no.

``overall`` of t2i averages its five in-distribution categories (items, not categories); the
held-out score is reported beside it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bagel_engine.shapes import tasks as shape_tasks
from bagel_engine.shapes import world as shapes_world
from bagel_engine.shapes.judge import judge_answer, judge_picture

SUITE_TASKS = ("t2i", "edit", "vqa")


@dataclass
class Item:
    task: str
    category: str
    text: str
    correct: bool
    reason: str
    seed: int
    output: str | None = None  # the answer (vqa)
    picture: str | None = None  # path of the judged picture, when written


@dataclass
class ShapesReport:
    items: list[Item] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    extra_categories: tuple[str, ...] = ()  # reported apart from overall, like held_out

    def scores(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for task in SUITE_TASKS:
            items = [i for i in self.items if i.task == task]
            if not items:
                continue
            cats: dict[str, list[bool]] = {}
            for i in items:
                cats.setdefault(i.category, []).append(i.correct)
            apart = ("held_out", *self.extra_categories)
            in_dist = [i.correct for i in items if i.category not in apart]
            entry = {"overall": sum(in_dist) / len(in_dist) if in_dist else None, "n": len(in_dist),
                     "categories": {c: sum(v) / len(v) for c, v in cats.items() if c not in apart}}
            for c in apart:
                if c in cats:
                    entry[c] = sum(cats[c]) / len(cats[c])
                    entry[f"{c}_n"] = len(cats[c])
            out[task] = entry
        return out

    def summary(self) -> dict[str, Any]:
        return {"suite": "shapes", "scores": self.scores(), "params": self.params}

    def table(self) -> str:
        lines = []
        for task, entry in self.scores().items():
            cats = "  ".join(f"{c} {v:.2f}" for c, v in entry["categories"].items())
            line = f"{task:5s} overall {entry['overall']:.3f} (n={entry['n']})   {cats}"
            if "held_out" in entry:
                line += f"   | held-out pairs {entry['held_out']:.3f} (n={entry['held_out_n']})"
            for c in self.extra_categories:
                if c in entry:
                    line += f"   | {c} {entry[c]:.3f} (n={entry[f'{c}_n']})"
            lines.append(line)
        return "\n".join(lines)


def draw_items(task: str, n: int, seed: int, new_color: str | None = None) -> list[tuple[str, Any]]:
    """``n`` tasks per category of ``task`` (and, for t2i, ``n`` held-out prompts, and ``n`` prompts
    naming ``new_color`` when given), from ``seed``."""
    rng = random.Random(f"eval-{task}-{seed}")
    if task == "t2i":
        items = [(c, shape_tasks.t2i_task(rng, c, held_out="exclude")) for c in shape_tasks.T2I_CATEGORIES for _ in range(n)]
        items += [("held_out", shape_tasks.t2i_task(rng, rng.choice(shape_tasks.T2I_CATEGORIES), held_out="only")) for _ in range(n)]
        if new_color:
            extra = random.Random(f"eval-{task}-{seed}-{new_color}")
            items += [(new_color, shape_tasks.t2i_task(extra, extra.choice(shape_tasks.T2I_CATEGORIES), new_color=new_color))
                      for _ in range(n)]
        return items
    if task == "edit":
        return [(c, shape_tasks.edit_task(rng, c, held_out="exclude")) for c in shape_tasks.EDIT_CATEGORIES for _ in range(n)]
    if task == "vqa":
        return [(c, shape_tasks.vqa_task(rng, c)) for c in shape_tasks.VQA_CATEGORIES for _ in range(n)]
    raise ValueError(f"unknown task {task!r}; choose among {', '.join(SUITE_TASKS)}")


def run_shapes(pipe, tasks: tuple[str, ...] = SUITE_TASKS, n: int = 20, seed: int = 1234,
               out_dir: str | Path | None = None, knobs: dict[str, Any] | None = None, batch: int = 16,
               progress: Callable[[int, int], None] | None = None, new_color: str | None = None) -> ShapesReport:
    """Run and judge the suite on ``pipe`` (a ``BagelPipeline``). ``knobs``: image knobs for t2i and
    edit (default: the model's task defaults); ``out_dir``: write every judged picture and
    ``results.jsonl`` there; ``progress(done, total)`` after each item. ``new_color`` (pink): a t2i
    category of prompts naming that extra colour, and every picture judged with it in the palette
    (reported apart from ``overall``, like the held-out pairs)."""
    knobs = dict(knobs or {})
    out = Path(out_dir) if out_dir else None
    extra = (new_color,) if new_color else ()
    if new_color:
        shapes_world.palette(extra)
    plan = {task: draw_items(task, n, seed, new_color) for task in tasks}
    total, done = sum(len(v) for v in plan.values()), 0
    report = ShapesReport(params={"tasks": list(tasks), "n": n, "seed": seed, "knobs": knobs,
                                  "model": getattr(pipe, "model_name", None), "new_color": new_color},
                          extra_categories=(new_color,) if new_color else ())

    def step(k: int = 1) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, total)

    def keep(image, task: str, index: int, ok: bool) -> str | None:
        if out is None:
            return None
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{index:04d}-{'ok' if ok else 'bad'}.png"
        image.save(path)
        return str(path.relative_to(out))

    for task, items in plan.items():
        if task == "t2i":
            for start in range(0, len(items), batch):
                chunk = items[start:start + batch]
                seeds = [seed + start + k for k in range(len(chunk))]
                outputs = pipe.generate([t.prompt for _, t in chunk], seed=seeds, **knobs)
                for k, ((cat, t), res) in enumerate(zip(chunk, outputs)):
                    v = judge_picture(res.image, t.spec, extra)
                    report.items.append(Item(task, cat, t.prompt, v.correct, v.reason, seeds[k],
                                             picture=keep(res.image, task, start + k, v.correct)))
                step(len(chunk))
        elif task == "edit":
            for k, (cat, e) in enumerate(items):
                s = seed + k
                res = pipe.edit([shapes_world.draw(e.source)], e.instruction, seed=s, **knobs)
                v = judge_picture(res.image, e.spec, extra)
                report.items.append(Item(task, cat, e.instruction, v.correct, v.reason, s,
                                         picture=keep(res.image, task, k, v.correct)))
                step()
        else:
            for k, (cat, q) in enumerate(items):
                s = seed + k
                res = pipe.understand(shapes_world.draw(q.scene), q.question, seed=s)
                v = judge_answer(res.text, q)
                report.items.append(Item(task, cat, q.question, v.correct, v.reason, s, output=res.text))
                step()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)  # a questions-only run writes no picture folder
        with (out / "results.jsonl").open("w") as f:
            for item in report.items:
                f.write(json.dumps(item.__dict__) + "\n")
        (out / "summary.json").write_text(json.dumps(report.summary(), indent=2))
    return report
