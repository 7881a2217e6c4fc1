"""User-facing parameters: names and meanings of the official ``interleave_inference`` arguments,
with the defaults of each task taken from the official app."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RENORM_TYPES = ("global", "channel", "text_channel")


class BagelInputError(ValueError):
    """Input the engine cannot serve: the message says what is wrong and how to fix it."""


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

    def validate(self) -> "TextParams":
        n = self.max_think_token_n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise BagelInputError(f"max_think_token_n must be an integer >= 1 (got {n!r})")
        t = self.text_temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
            raise BagelInputError(f"text_temperature must be a number > 0 (got {t!r})")
        return self


# Defaults of the official app per task (app.py tabs); `interleave` uses the inferencer's own.
TEXT_TO_IMAGE_DEFAULTS = ImageParams()
EDIT_DEFAULTS = ImageParams(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
INTERLEAVE_DEFAULTS = ImageParams(cfg_text_scale=3.0, cfg_img_scale=1.5)
THINK_TOKENS_DEFAULT = 1024
UNDERSTAND_TOKENS_DEFAULT = 512

IMAGE_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(ImageParams))
TEXT_PARAM_NAMES = tuple(f.name for f in dataclasses.fields(TextParams))


def split_knobs(knobs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise BagelInputError(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(allowed)}")
