"""The guidance sweep behind bagel-shapes' ``task_defaults.json``: ``bagel eval shapes`` scores for a grid
of image knobs, the model loaded once, on a seed the reported scores do not use (555).

    python benchmarks/shapes_sweep.py --task t2i --n 12
    python benchmarks/shapes_sweep.py --task edit --n 8 --model path/to/model

Prints one JSON line per setting (knobs, overall, held-out, per category), best last; ``--out FILE``
appends the lines to a JSONL file as well.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import bagel_engine
from bagel_engine.eval.shapes import run_shapes

GRIDS = {
    "t2i": {"cfg_text_scale": [3.0, 4.5, 6.0, 8.0], "timestep_shift": [1.0, 2.0, 3.0], "num_timesteps": [25, 50]},
    "edit": {"cfg_text_scale": [1.5, 2.0, 3.0, 4.0], "cfg_img_scale": [1.0, 1.5, 2.0], "timestep_shift": [1.0, 2.0]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bagel-shapes")
    ap.add_argument("--task", choices=sorted(GRIDS), default="t2i")
    ap.add_argument("--n", type=int, default=12, help="items per category")
    ap.add_argument("--seed", type=int, default=555)
    ap.add_argument("--set", action="append", default=[], metavar="KNOB=V1,V2",
                    help="replace one knob's values in the grid (repeatable), e.g. --set cfg_text_scale=5,6")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args()
    grid = dict(GRIDS[args.task])
    for item in args.set:
        knob, _, values = item.partition("=")
        grid[knob] = [json.loads(v) for v in values.split(",")]
    pipe = bagel_engine.load(args.model)
    rows = []
    for values in itertools.product(*grid.values()):
        knobs = dict(zip(grid, values))
        t0 = time.perf_counter()
        rep = run_shapes(pipe, (args.task,), n=args.n, seed=args.seed, knobs=knobs).scores()[args.task]
        row = {"task": args.task, "n": args.n, "seed": args.seed, "knobs": knobs, "overall": round(rep["overall"], 3),
               "held_out": rep.get("held_out") and round(rep["held_out"], 3),
               "categories": {k: round(v, 2) for k, v in rep["categories"].items()},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    best = max(rows, key=lambda r: r["overall"])
    print("best:", json.dumps(best), flush=True)


if __name__ == "__main__":
    main()
