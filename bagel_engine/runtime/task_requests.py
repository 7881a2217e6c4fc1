"""How the task methods' arguments become :class:`Request` objects: prompts checked, knobs and their
aliases split from the call-level keywords, params built once (``replace(task_default, **knobs)``),
one seed per image. ``BagelPipeline.generate`` / ``edit`` / ``understand`` / ``chat`` call these and hand
the requests to the engine; no model or I/O here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from bagel_engine import knobs as knob_table
from bagel_engine import params
from bagel_engine.params import BagelInputError, ImageParams, TextParams
from bagel_engine.runtime.engine import Request

CALL_KEYWORDS = ("negative_prompt", "num_images_per_prompt", "seed", "noise", "generator")
ANSWER_KNOBS = ("max_new_tokens", "do_sample", "text_temperature", "top_p", "top_k", "stop")


def need_prompt(prompt: Any, what: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise BagelInputError(f"{what} must be a non-empty string")
    return prompt


def as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def call_params(defaults: ImageParams, knobs: dict, image_params: ImageParams | None,
                text_params: TextParams | None) -> tuple[ImageParams, TextParams]:
    """The call's params, built once: the given (or default) ones with the caller's knobs replaced."""
    params.split_knobs(knobs, params.IMAGE_PARAM_NAMES + params.TEXT_PARAM_NAMES, hint=knob_table.did_you_mean)
    image = {k: v for k, v in knobs.items() if k in params.IMAGE_PARAM_NAMES}
    if "cfg_interval" in image and isinstance(image["cfg_interval"], (list, tuple)):
        image["cfg_interval"] = tuple(image["cfg_interval"])
    text = {k: v for k, v in knobs.items() if k in params.TEXT_PARAM_NAMES}
    base_text = text_params or TextParams(params.THINK_TOKENS_DEFAULT, False, 0.3)
    return replace(image_params or defaults, **image), replace(base_text, **text)


def split_image_call(task: str, knobs: dict, seed, noise) -> tuple[dict, dict]:
    """Split a generate / edit call's keywords: aliases resolved (``guidance_scale``, ``latents``,
    ``num_inference_steps``...), then the call-level ones (negative prompt, images per prompt, seed,
    noise, generator) apart from the knobs of the params."""
    knobs = knob_table.canonical({**knobs, "seed": seed, "noise": noise}, task)
    call = {name: knobs.pop(name, None) for name in CALL_KEYWORDS}
    n = call["num_images_per_prompt"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise BagelInputError(f"num_images_per_prompt must be an integer >= 1 (got {n!r})")
    if call["generator"] is not None:
        if call["seed"] is not None:
            raise BagelInputError("give seed or generator, not both")
        if not isinstance(call["generator"], torch.Generator):
            raise BagelInputError(f"generator must be a torch.Generator (got {type(call['generator']).__name__})")
    neg = call["negative_prompt"]
    if neg is not None and not isinstance(neg, str):
        raise BagelInputError(f"negative_prompt must be a string (got {type(neg).__name__})")
    call["negative_prompt"] = neg or None  # an empty negative prompt is none
    return knobs, call


def seeds_for(seed, generator: torch.Generator | None, count: int, single: bool, what: str = "images") -> list:
    """One seed per image: ``seed + k`` (one seed) or the list given; a ``generator`` draws them (the
    same generator state, the same images; the generator advances as diffusers' would)."""
    if generator is not None:
        return [int(torch.randint(0, 2**31, (1,), generator=generator)) for _ in range(count)]
    if seed is None or (single and count == 1):
        return [seed] * count
    if isinstance(seed, int):
        return [seed + k for k in range(count)]
    seeds = list(seed)
    if len(seeds) != count:
        raise BagelInputError(f"{len(seeds)} seeds for {count} {what}")
    return seeds


def t2i_requests(prompt: str | Sequence[str], size: tuple[int, int], defaults: ImageParams, knobs: dict, *,
                 seed, noise, think: bool, think_contexts: str, simple_think: bool, callback, on_step,
                 image_params: ImageParams | None, text_params: TextParams | None) -> tuple[list[Request], bool]:
    """The requests of one ``generate`` call (one per image, in lockstep) and whether one output, not a
    list, goes back."""
    knobs, call = split_image_call("t2i", knobs, seed, noise)
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise BagelInputError("prompt list is empty")
    for p in prompts:
        need_prompt(p, "prompt" if single else "every prompt")
    per_prompt = call["num_images_per_prompt"] or 1
    if per_prompt > 1:
        prompts = [p for p in prompts for _ in range(per_prompt)]
        single = False
    what = "prompts" if per_prompt == 1 else "images"
    seeds = seeds_for(call["seed"], call["generator"], len(prompts), single, what)
    noise = call["noise"]
    noises = [noise] if single else [None] * len(prompts) if noise is None else list(noise)
    if len(noises) != len(prompts):
        raise BagelInputError(f"{len(noises)} noise tensors for {len(prompts)} {what}")
    image, text = call_params(defaults, knobs, image_params, text_params)
    return [Request([p], think=think, text=text, image=image, image_shape=size, seed=s, noise=n,
                    negative_prompt=call["negative_prompt"], think_contexts=think_contexts, simple_think=simple_think,
                    callback=callback if k == 0 else None, on_step=on_step, index=k)  # they step in lockstep
            for k, (p, s, n) in enumerate(zip(prompts, seeds, noises))], single


def edit_requests(images, prompt: str, defaults: ImageParams, knobs: dict, *, seed, noise, think: bool,
                  think_contexts: str, size_from: int, callback, on_step, image_params: ImageParams | None,
                  text_params: TextParams | None) -> tuple[list[Request], bool]:
    """The requests of one ``edit`` call and whether one output, not a list, goes back."""
    knobs, call = split_image_call("edit", knobs, seed, noise)
    images = as_list(images)
    if not images:
        raise BagelInputError("edit needs at least one input image")
    need_prompt(prompt, "prompt")
    image, text = call_params(defaults, knobs, image_params, text_params)
    count = call["num_images_per_prompt"] or 1
    seeds = seeds_for(call["seed"], call["generator"], count, count == 1)
    return [Request([*images, prompt], think=think, text=text, image=image, seed=s, noise=call["noise"],
                    negative_prompt=call["negative_prompt"], think_contexts=think_contexts, size_from=size_from,
                    callback=callback if k == 0 else None, on_step=on_step, index=k)
            for k, s in enumerate(seeds)], count == 1 and call["num_images_per_prompt"] is None


def answer_request(task: str, inputs: list, think: bool, knobs: dict, default_tokens: int, seed: int | None,
                   callback, on_text) -> Request:
    """The request of one ``understand`` / ``chat`` call."""
    knobs = knob_table.canonical(knobs, task)
    params.split_knobs(knobs, ANSWER_KNOBS, hint=knob_table.did_you_mean)
    text = TextParams(knobs.get("max_new_tokens") or default_tokens, bool(knobs.get("do_sample", False)),
                      knobs.get("text_temperature", 0.3), top_p=knobs.get("top_p", 1.0),
                      top_k=knobs.get("top_k", 0), stop=tuple(params.stop_strings(knobs.get("stop"))))
    return Request(inputs, understanding_output=True, think=think, text=text, seed=seed, callback=callback,
                   on_text=on_text)
