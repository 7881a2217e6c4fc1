"""WISE's generation as the official script does it (ByteDance-Seed/Bagel ``eval/gen/gen_images_mp_wise.py``,
run by ``scripts/eval/run_wise.sh``), written where WISE's GPT scorer (``eval/gen/wise/gpt_eval_mp.py``) reads it.

The official run: ``final_data.json`` (a JSON list of ``{"prompt_id": ..., "Prompt": ..., ...}``, 1,000 prompts)
gets one picture per prompt at 1024x1024, text guidance only (cfg 4, no image branch), interval [0.4, 1.0],
shift 3, 50 timesteps, renorm_min 0 (global renorm), cropped to its bounding box and saved as
``OUT/{prompt_id}.png``. ``run_wise.sh`` passes ``--think``: the planning system prompt, then the prompt, then
think text sampled at temperature 0.3 (at most 2,048 tokens) is appended to the context and saved as
``OUT/{prompt_id}.txt``; the text-unconditional branch of the guidance holds no context at all (not the system
prompt, as the app's think mode has it): ``think_contexts="eval"``. The script's ``simple_think`` (only the
text after ``</think>`` conditions the picture, and is what the ``.txt`` holds) is ``--simple-think`` here;
the official run leaves it off. Prompts are split into contiguous ranges, one per rank; a prompt whose picture
exists is skipped.

Where this differs, and why: the official script seeds one global generator once (42), so a picture depends on
every draw before it; here prompt ``i`` (its place in the file) has seed ``seed + i``, whatever the ranks and
resumes. The ``.txt`` is written before the picture, each atomically, so a picture on disk always has its think
text. A bad entry is recorded in ``OUT/bad_rows.jsonl`` and the run goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bagel_engine.batch.manifest import atomic_write_bytes
from bagel_engine.eval.common import cropped_png, rank_range, run_items
from bagel_engine.params import BagelInputError
from bagel_engine.think_text import simple_think


# main() of gen_images_mp_wise.py (its functions' defaults, [0, 1] and shift 4, are overridden there)
PRESET: dict[str, Any] = {"cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.4, 1.0),
                          "timestep_shift": 3.0, "num_timesteps": 50, "cfg_renorm_min": 0.0, "cfg_renorm_type": "global",
                          "do_sample": True, "text_temperature": 0.3, "max_think_token_n": 2048}
RESOLUTION, SEED = 1024, 42
SCORER_HELP = (
    "score with WISE's GPT-4o judge (the official BAGEL repository's eval/gen/wise, OPENAI_API_KEY set):\n"
    "  for f in cultural_common_sense spatio-temporal_reasoning natural_science; do\n"
    "    python eval/gen/wise/gpt_eval_mp.py --json_path eval/gen/wise/data/$f.json --image_dir {out} "
    "--output_dir {out}-scores; done\n"
    "  python eval/gen/wise/cal_score.py --output_dir {out}-scores")


@dataclass
class WiseJob:
    metadata_file: Path
    out_dir: Path
    think: bool = True  # run_wise.sh passes --think
    simple_think: bool = False
    resolution: int = RESOLUTION
    seed: int = SEED
    knobs: dict[str, Any] = field(default_factory=dict)  # over the official preset
    limit: int | None = None
    rank: int = 0
    world: int = 1

    def settings(self) -> dict[str, Any]:
        return PRESET | self.knobs


def read_prompts(path: Path) -> list[dict[str, Any] | str]:
    """Each entry of a WISE metadata file (a JSON list): the entry, or why it cannot be used (a string)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:
        raise BagelInputError(f"{path}: not JSON ({e}); WISE's metadata is a JSON list such as final_data.json") from None
    if not isinstance(data, list):
        raise BagelInputError(f"{path}: a JSON list of {{'prompt_id', 'Prompt'}} entries expected, got {type(data).__name__}")
    rows: list[dict[str, Any] | str] = []
    seen: set[str] = set()
    for number, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("Prompt"), str) or not row["Prompt"].strip():
            rows.append(f"entry {number}: no 'Prompt' text")
        elif "prompt_id" not in row or not str(row["prompt_id"]).strip() or "/" in str(row["prompt_id"]):
            rows.append(f"entry {number}: no usable 'prompt_id' (the picture's file name)")
        elif str(row["prompt_id"]) in seen:
            rows.append(f"entry {number}: prompt_id {row['prompt_id']} repeated (its picture would overwrite another)")
        else:
            seen.add(str(row["prompt_id"]))
            rows.append(row)
    return rows


def run_wise(pipe, job: WiseJob, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate every picture this rank owns that is not there yet (see the module doc); the counts."""
    rows = read_prompts(job.metadata_file)
    if job.limit is not None:
        rows = rows[:job.limit]
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = job.settings()

    def make(index: int, row: dict) -> None:
        result = pipe.generate(row["Prompt"], seed=job.seed + index, height=job.resolution, width=job.resolution,
                               think=job.think, think_contexts="eval", simple_think=job.simple_think, **settings)
        if job.think:  # the text that conditioned the picture, as the official .txt holds it
            text = simple_think(result.text or "") if job.simple_think else (result.text or "")
            atomic_write_bytes(out / f"{row['prompt_id']}.txt", text.encode("utf-8"))
        atomic_write_bytes(out / f"{row['prompt_id']}.png", cropped_png(result.image))

    return run_items(rows, rank_range(len(rows), job.rank, job.world), out, job.rank,
                     lambda row: (out / f"{row['prompt_id']}.png").exists(), make, progress)
