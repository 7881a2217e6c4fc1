"""User-facing parameters: names and meanings of the official ``interleave_inference`` arguments,
with the defaults of each task taken from the official app."""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass
from typing import Any

RENORM_TYPES = ("global", "channel", "text_channel")


class BagelInputError(ValueError):
    """Input the engine cannot serve: the message says what is wrong and how to fix it."""


class ConfigError(ValueError):
    """A model directory's configuration is missing, unreadable or inconsistent."""


class DiskFull(OSError):
    """No space left (ENOSPC / EDQUOT) while writing results: the work stops, the file being written is
    removed, what was finished before is kept, and rerunning the same command resumes."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: OSError, what: str, then: str = "free some space and rerun the same command to resume") -> DiskFull:
    return DiskFull(e.errno, f"no space left on the device while writing {what}: {then}")


@dataclass(frozen=True)
class ImageParams:
    """Knobs of image generation (text to image and editing)."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    num_timesteps: int = 50
    enable_taylorseer: bool = False  # the official TaylorSeer step cache (faster, moves the image slightly)

    def validate(self) -> "ImageParams":
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise BagelInputError(
                f"unknown cfg_renorm_type {self.cfg_renorm_type!r}; choose one of {', '.join(RENORM_TYPES)}"
            )
        if not isinstance(self.num_timesteps, int) or isinstance(self.num_timesteps, bool) or self.num_timesteps < 2:
            raise BagelInputError(f"num_timesteps must be an integer >= 2 (got {self.num_timesteps!r})")
        try:
            lo, hi = (float(x) for x in self.cfg_interval)
        except (TypeError, ValueError):
            raise BagelInputError(f"cfg_interval must be two numbers (low, high), got {self.cfg_interval!r}") from None
        if not lo <= hi:
            raise BagelInputError(f"cfg_interval low {lo} must not exceed high {hi}")
        for name in ("cfg_text_scale", "cfg_img_scale", "timestep_shift", "cfg_renorm_min"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise BagelInputError(f"{name} must be a number (got {value!r})")
        if self.timestep_shift <= 0:
            raise BagelInputError(f"timestep_shift must be > 0 (got {self.timestep_shift})")
        if self.cfg_text_scale < 0 or self.cfg_img_scale < 0:
            raise BagelInputError("cfg scales must be >= 0")
        if not isinstance(self.enable_taylorseer, bool):
            raise BagelInputError(f"enable_taylorseer must be true or false (got {self.enable_taylorseer!r})")
        if not 0.0 <= self.cfg_renorm_min <= 1.0:
            raise BagelInputError(f"cfg_renorm_min must be in [0, 1] (got {self.cfg_renorm_min})")
        return dataclasses.replace(self, cfg_interval=(lo, hi))


@dataclass(frozen=True)
class TextParams:
    """Knobs of text decoding (answers, chat and think text).

    ``max_think_token_n`` follows the official meaning: the maximum number of decoded tokens
    *counting the start token*, so at most ``max_think_token_n - 1`` tokens are generated.
    """

    max_think_token_n: int = 1000
    do_sample: bool = False
    text_temperature: float = 0.3
    top_p: float = 1.0  # with do_sample: keep the smallest set of tokens whose probabilities reach top_p
    top_k: int = 0  # with do_sample: keep the k likeliest tokens (0: all)
    stop: tuple[str, ...] = ()  # answers end before the first of these strings (not included)

    def validate(self) -> "TextParams":
        n = self.max_think_token_n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise BagelInputError(f"max_think_token_n must be an integer >= 1 (got {n!r})")
        t = self.text_temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise BagelInputError(f"text_temperature must be a number > 0 (got {t!r})")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise BagelInputError(f"top_p must be a number in (0, 1] (got {p!r})")
        k = self.top_k
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BagelInputError(f"top_k must be an integer >= 0 (got {k!r})")
        return dataclasses.replace(self, stop=stop_strings(self.stop))


# Defaults of the official app per task (app.py tabs); `interleave` uses the inferencer's own.
TEXT_TO_IMAGE_DEFAULTS = ImageParams()
EDIT_DEFAULTS = ImageParams(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
INTERLEAVE_DEFAULTS = ImageParams(cfg_text_scale=3.0, cfg_img_scale=1.5)
THINK_TOKENS_DEFAULT = 1024
UNDERSTAND_TOKENS_DEFAULT = 512

IMAGE_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(ImageParams))
TEXT_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(TextParams))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, checked before any work (a :class:`BagelInputError` names the
    limit): ``max_model_len`` tokens in a request's context, prompt, images, think text and answer
    together (None: the model's ``max_position_embeddings``); ``max_timesteps`` schedule points. They
    bound a request's memory: its KV cache is at most ``max_model_len`` tokens per layer."""

    max_model_len: int | None = None
    max_timesteps: int = 1000

    def check_timesteps(self, n: int) -> None:
        if n > self.max_timesteps:
            raise BagelInputError(f"num_timesteps {n} is above the limit of {self.max_timesteps} (max_timesteps)")


@dataclass(frozen=True)
class TaskDefaults:
    """What the task methods use when the caller sets nothing: the official app's values, or those
    a model directory carries in ``task_defaults.json`` (the demo model ``bagel-shapes`` draws
    64x64 pictures in 25 steps; the real checkpoint carries none)::

        {"t2i": {"height": 64, "width": 64, "num_timesteps": 25, ...}, "edit": {...},
         "understand": {"max_new_tokens": 16}, "chat": {"max_new_tokens": 32}}
    """

    t2i: ImageParams = TEXT_TO_IMAGE_DEFAULTS
    edit: ImageParams = EDIT_DEFAULTS
    height: int = 1024
    width: int = 1024
    understand_tokens: int = UNDERSTAND_TOKENS_DEFAULT
    chat_tokens: int = UNDERSTAND_TOKENS_DEFAULT

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "task_defaults.json") -> "TaskDefaults":
        unknown = sorted(set(data) - {"t2i", "edit", "understand", "chat"})
        if unknown:
            raise BagelInputError(f"{source}: unknown task(s) {', '.join(unknown)}; known: t2i, edit, understand, chat")
        out = cls()

        def image(base: ImageParams, values: dict[str, Any], task: str) -> ImageParams:
            split_knobs(values, IMAGE_PARAM_NAMES)
            values = dict(values)
            if "cfg_interval" in values:
                values["cfg_interval"] = tuple(values["cfg_interval"])
            try:
                return dataclasses.replace(base, **values).validate()
            except BagelInputError as e:
                raise BagelInputError(f"{source} ({task}): {e}") from None

        t2i = dict(data.get("t2i", {}))
        height, width = t2i.pop("height", out.height), t2i.pop("width", out.width)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BagelInputError(f"{source} (t2i): {name} must be a positive integer, got {value!r}")
        tokens = {}
        for task in ("understand", "chat"):
            values = dict(data.get(task, {}))
            split_knobs(values, ("max_new_tokens",))
            n = values.get("max_new_tokens", UNDERSTAND_TOKENS_DEFAULT)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise BagelInputError(f"{source} ({task}): max_new_tokens must be a positive integer, got {n!r}")
            tokens[task] = n
        return cls(t2i=image(out.t2i, t2i, "t2i"), edit=image(out.edit, dict(data.get("edit", {})), "edit"),
                   height=height, width=width, understand_tokens=tokens["understand"], chat_tokens=tokens["chat"])


def split_knobs(knobs: dict[str, Any], allowed: tuple[str, ...], hint: Any = None) -> None:
    """Raise :class:`BagelInputError` naming the keys of ``knobs`` not in ``allowed``; ``hint(name)``
    may add a suggestion (``" (did you mean 'cfg_text_scale'?)"``)."""
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        named = ", ".join(f"{u}{hint(u) if hint else ''}" for u in unknown)
        raise BagelInputError(f"unknown parameter(s): {named}; known: {', '.join(allowed)}")


MAX_STOP_STRINGS = 4  # as OpenAI's API


def stop_strings(value: Any) -> tuple[str, ...]:
    """``stop`` as a tuple: None, one string or a list of at most four non-empty strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise BagelInputError(f"stop must be a string or a list of strings (got {value!r})")
    if len(items) > MAX_STOP_STRINGS:
        raise BagelInputError(f"stop takes at most {MAX_STOP_STRINGS} strings (got {len(items)})")
    if any(not x for x in items):
        raise BagelInputError("stop strings must not be empty")
    return tuple(items)


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where ``text`` must end: the index of the earliest stop string in it, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could begin a stop string (a stream waits for them)."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold
