"""From a batch row to one call of the public API.

Two stages. :func:`plan_rows` gives every row its id (the manifest key), its output file name and
any error that makes it fail before the model sees it (a line that did not parse, a duplicated
id); it is cheap and runs for all rows before anything else, so resume can decide what is done.
:func:`build_call` then reads the row's prompt, input images and knobs when the row's turn comes;
whatever is wrong with them raises :class:`BagelInputError` and the row fails with that message.

Column names (case and ``-``/``_`` do not matter):

- prompt: ``prompt`` or ``instruction`` (or ``question``), or the column named by ``--prompt-column``
- input images: ``image`` / ``image_url`` / ``image_path`` with optional ``_2``, ``_3``... suffixes, and
  ``input_images`` / ``images`` (a JSON list, a comma list or one value; in Parquet a list or bytes).
  A value is a path (relative to the input file's folder), a ``file://``, ``http(s)://`` or
  ``data:`` URL, raw bytes, or ``{"bytes": ..., "path": ...}`` (the Hugging Face datasets layout).
- ``id`` (output ``{id}.png``) or ``index`` (output ``{index:06d}.png``); neither: the row's position.
- any knob (see :mod:`bagel_engine.knobs`) overriding the command line for that row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bagel_engine import image_input
from bagel_engine import knobs as knob_table
from bagel_engine.batch.reader import Row
from bagel_engine.params import BagelInputError

PROMPT_COLUMNS = ("prompt", "instruction", "question")
LIST_IMAGE_COLUMNS = ("input_images", "images")
_IMAGE_COLUMN = re.compile(r"^(image|image_url|image_path|input_image)(?:_(\d+))?$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Plan:
    row: Row
    key: str  # the row id: manifest key, seed input, output name
    output: str | None  # output file name (image tasks)
    error: str | None = None  # the row fails with this before reaching the model


@dataclass
class Call:
    method: str  # a BagelPipeline method
    args: tuple
    kwargs: dict[str, Any]
    seed: int
    prompt: str
    inputs: list[str] = field(default_factory=list)  # what the input images were, for the manifest


def _id_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _file_stem(key: str) -> str:
    stem = _UNSAFE.sub("_", key).strip("._") or "row"
    return stem[:150]


def knob_cells(data: dict[str, Any], task: str) -> dict[str, Any]:
    """The row's cells that set a knob of ``task`` (by its name or an alias), as written: what a row that
    fails before its knobs parse asked for."""
    out = {}
    for column, value in data.items():
        knob, _ = knob_table.lookup(column, task)
        if knob is not None and not knob.api_only and not knob_table.is_blank(value) and isinstance(
                value, (str, int, float, bool)):
            out[column] = value
    return out


def unknown_knob_columns(rows: list[Row], task: str) -> list[str]:
    """Warnings for the columns that look like knobs but set nothing: a misspelt name
    (``cfg_text_scal``: did you mean ``cfg_text_scale``?) or a knob of another task. Other unknown columns
    (``category``, notes) are carried silently, as diffgentor does."""
    columns: dict[str, None] = {}
    for row in rows:
        if not row.error:
            columns.update(dict.fromkeys(row.data))
    warnings = []
    for column in columns:
        if column in PROMPT_COLUMNS or column in LIST_IMAGE_COLUMNS or _IMAGE_COLUMN.match(column):
            continue
        knob, _ = knob_table.lookup(column, task)
        if knob is not None:
            continue
        other, _ = knob_table.lookup(column, None)
        if other is not None:
            warnings.append(f"column {column!r} sets {other.name}, which applies to "
                            f"{', '.join(other.tasks)}, not {task}: ignored")
            continue
        hint = knob_table.did_you_mean(column)
        if hint:
            warnings.append(f"column {column!r} is not a knob and is ignored{hint}")
    return warnings


OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def output_name(value: Any, column: str) -> str:
    """A row's own output name (diffgentor's ``--output_name_column``): a relative path inside the output
    folder, sub-folders allowed; its suffix (.png, .jpg, .jpeg, .webp) chooses the format, none means .png."""
    text = str(value).strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or not parts or ".." in parts:
        raise BagelInputError(f"column {column!r}: {value!r} is not a relative path inside the output folder")
    if any(p.startswith(".") for p in parts):
        raise BagelInputError(f"column {column!r}: {value!r} names a hidden file or folder")
    suffix = Path(parts[-1]).suffix.lower()
    if suffix and suffix not in OUTPUT_SUFFIXES:
        if suffix[1:].isalpha() and len(suffix) <= 5:
            raise BagelInputError(f"column {column!r}: {value!r} ends in {suffix}; use {', '.join(OUTPUT_SUFFIXES)} "
                                  "(or no suffix for .png)")
        suffix = ""  # "v1.2": a dot in the name, not a suffix
    if not suffix:
        parts[-1] += ".png"
    return "/".join(parts)


def plan_rows(rows: list[Row], task: str, id_column: str | None = None,
              output_column: str | None = None) -> list[Plan]:
    """Ids, output names and row-level errors for all rows, in input order. ``output_column``: a column
    naming each row's output file (sub-folders and suffix included); rows that leave it blank get the
    default name."""
    knob_table.check_task(task)
    id_col = knob_table.normalize_column(id_column) if id_column else "id"
    out_col = knob_table.normalize_column(output_column) if output_column else None
    image_task = task in knob_table.IMAGE_TASKS
    plans: list[Plan] = []
    seen_keys: dict[str, int] = {}
    seen_outputs: dict[str, int] = {}
    for row in rows:
        error = row.error
        raw_id = None if row.error else row.get(id_col)
        raw_index = None if row.error or raw_id is not None else row.get("index")
        if raw_id is not None:
            key = _id_text(raw_id)
            output = f"{_file_stem(key)}.png"
        elif raw_index is not None:
            try:
                index = knob_table.parse_int(raw_index)
                key, output = str(index), f"{index:06d}.png"
            except ValueError:
                key, output = f"row{row.position}", f"row{row.position:06d}.png"
                error = f"column 'index': expected an integer, got {raw_index!r}"
        else:
            key, output = str(row.position), f"{row.position:06d}.png"
        own_name = None if row.error or out_col is None else row.get(out_col)
        if own_name is not None and image_task:
            try:
                output = output_name(own_name, out_col)
            except BagelInputError as e:
                error = error or str(e)
        if key in seen_keys:
            error = error or f"duplicate id {key!r} (first used by input row {seen_keys[key]})"
            key = f"{key}@row{row.position}"
            output = f"{_file_stem(key)}.png"
        elif image_task and output in seen_outputs:
            error = error or (f"output name {output} is already used by input row {seen_outputs[output]} "
                              "(ids that differ only in characters unsafe in file names)")
            key = f"{key}@row{row.position}"
            output = f"{_file_stem(key)}.png"
        seen_keys[key] = row.position
        seen_outputs[output] = row.position
        plans.append(Plan(row, key, output if image_task else None, error))
    return plans


# ----------------------------------------------------------------------------- prompt and images
def row_prompt(row: Row, prompt_column: str | None = None) -> str:
    columns = (knob_table.normalize_column(prompt_column),) if prompt_column else PROMPT_COLUMNS
    for column in columns:
        value = row.get(column)
        if value is not None:
            text = value if isinstance(value, str) else str(value)
            if text.strip():
                return text
    present = [c for c in columns if c in row.data]
    if present:
        raise BagelInputError(f"empty prompt (column {present[0]!r})")
    raise BagelInputError(
        f"no prompt: the row has no column {' / '.join(columns)} (columns: {', '.join(sorted(row.data)) or 'none'}); "
        "name one of those or pass --prompt-column")


def image_values(row: Row) -> list[tuple[str, Any]]:
    """``(column, value)`` for every input image of the row, in order: ``image``, ``image_2``, ...,
    then ``input_images`` entries."""
    numbered = []
    for column in row.data:
        m = _IMAGE_COLUMN.match(column)
        if m:
            numbered.append((int(m.group(2) or 1), column))
    out: list[tuple[str, Any]] = []
    for _, column in sorted(numbered):
        out += [(column, v) for v in _split(row.get(column), comma=False)]
    for column in LIST_IMAGE_COLUMNS:
        out += [(column, v) for v in _split(row.get(column), comma=True)]
    return out


def _split(value: Any, comma: bool) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None and not (isinstance(v, str) and not v.strip())]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise BagelInputError(f"image list {text[:80]!r} is not a valid JSON list") from None
            return _split(items if isinstance(items, list) else [items], comma)
        if comma and "," in text and not text.startswith("data:"):
            return [p.strip() for p in text.split(",") if p.strip()]
        return [text]
    return [value]


def load_image(value: Any, base_dir: Path, label: str) -> tuple[Image.Image, str]:
    """A fully decoded image (paths relative to ``base_dir``) and its short description, or
    :class:`BagelInputError` saying which image and why (``bagel_engine.image_input``'s rules)."""
    description = image_input.describe(value)
    what = f"{label} {description!r}"
    return image_input.read_image(value, image_input.TRUSTED.relative_to(base_dir), what), description


# ----------------------------------------------------------------------------- the call
def build_call(plan: Plan, task: str, base_knobs: dict[str, Any], base_seed: int,
               prompt_column: str | None = None) -> Call:
    """The API call for one row. ``base_knobs``: the variables and flags already merged (no seed)."""
    if plan.error:
        raise BagelInputError(plan.error)
    row = plan.row
    prompt = row_prompt(row, prompt_column)
    knobs = {**base_knobs, **knob_table.row_knobs(row.data, task)}
    seed = knobs.pop("seed", None)
    if seed is None:
        seed = knob_table.derive_seed(base_seed, plan.key)

    images, inputs = [], []
    if task in ("edit", "understand"):
        values = image_values(row)
        if not values:
            raise BagelInputError(
                "no input image: give a column image / image_url (image_url_2, ...) or input_images")
        for i, (column, value) in enumerate(values, start=1):
            image, description = load_image(value, row.source.parent, f"image {i} (column {column})")
            images.append(image)
            inputs.append(description)

    method = knob_table.TASK_METHODS[task]
    if task == "t2i":
        args: tuple = (prompt,)
    elif task == "edit":
        args = (images, prompt)
    elif task == "understand":
        args = (images, prompt)
    else:
        args = (prompt,)
    return Call(method, args, {**knobs, "seed": seed}, seed, prompt, inputs)
