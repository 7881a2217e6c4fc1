"""The knobs users set, one table for every front end: the public API's keywords, the CLI's options,
the server's fields and the batch files' columns.

Each knob has the keyword of the public API (the official name), a parser that accepts what a table
cell, a JSON value or an environment variable may hold, the tasks it applies to, the other names users
carry over from diffusers, vllm-omni and OpenAI clients (each alias with the conversion it needs:
diffusers' ``num_inference_steps`` counts denoising steps, BAGEL's ``num_timesteps`` counts the points
of the schedule, one more), and (for diffgentor's files) its ``DG_BAGEL_*`` environment variable.
:func:`canonical` turns any mix of names and aliases into the official names; giving a knob under two
names is an error.

Precedence in a batch job: row column > command-line flag > ``DG_BAGEL_*`` variable > the
task's default in the public API (a knob nobody set is not passed at all).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from bagel_engine.params import RENORM_TYPES, BagelInputError

TASKS = ("t2i", "edit", "understand", "chat")
IMAGE_TASKS = ("t2i", "edit")
TEXT_TASKS = ("understand", "chat")
# The public API method behind each task.
TASK_METHODS = {"t2i": "generate", "edit": "edit", "understand": "understand", "chat": "chat"}

SEED_MODULUS = 2**31  # seeds go to torch, numpy and random alike


# ----------------------------------------------------------------------------- value parsers
def is_blank(value: Any) -> bool:
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
def parse_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _same(value: Any) -> Any:
    return value


def _steps_to_timesteps(steps: Any) -> int:
    """diffusers' ``num_inference_steps`` (denoising steps) as BAGEL's ``num_timesteps`` (schedule points)."""
    n = parse_int(steps)
    if n < 1:
        raise ValueError(f"expected an integer >= 1, got {steps!r}")
    return n + 1


@dataclass(frozen=True)
class Alias:
    """Another name of a knob; ``convert`` maps the alias's value to the knob's (after parsing)."""

    name: str
    convert: Callable[[Any], Any] = _same
    note: str = ""  # where the name comes from, or how it converts (docs and --help)


@dataclass(frozen=True)
class Knob:
    name: str  # keyword of the public API
    parse: Callable[[Any], Any]
    tasks: tuple[str, ...]
    aliases: tuple[Alias, ...] = ()  # other names (normalized: lower case, "_" for "-" and " ")
    env: str | None = None  # diffgentor's variable
    api_only: bool = False  # a Python object (a tensor, a generator): not a column, option or JSON field


KNOBS: tuple[Knob, ...] = (
    Knob("cfg_text_scale", parse_float, IMAGE_TASKS, env="DG_BAGEL_CFG_TEXT_SCALE",
         aliases=(Alias("guidance_scale", note="diffusers, vllm-omni"),)),
    Knob("cfg_img_scale", parse_float, IMAGE_TASKS, env="DG_BAGEL_CFG_IMG_SCALE",
         aliases=(Alias("image_guidance_scale", note="diffusers"),)),
    Knob("cfg_interval", parse_interval, IMAGE_TASKS, env="DG_BAGEL_CFG_INTERVAL"),
    Knob("cfg_renorm_type", parse_renorm, IMAGE_TASKS, env="DG_BAGEL_CFG_RENORM_TYPE"),
    Knob("cfg_renorm_min", parse_float, IMAGE_TASKS, env="DG_BAGEL_CFG_RENORM_MIN"),
    Knob("timestep_shift", parse_float, IMAGE_TASKS, env="DG_BAGEL_TIMESTEP_SHIFT"),
    Knob("num_timesteps", parse_int, IMAGE_TASKS, env="DG_BAGEL_NUM_TIMESTEPS",
         aliases=(Alias("steps"),
                  Alias("num_inference_steps", _steps_to_timesteps,
                        "diffusers: denoising steps; num_timesteps = num_inference_steps + 1"))),
    Knob("negative_prompt", parse_text, IMAGE_TASKS),
    Knob("height", parse_int, ("t2i",)),
    Knob("width", parse_int, ("t2i",)),
    Knob("think", parse_bool, TASKS, env="DG_BAGEL_THINK"),
    Knob("max_think_token_n", parse_int, IMAGE_TASKS, aliases=(Alias("max_think_tokens"),),
         env="DG_BAGEL_MAX_THINK_TOKEN_N"),
    # The official code uses max_think_token_n as the answer's length too.
    Knob("max_new_tokens", parse_int, TEXT_TASKS, aliases=(Alias("max_think_token_n"), Alias("max_think_tokens")),
         env="DG_BAGEL_MAX_THINK_TOKEN_N"),
    Knob("do_sample", parse_bool, TASKS),
    Knob("text_temperature", parse_float, TASKS, aliases=(Alias("temperature", note="OpenAI, transformers"),)),
    Knob("seed", parse_seed, TASKS),
    Knob("num_images_per_prompt", parse_int, IMAGE_TASKS, api_only=True),
    Knob("noise", _same, IMAGE_TASKS, aliases=(Alias("latents", note="diffusers"),), api_only=True),
    Knob("generator", _same, IMAGE_TASKS, api_only=True),
)

# Every name a knob may be given under: the knob's own, then each alias.
NAMES: dict[str, tuple[Knob, Alias | None]] = {k.name: (k, None) for k in KNOBS}
for _knob in KNOBS:
    for _alias in _knob.aliases:
        NAMES.setdefault(_alias.name, (_knob, _alias))


def canonical(values: Mapping[str, Any], task: str | None = None, where: str = "") -> dict[str, Any]:
    """``values`` with every alias replaced by its knob's name (and value converted); ``None`` values are
    left out (not set), names that are no knob's pass through (the caller's checks report them). For a
    ``task``, an alias that belongs to another task's knob is left alone (``max_think_token_n`` is the
    answer's length for questions and the think length for pictures). Raises :class:`BagelInputError`
    when one knob is given twice (a name and its alias, or two aliases)."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        if value is None:
            continue
        knob, alias = lookup(key, task)
        if knob is None:
            out[key] = value
            continue
        if knob.name in given_as:
            first = given_as[knob.name]
            raise BagelInputError(f"{where}{knob.name} is given twice, as {first!r} and as {key!r}: give one")
        given_as[knob.name] = key
        if alias is not None and alias.convert is not _same:
            try:
                value = alias.convert(value)
            except (TypeError, ValueError) as e:
                raise BagelInputError(f"{where}{key}: {e}") from None
        out[knob.name] = value
    return out


