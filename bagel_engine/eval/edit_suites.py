"""ImgEdit, KRIS-Bench and RISEBench: the edits of the official scripts (ByteDance-Seed/Bagel
``eval/gen/gen_images_mp_{imgedit,kris,rise}.py``, run by ``scripts/eval/run_{imgedit,kris,rise}.sh``), written where
each benchmark's GPT judge reads them.

The three scripts share one edit function (``editing_image`` / ``editing_image_with_think``): every input image
through the VAE and then the ViT, the text-unconditional context the snapshot after the images, the
image-unconditional one the prompt alone (with think: the system prompt, the prompt and the think text), the
output at the **first** image's resized size (``size_from=0``; the app takes the last), cfg_text 4 and cfg_img 1.5
(the scripts' argparse defaults), interval [0, 1], shift 3, 50 timesteps, renorm_min 0 with the ``text_channel``
renorm; think text sampled at temperature 0.3, at most 2,048 tokens, saved beside the picture as ``.txt``. Each
picture is cropped to its bounding box. ``run_kris.sh`` and ``run_rise.sh`` pass ``--think``; ``run_imgedit.sh``
does not. Prompts are split into contiguous ranges, one per rank; a picture that exists is skipped.

What differs by benchmark is the metadata and the layout:

- ImgEdit (``Benchmark/singleturn/singleturn.json``): a JSON object ``{key: {"id": image path, "prompt": ...}}``,
  images under the metadata's folder; output ``OUT/{key}.png``.
- KRIS (``kris/final_data.json``): a JSON list of ``{"type", "id", "ori_img": path or [paths], "ins_en"}``, images in
  ``KRIS_Bench/{type}/`` beside the metadata; output ``OUT/{type}/{id}.png``.
- RISE (``rise/data/datav2_total_w_subtask.json``): a JSON list of ``{"index", "category", "image", "instruction"}``,
  images under the metadata's folder; output ``OUT/{category}/{index}.png``.

``--images DIR`` sets the image root when the benchmark is kept elsewhere. Where this differs from the scripts:
item i (its place in the metadata) has seed ``seed + i`` (the scripts seed one global generator once with 42);
writes are atomic (the ``.txt`` first); a bad item (no prompt, a missing or unreadable picture, an unusable name)
is recorded in ``OUT/bad_rows.jsonl`` and the run goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bagel_engine.batch.manifest import atomic_write_bytes
from bagel_engine.eval.common import cropped_png, rank_range, run_items
from bagel_engine.params import BagelInputError
from bagel_engine.runtime.image_transforms import check_image


PRESET: dict[str, Any] = {"cfg_text_scale": 4.0, "cfg_img_scale": 1.5, "cfg_interval": (0.0, 1.0),
                          "timestep_shift": 3.0, "num_timesteps": 50, "cfg_renorm_min": 0.0,
                          "cfg_renorm_type": "text_channel", "do_sample": True, "text_temperature": 0.3,
                          "max_think_token_n": 2048}
SEED = 42


@dataclass(frozen=True)
class EditItem:
    images: tuple[Path, ...]
    prompt: str
    name: str  # the output's path under OUT, without ".png"


@dataclass(frozen=True)
class EditSuite:
    name: str
    think: bool  # what the official shell script passes
    reader: Callable[[Any, Path], list[EditItem | str]]  # (the metadata's JSON, the image root) -> items
    image_root: Callable[[Path], Path]  # the metadata file -> where the scripts look for its images
    scorer: str


def _text(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _name(*parts) -> str | None:
    """An output name made of metadata values, or None when a part could leave the output folder."""
    texts = [str(p) for p in parts]
    if any(not t.strip() or "/" in t or "\\" in t or t.startswith(".") for t in texts):
        return None
    return "/".join(texts)


def _imgedit(data, root: Path) -> list[EditItem | str]:
    if not isinstance(data, dict):
        raise BagelInputError("ImgEdit's metadata is a JSON object {key: {'id': image, 'prompt': ...}}")
    items: list[EditItem | str] = []
    for key, entry in data.items():
        if not isinstance(entry, dict) or not _text(entry.get("prompt")) or not _text(entry.get("id")):
            items.append(f"{key}: no 'prompt' or no 'id' (the image)")
        elif _name(key) is None:
            items.append(f"{key}: not usable as a file name")
        else:
            items.append(EditItem((root / entry["id"],), entry["prompt"], _name(key)))
    return items


def _kris(data, root: Path) -> list[EditItem | str]:
    if not isinstance(data, list):
        raise BagelInputError("KRIS's metadata is a JSON list of {'type', 'id', 'ori_img', 'ins_en'}")
    items: list[EditItem | str] = []
    for number, entry in enumerate(data):
        entry = entry if isinstance(entry, dict) else {}
        pictures = entry.get("ori_img")
        pictures = [pictures] if isinstance(pictures, str) else pictures if isinstance(pictures, list) else None
        name = _name(entry.get("type", ""), entry.get("id", ""))
        if not _text(entry.get("ins_en")) or not pictures or not all(_text(p) for p in pictures):
            items.append(f"entry {number}: no 'ins_en' or no 'ori_img'")
        elif name is None:
            items.append(f"entry {number}: 'type' / 'id' not usable as a path")
        else:
            items.append(EditItem(tuple(root / entry["type"] / p for p in pictures), entry["ins_en"], name))
    return items


def _rise(data, root: Path) -> list[EditItem | str]:
    if not isinstance(data, list):
        raise BagelInputError("RISE's metadata is a JSON list of {'index', 'category', 'image', 'instruction'}")
    items: list[EditItem | str] = []
    for number, entry in enumerate(data):
        entry = entry if isinstance(entry, dict) else {}
        name = _name(entry.get("category", ""), entry.get("index", ""))
        if not _text(entry.get("instruction")) or not _text(entry.get("image")):
            items.append(f"entry {number}: no 'instruction' or no 'image'")
        elif name is None:
            items.append(f"entry {number}: 'category' / 'index' not usable as a path")
        else:
            items.append(EditItem((root / entry["image"],), entry["instruction"], name))
    return items


SUITES: dict[str, EditSuite] = {
    "imgedit": EditSuite("imgedit", False, _imgedit, lambda meta: meta.parent,
                         "score with ImgEdit's GPT-4o judge (the official repository's eval/gen/imgedit, as run_imgedit.sh):\n"
                         "  python eval/gen/imgedit/basic_bench.py --result_img_folder {out} --edit_json {meta} "
                         "--origin_img_root {root} --num_processes 4 --prompts_json {root}/judge_prompt.json\n"
                         "  python eval/gen/imgedit/step1_get_avgscore.py --result_json {out}/result.json "
                         "--average_score_json {out}/average_score.json\n"
                         "  python eval/gen/imgedit/step2_typescore.py --average_score_json {out}/average_score.json "
                         "--edit_json {meta} --typescore_json {out}/typescore.json"),
    "kris": EditSuite("kris", True, _kris, lambda meta: meta.parent / "KRIS_Bench",
                      "score with KRIS-Bench's GPT-4o judge (the official repository's eval/gen/kris, as run_kris.sh; "
                      "it reads {out_parent}):\n"
                      "  for m in common knowledge multi_element temporal_prediction view_change; do\n"
                      "    python eval/gen/kris/metrics_$m.py --results_dir {out_parent} --max_workers 8; done\n"
                      "  python eval/gen/kris/summarize.py --results_dir {out_parent}"),
    "rise": EditSuite("rise", True, _rise, lambda meta: meta.parent,
                      "score with RISEBench's GPT-4.1 judge (the official repository's eval/gen/rise, as run_rise.sh):\n"
                      "  python eval/gen/rise/gpt_eval.py --data {meta} --input {root} --output {out}"),
}


@dataclass
class EditSuiteJob:
    suite: str
    metadata_file: Path
    out_dir: Path
    images: Path | None = None  # the image root (None: where the official script looks, beside the metadata)
    think: bool | None = None  # None: as the official shell script runs it
    seed: int = SEED
    knobs: dict[str, Any] = field(default_factory=dict)  # over the official preset
    limit: int | None = None
    rank: int = 0
    world: int = 1

    @property
    def spec(self) -> EditSuite:
        try:
            return SUITES[self.suite]
        except KeyError:
            raise BagelInputError(f"no edit suite {self.suite!r} (there are {', '.join(SUITES)})") from None

    @property
    def image_root(self) -> Path:
        return Path(self.images) if self.images is not None else self.spec.image_root(Path(self.metadata_file))

    @property
    def thinks(self) -> bool:
        return self.spec.think if self.think is None else self.think

    def settings(self) -> dict[str, Any]:
        return PRESET | self.knobs

    def scorer_help(self) -> str:
        out = Path(self.out_dir)
        return self.spec.scorer.format(out=out, out_parent=out.parent, meta=self.metadata_file, root=self.image_root)


def read_items(job: EditSuiteJob) -> list[EditItem | str]:
    try:
        data = json.loads(Path(job.metadata_file).read_text(encoding="utf-8"))
    except ValueError as e:
        raise BagelInputError(f"{job.metadata_file}: not JSON ({e})") from None
    return job.spec.reader(data, job.image_root)


def run_edit_suite(pipe, job: EditSuiteJob, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Make every edit this rank owns that is not there yet (see the module doc); the counts."""
    items = read_items(job)
    if job.limit is not None:
        items = items[:job.limit]
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings, think = job.settings(), job.thinks
    def make(index: int, item: EditItem) -> None:
        pictures = [check_image(p) for p in item.images]  # BagelInputError names the file
        result = pipe.edit(pictures, item.prompt, seed=job.seed + index, think=think, think_contexts="eval",
                           size_from=0, **settings)
        (out / item.name).parent.mkdir(parents=True, exist_ok=True)
        if think:
            atomic_write_bytes(out / f"{item.name}.txt", (result.text or "").encode("utf-8"))
        atomic_write_bytes(out / f"{item.name}.png", cropped_png(result.image))

    return run_items(items, rank_range(len(items), job.rank, job.world), out, job.rank,
                     lambda item: (out / f"{item.name}.png").exists(), make, progress)
