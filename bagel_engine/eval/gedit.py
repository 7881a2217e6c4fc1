"""GEdit-Bench's generation as the official script does it (ByteDance-Seed/Bagel ``eval/gen/gedit/gen_images_gedit.py``,
run by ``scripts/eval/run_gedit.sh``), written where its VIEScore judge (``test_gedit_score.py``) reads it.

The official run: every row of the ``stepfun-ai/GEdit-Bench`` dataset (its ``train`` split: ``key``,
``task_type``, ``instruction_language``, ``instruction``, ``input_image``; 606 instructions in English and
Chinese each) is edited once, seed 42 set before each edit, with cfg_text 4, cfg_img 1.5 (``main()``'s
defaults), interval [0.4, 1.0], renorm_min 0 with the ``text_channel`` renorm, shift 3, 50 timesteps, the input
through the VAE transform (1024 / 512 / 16, the output at that size) and the ViT (``use_vit=True``): the app's
edit contexts. The input is saved as ``OUT/fullset/{task_type}/{language}/{key}_SRCIMG.png`` beside the edit
``{key}.png`` (not cropped); a row whose two files exist is skipped. The shards are interleaved (row i to
shard i mod n). ``--use_think`` (off in ``run_gedit.sh``) plans first: the planning system prompt, think text
sampled at temperature 0.3, at most 10,240 tokens, which joins the image-unconditional context too
(``think_contexts="eval"``). The script's ``cfg_type`` is passed to ``generate_image`` and unused there.

The data come from a hub id (the dataset's parquet files, through the hub client: ``HF_HUB_OFFLINE`` and the
cache are honoured) or a local parquet file or folder of them, in the dataset's own columns (an image column
holds ``{"bytes", "path"}`` as ``datasets`` writes it); the ``datasets`` package is not needed. Rows are read in
the dataset's order (its parquet files sorted by name), so row indexes, shards and seeds are the official ones.
The edit is written atomically before the source picture, so a row is done only when both exist. A row that
cannot be used (no instruction, an unreadable image) is recorded in ``OUT/bad_rows.jsonl`` and the run goes on.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bagel_engine.batch.manifest import atomic_write_bytes
from bagel_engine.eval.common import record_bad
from bagel_engine.params import BagelInputError
from bagel_engine.runtime.image_transforms import check_image

log = logging.getLogger(__name__)

DATASET = "stepfun-ai/GEdit-Bench"
# process_dataset() as main() calls it; num_timesteps is editing_with_text_img_cfg's default
PRESET: dict[str, Any] = {"cfg_text_scale": 4.0, "cfg_img_scale": 1.5, "cfg_interval": (0.4, 1.0),
                          "timestep_shift": 3.0, "num_timesteps": 50, "cfg_renorm_min": 0.0,
                          "cfg_renorm_type": "text_channel", "do_sample": True, "text_temperature": 0.3,
                          "max_think_token_n": 10240}
SEED = 42
COLUMNS = ("key", "task_type", "instruction_language", "instruction", "input_image")
SCORER_HELP = (
    "score with GEdit's VIEScore judge (GPT-4.1 through Azure in the official repository's eval/gen/gedit):\n"
    "  cd eval/gen/gedit && python test_gedit_score.py --save_path {parent} --azure_endpoint $AZURE_ENDPOINT "
    "--gpt_keys $AZURE_OPENAI_KEY --max_workers 10\n"
    "  python calculate_statistics.py --save_path {parent} --language en\n"
    "(it reads {parent}/fullset: give -o PARENT/gen_image/... as run_gedit.sh lays it out)")


@dataclass
class GEditJob:
    data: str  # a hub dataset id, a parquet file or a folder of them
    out_dir: Path
    think: bool = False  # run_gedit.sh runs without --use_think
    seed: int = SEED
    knobs: dict[str, Any] = field(default_factory=dict)  # over the official preset
    language: str | None = None  # "en" or "cn": only those rows (None: all, as the official run)
    limit: int | None = None
    rank: int = 0
    world: int = 1
    revision: str | None = None
    cache_dir: str | None = None
    token: str | None = None

    def settings(self) -> dict[str, Any]:
        return PRESET | self.knobs


def parquet_files(data: str, revision: str | None = None, cache_dir: str | None = None,
                  token: str | None = None) -> list[Path]:
    """The dataset's parquet files in order: a file, a folder's (recursively), or a hub dataset's snapshot."""
    path = Path(data).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        if data.count("/") != 1 or data.startswith((".", "/")):
            raise BagelInputError(f"{data}: no such file or folder, and not a hub dataset id (org/name)")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = Path(snapshot_download(data, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                          token=token, allow_patterns=["*.parquet"]))
        except LocalEntryNotFoundError:
            raise BagelInputError(f"{data}: not in the hub cache and the hub cannot be reached (offline?)") from None
        except HfHubHTTPError as e:
            raise BagelInputError(f"{data}: the hub refused it ({str(e).splitlines()[0]})") from None
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise BagelInputError(f"{data}: no parquet file in {path}")
    return files


def read_rows(files: list[Path]) -> list[dict[str, Any]]:
    """The rows of GEdit's columns, the image left as it is stored (decoded when its edit is made)."""
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for f in files:
        table = pq.read_table(f)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise BagelInputError(f"{f}: not GEdit-Bench's columns (missing {', '.join(missing)})")
        rows += table.select(list(COLUMNS)).to_pylist()
    return rows


def _image(value):
    """The row's input picture, decoded (BagelInputError when there is none or it cannot be read)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, (bytes, bytearray, str)) or not value:
        raise BagelInputError("no image in input_image")
    return check_image(value)


def _problem(row: dict[str, Any]) -> str | None:
    for name in ("key", "task_type", "instruction_language"):
        value = str(row.get(name) or "")
        if not value.strip() or "/" in value or value.startswith("."):
            return f"no usable {name!r} (a part of the output path)"
    if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
        return "no 'instruction' text"
    return None


def run_gedit(pipe, job: GEditJob, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Edit every row this rank owns whose files are not there yet (see the module doc); the counts."""
    rows = read_rows(parquet_files(job.data, job.revision, job.cache_dir, job.token))
    indexes = [i for i, r in enumerate(rows) if job.language is None or r.get("instruction_language") == job.language]
    if job.limit is not None:
        indexes = indexes[:job.limit]
    mine = indexes[job.rank::job.world]  # the official interleaved shards
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = job.settings()
    counts = {"rows": len(mine), "generated": 0, "skipped": 0, "failed": 0}
    for done, index in enumerate(mine, 1):
        row = rows[index]
        problem = _problem(row)
        if problem:
            record_bad(out, job.rank, index, problem)
            counts["failed"] += 1
        else:
            folder = out / "fullset" / str(row["task_type"]) / str(row["instruction_language"])
            edited, source = folder / f"{row['key']}.png", folder / f"{row['key']}_SRCIMG.png"
            if edited.exists() and source.exists():
                counts["skipped"] += 1
            else:
                try:
                    image = _image(row["input_image"])
                    result = pipe.edit(image, row["instruction"], seed=job.seed, think=job.think,
                                       think_contexts="eval", **settings)
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(edited, _png(result.image))
                    atomic_write_bytes(source, _png(image))
                    counts["generated"] += 1
                except (BagelInputError, ValueError) as e:
                    log.warning("row %d (%s) failed: %s", index, row.get("key"), e)
                    record_bad(out, job.rank, index, str(e))
                    counts["failed"] += 1
        if progress:
            progress(done, len(mine))
    return counts


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