def lookup(name: str, task: str | None) -> tuple[Knob | None, Alias | None]:
    """The knob ``name`` sets (by its own name or an alias) and the alias used; ``(None, None)`` if none.
    With a ``task``, only that task's knobs count."""
    if task is None:
        return NAMES.get(name, (None, None))
    for knob in KNOBS:
        if task in knob.tasks:
            if knob.name == name:
                return knob, None
            for alias in knob.aliases:
                if alias.name == name:
                    return knob, alias
    return None, None


def did_you_mean(name: str, known: Iterable[str] | None = None) -> str:
    """`` (did you mean 'cfg_text_scale'?)`` for a misspelt knob, else ``""``."""
    pool = list(known) if known is not None else list(NAMES)
    close = difflib.get_close_matches(str(name), pool, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
        if knob.api_only:
            continue
        given = None
        for alias in (None, *knob.aliases):  # the knob's own name, then its aliases
            column = knob.name if alias is None else alias.name
            value = row.get(column)
            if is_blank(value):
                continue
            if given is not None:
                raise BagelInputError(f"columns {given!r} and {column!r} both set {knob.name}: keep one")
            given = column
            where = f"column {column!r}:" if alias is None else f"column {column!r} ({knob.name}):"
            parsed = parse_knob(knob, value, where)
            if alias is not None and alias.convert is not _same:
                try:
                    parsed = alias.convert(parsed)
                except (TypeError, ValueError) as e:
                    raise BagelInputError(f"{where} {e}") from None
            out[knob.name] = parsed
    return out


def env_knobs(task: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Knobs set by diffgentor's ``DG_BAGEL_*`` variables (the ones that apply to ``task``)."""
    environ = os.environ if environ is None else environ
    out = {}
    for knob in knobs_for(task):
        if knob.env and not is_blank(environ.get(knob.env)):
            out[knob.name] = parse_knob(knob, environ[knob.env], f"environment variable {knob.env}:")
    return out


ENV_PREFIX = "DG_BAGEL_"
ENV_NAMES = tuple(dict.fromkeys(k.env for k in KNOBS if k.env))


def env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per ``DG_BAGEL_*`` variable that sets nothing (a typo, or one diffgentor never had)."""
    environ = os.environ if environ is None else environ
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in ENV_NAMES:
            close = difflib.get_close_matches(name, ENV_NAMES, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(ENV_NAMES)}"
            out.append(f"environment variable {name} is not one bagel reads and is ignored{hint}")
    return out


# Defaults of other tools, for files and scripts made for them. diffgentor calls the official
# InterleaveInferencer with its own defaults (diffgentor/backends/editing/bagel.py), the same for every task.
_DIFFGENTOR_IMAGE = {"cfg_text_scale": 3.0, "cfg_img_scale": 1.5, "cfg_interval": (0.4, 1.0),
                     "cfg_renorm_type": "global", "cfg_renorm_min": 0.0, "timestep_shift": 3.0, "num_timesteps": 50}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "official": {},  # the official app's defaults per task (the model's task_defaults.json where it has one)
    "diffgentor": {"t2i": _DIFFGENTOR_IMAGE, "edit": _DIFFGENTOR_IMAGE},
}


def resolve_preset(preset: str, environ: Mapping[str, str] | None = None) -> str:
    """``auto`` is ``diffgentor`` when a ``DG_BAGEL_*`` variable is set (a diffgentor script), else ``official``."""
    if preset == "auto":
        environ = os.environ if environ is None else environ
        return "diffgentor" if any(n.startswith(ENV_PREFIX) for n in environ) else "official"
    if preset not in PRESETS:
        raise BagelInputError(f"unknown preset {preset!r}; choose one of auto, {', '.join(PRESETS)}")
    return preset


def preset_knobs(preset: str, task: str) -> dict[str, Any]:
    return dict(PRESETS[preset].get(check_task(task), {}))


def cli_knobs(values: Mapping[str, Any], task: str) -> dict[str, Any]:
    """Keep the command-line knobs that were set (not None) and apply to ``task``.

    ``values`` uses API names; ``max_think_token_n`` given to a text task becomes ``max_new_tokens``
    (the official code uses one length for both).
    """
    values = canonical(values, task)
    names = {k.name for k in knobs_for(task) if not k.api_only}
    return {k: v for k, v in values.items() if k in names}


def derive_seed(base_seed: int, row_id: str) -> int:
    """The seed of one batch row: a hash of the base seed and the row id, in ``[0, 2**31)``.

    Stable across runs, machines, ranks and Python versions, so rerunning one row gives the same output.
    """
    digest = hashlib.sha256(f"bagel-batch:{int(base_seed)}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS
