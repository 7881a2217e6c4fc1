"""GenEval's generation as the official script does it (ByteDance-Seed/Bagel ``eval/gen/gen_images_mp.py``,
run by ``scripts/eval/run_geneval.sh``), written where GenEval's own scorer reads it.

The official run: each line of a metadata JSONL (``{"tag": ..., "include": [...], "prompt": ...}``; 553 lines,
``evaluation_metadata_long.jsonl`` by default, the rewritten prompts behind 0.88, the original
``evaluation_metadata.jsonl`` behind 0.82) gets 4 pictures, drawn one at a time (``--batch_size 1``) at
1024x1024, text guidance only (cfg 4, no image branch), interval [0, 1], shift 3, 50 timesteps,
renorm_min 0 (global renorm), each cropped to its bounding box (``getbbox``) and saved as
``OUT/{index:05}/samples/{k:05}.png`` beside ``OUT/{index:05}/metadata.jsonl`` (the line itself). Prompts are
split into contiguous ranges, one per rank; a prompt whose pictures all exist is skipped.

Where this differs, and why: the official script seeds one global generator once (42) so a picture depends on
every draw before it, on the rank count and on what a rerun skips; here picture ``k`` of prompt ``i`` has seed
``seed + 4 * i + k`` (``seed`` default 42), the same whatever the ranks and resumes. Pictures and metadata are
written atomically (a killed run leaves no half PNG to be mistaken for done). A bad line is recorded in
``OUT/bad_rows.jsonl`` and the run goes on. The official prefill runs under float16 autocast; ours in the
pipeline's dtype (``--dtype float32`` is the maintainers' setting for the published figure).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bagel_engine.batch.manifest import atomic_write_bytes
from bagel_engine.eval.common import cropped_png, rank_range, record_bad
from bagel_engine.params import BagelInputError

log = logging.getLogger(__name__)

PRESET: dict[str, Any] = {"cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.0, 1.0),
                          "timestep_shift": 3.0, "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "global"}
RESOLUTION, N_SAMPLES, BATCH_SIZE, SEED = 1024, 4, 1, 42
SCORER_HELP = (
    "score with GenEval's own scorer (mmdetection 2.x, its Mask2Former weights):\n"
    "  python eval/gen/geneval/evaluation/evaluate_images_mp.py {out} --outfile {out}/results.jsonl "
    "--model-path eval/gen/geneval/model\n"
    "  python eval/gen/geneval/evaluation/summary_scores.py {out}/results.jsonl\n"
    "(paths of the official BAGEL repository; torchrun works for the first as in scripts/eval/run_geneval.sh)")


@dataclass
class GenEvalJob:
    metadata_file: Path
    out_dir: Path
    n_samples: int = N_SAMPLES
    batch_size: int = BATCH_SIZE
    resolution: int = RESOLUTION
    seed: int = SEED
    knobs: dict[str, Any] = field(default_factory=dict)  # over the official preset
    limit: int | None = None  # the first N prompts only (a quick look)
    rank: int = 0
    world: int = 1

    def settings(self) -> dict[str, Any]:
        return PRESET | self.knobs


def read_metadata(path: Path) -> list[dict[str, Any] | str]:
    """Each line of a GenEval metadata file: its object, or why it cannot be used (a string)."""
    rows: list[dict[str, Any] | str] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            rows.append(f"line {number}: not JSON ({e})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            rows.append(f"line {number}: no 'prompt' text")
            continue
        rows.append(row)
    return rows


def run_geneval(pipe, job: GenEvalJob, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate every picture this rank owns that is not there yet (see the module doc); the counts."""
    rows = read_metadata(job.metadata_file)
    if job.limit is not None:
        rows = rows[:job.limit]
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if job.n_samples % job.batch_size:
        raise BagelInputError(f"--n-samples {job.n_samples} is not a multiple of --batch-size {job.batch_size}")
    mine = rank_range(len(rows), job.rank, job.world)
    settings = job.settings()
    counts = {"prompts": len(mine), "generated": 0, "skipped": 0, "failed": 0}
    for done, index in enumerate(mine, 1):
        row = rows[index]
        folder = out / f"{index:05d}"
        samples = folder / "samples"
        names = [samples / f"{k:05d}.png" for k in range(job.n_samples)]
        if isinstance(row, str):
            record_bad(out, job.rank, index, row)
            counts["failed"] += 1
        elif all(p.exists() for p in names):
            counts["skipped"] += 1
        else:
            samples.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / "metadata.jsonl", json.dumps(row).encode())
            try:
                for start in range(0, job.n_samples, job.batch_size):
                    ks = [k for k in range(start, start + job.batch_size) if not names[k].exists()]
                    if not ks:
                        continue
                    outs = pipe.generate([row["prompt"]] * len(ks), seed=[job.seed + job.n_samples * index + k for k in ks],
                                         height=job.resolution, width=job.resolution, **settings)
                    for k, o in zip(ks, outs):
                        atomic_write_bytes(names[k], cropped_png(o.image))
                counts["generated"] += 1
            except (BagelInputError, ValueError) as e:
                log.warning("prompt %d failed: %s", index, e)
                record_bad(out, job.rank, index, str(e))
                counts["failed"] += 1
        if progress:
            progress(done, len(mine))
    return counts
