"""The knobs a shell user can set, one table for every front end of the command line.

Each knob has the keyword of the public API, a parser that accepts what a table cell, a JSON
value or an environment variable may hold, the tasks it applies to, the column names a batch
file may use for it, and (for diffgentor's files) its ``DG_BAGEL_*`` environment variable.

Precedence in a batch job: row column > command-line flag > ``DG_BAGEL_*`` variable > the
task's default in the public API (a knob nobody set is not passed at all).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from bagel_engine.params import RENORM_TYPES, BagelInputError

TASKS = ("t2i", "edit", "understand", "chat")
IMAGE_TASKS = ("t2i", "edit")
TEXT_TASKS = ("understand", "chat")
# The public API method behind each task.
TASK_METHODS = {"t2i": "generate", "edit": "edit", "understand": "understand", "chat": "chat"}

SEED_MODULUS = 2**31  # seeds go to torch, numpy and random alike


# ----------------------------------------------------------------------------- value parsers
def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        out = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"expected a finite number, got {value!r}")
    return out


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)  # "50.0" from a spreadsheet
        except ValueError:
            number = math.nan
        if number.is_integer():
            return int(number)
    raise ValueError(f"expected an integer, got {value!r}")


_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f"}


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def parse_interval(value: Any) -> tuple[float, float]:
    """``(lo, hi)`` from a pair, ``"0.4,1.0"``, ``"0.4 1.0"`` or ``"[0.4, 1.0]"``."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"expected two numbers LO,HI, got {value!r}") from None
        else:
            items = [p for p in text.replace(",", " ").split() if p]
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        raise ValueError(f"expected two numbers LO,HI, got {value!r}")
    lo, hi = (parse_float(x) for x in items)
    return lo, hi


def parse_renorm(value: Any) -> str:
    text = str(value).strip()
    if text not in RENORM_TYPES:
        raise ValueError(f"expected one of {', '.join(RENORM_TYPES)}, got {value!r}")
    return text


def parse_seed(value: Any) -> int:
    seed = parse_int(value)
    if not 0 <= seed < 2**32:
        raise ValueError(f"expected an integer in [0, 2**32), got {value!r}")
    return seed


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Knob:
    name: str  # keyword of the public API
    parse: Callable[[Any], Any]
    tasks: tuple[str, ...]
    aliases: tuple[str, ...] = ()  # more column names (normalized: lower case, "_" for "-" and " ")
    env: str | None = None  # diffgentor's variable


KNOBS: tuple[Knob, ...] = (
    Knob("cfg_text_scale", parse_float, IMAGE_TASKS, env="DG_BAGEL_CFG_TEXT_SCALE"),
    Knob("cfg_img_scale", parse_float, IMAGE_TASKS, env="DG_BAGEL_CFG_IMG_SCALE"),
    Knob("cfg_interval", parse_interval, IMAGE_TASKS, env="DG_BAGEL_CFG_INTERVAL"),
    Knob("cfg_renorm_type", parse_renorm, IMAGE_TASKS, env="DG_BAGEL_CFG_RENORM_TYPE"),
    Knob("cfg_renorm_min", parse_float, IMAGE_TASKS, env="DG_BAGEL_CFG_RENORM_MIN"),
    Knob("timestep_shift", parse_float, IMAGE_TASKS, env="DG_BAGEL_TIMESTEP_SHIFT"),
    Knob("num_timesteps", parse_int, IMAGE_TASKS, aliases=("steps", "num_inference_steps"),
         env="DG_BAGEL_NUM_TIMESTEPS"),
    Knob("height", parse_int, ("t2i",)),
    Knob("width", parse_int, ("t2i",)),
    Knob("think", parse_bool, TASKS, env="DG_BAGEL_THINK"),
    Knob("max_think_token_n", parse_int, IMAGE_TASKS, aliases=("max_think_tokens",)),
    # The official code uses max_think_token_n as the answer's length too.
    Knob("max_new_tokens", parse_int, TEXT_TASKS, aliases=("max_think_token_n", "max_think_tokens")),
    Knob("do_sample", parse_bool, TASKS),
    Knob("text_temperature", parse_float, TASKS, aliases=("temperature",)),
    Knob("seed", parse_seed, TASKS),
)


def knobs_for(task: str) -> tuple[Knob, ...]:
    check_task(task)
    return tuple(k for k in KNOBS if task in k.tasks)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise BagelInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def normalize_column(name: Any) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")




def parse_knob(knob: Knob, value: Any, where: str) -> Any:
    try:
        return knob.parse(value)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise BagelInputError(f"{where} {e}") from None


def row_knobs(row: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Knobs set by a row's columns (already normalized names); blank cells set nothing.

    Raises :class:`BagelInputError` naming the column when a value does not parse.
    """
    out: dict[str, Any] = {}
    for knob in knobs_for(task):
        for column in (knob.name, *knob.aliases):  # the knob's own name first, then its aliases
            value = row.get(column)
            if not _is_blank(value):
                where = f"column {column!r}:" if column == knob.name else f"column {column!r} ({knob.name}):"
                out[knob.name] = parse_knob(knob, value, where)
                break
    return out


def env_knobs(task: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Knobs set by diffgentor's ``DG_BAGEL_*`` variables (the ones that apply to ``task``)."""
    environ = os.environ if environ is None else environ
    out = {}
    for knob in knobs_for(task):
        if knob.env and not _is_blank(environ.get(knob.env)):
            out[knob.name] = parse_knob(knob, environ[knob.env], f"environment variable {knob.env}:")
    return out


def cli_knobs(values: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Keep the command-line knobs that were set (not None) and apply to ``task``.

    ``values`` uses API names; ``max_think_token_n`` given to a text task becomes ``max_new_tokens``
    (the official code uses one length for both).
    """
    values = {k: v for k, v in values.items() if v is not None}
    if task in TEXT_TASKS and "max_think_token_n" in values:
        values.setdefault("max_new_tokens", values["max_think_token_n"])
    names = {k.name for k in knobs_for(task)}
    return {k: v for k, v in values.items() if k in names}


def derive_seed(base_seed: int, row_id: str) -> int:
    """The seed of one batch row: a hash of the base seed and the row id, in ``[0, 2**31)``.

    Stable across runs, machines, ranks and Python versions, so rerunning one row gives the same output.
    """
    digest = hashlib.sha256(f"bagel-batch:{int(base_seed)}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS
