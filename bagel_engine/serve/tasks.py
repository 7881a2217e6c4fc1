"""Jobs for the model worker, built from validated requests. Shared by the HTTP server and the UI.

Every job is ``fn(pipe, callback) -> result`` and calls only the public pipeline API
(``generate``, ``edit``, ``understand``, ``chat``, ``interleave``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from PIL import Image

from bagel_engine.engine_protocol import Pipeline

Item = Union[str, Image.Image]
JobFn = Callable[[Pipeline, Callable[[int, int], None]], Any]


def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else seed + i


def generate_job(prompt: str, *, width: int, height: int, n: int = 1, think: bool = False, seed: int | None = None,
                 knobs: dict[str, Any] | None = None, on_step: Callable[[Any], None] | None = None) -> JobFn:
    """Text to image; ``n`` images use seeds ``seed, seed+1, ...`` (or engine-picked seeds) and are
    denoised together (one batched forward per step for all of them). ``on_step(preview)`` after
    each denoising step (live previews)."""
    knobs = dict(knobs or {})
    if on_step is not None:
        knobs["on_step"] = on_step

    def fn(pipe: Pipeline, callback: Callable[[int, int], None]) -> list[Any]:
        if n == 1:
            return [pipe.generate(prompt, height=height, width=width, think=think, seed=seed, callback=callback,
                                  **knobs)]
        return list(pipe.generate([prompt] * n, height=height, width=width, think=think, seed=seed,
                                  callback=callback, **knobs))

    return fn


def edit_job(images: Sequence[Image.Image], prompt: str, *, n: int = 1, think: bool = False,
             seed: int | None = None, knobs: dict[str, Any] | None = None,
             on_step: Callable[[Any], None] | None = None) -> JobFn:
    """Editing with one or several input images (the output takes the last image's size)."""
    knobs = dict(knobs or {})
    if on_step is not None:
        knobs["on_step"] = on_step
    images = list(images)

    def fn(pipe: Pipeline, callback: Callable[[int, int], None]) -> list[Any]:
        arg: Any = images[0] if len(images) == 1 else images
        return [pipe.edit(arg, prompt, think=think, seed=_seed(seed, i), callback=callback, **knobs) for i in range(n)]

    return fn


@dataclass
class Conversation:
    """What a chat request asks for, flattened to the engine's ordered list of texts and images."""

    items: list[Item] = field(default_factory=list)

    @property
    def images(self) -> list[Image.Image]:
        return [x for x in self.items if isinstance(x, Image.Image)]

    def simple(self) -> tuple[list[Image.Image], str] | None:
        """(images, text) when the conversation is images followed by one text, else None."""
        if not self.items or not isinstance(self.items[-1], str):
            return None
        head = self.items[:-1]
        if all(isinstance(x, Image.Image) for x in head):
            return list(head), self.items[-1]  # type: ignore[return-value]
        return None


def conversation_from_turns(turns: Sequence[tuple[Sequence[Image.Image], str]]) -> Conversation:
    """Each turn's images come before its text (the official layout: images, then the question)."""
    items: list[Item] = []
    for images, text in turns:
        items.extend(images)
        if text:
            items.append(text)
    return Conversation(items)


def text_job(conv: Conversation, *, think: bool = False, seed: int | None = None,
             text_kw: dict[str, Any] | None = None, on_text: Callable[[str], None] | None = None,
             n: int | None = None) -> JobFn:
    """A text answer: ``chat`` for one text, ``understand`` for images + one text, ``interleave`` otherwise.

    ``text_kw`` may hold max_new_tokens, do_sample, text_temperature, top_p, top_k, stop; ``on_text(delta)``
    gets the text as it is written (streaming). ``n``: that many answers, a list (seeds ``seed + k``)."""
    text_kw = dict(text_kw or {})
    if on_text is not None:
        text_kw["on_text"] = on_text
    if n is not None:
        jobs = [text_job(conv, think=think, seed=_seed(seed, k), text_kw=text_kw) for k in range(n)]
        return lambda pipe, callback: [job(pipe, callback) for job in jobs]

    def fn(pipe: Pipeline, callback: Callable[[int, int], None]) -> Any:
        simple = conv.simple()
        if simple is not None and not simple[0]:
            return pipe.chat(simple[1], think=think, seed=seed, callback=callback, **text_kw)
        if simple is not None:
            imgs = simple[0]
            return pipe.understand(imgs[0] if len(imgs) == 1 else imgs, simple[1], think=think, seed=seed,
                                   callback=callback, **text_kw)
        kw = dict(text_kw)
        if "max_new_tokens" in kw:  # the official interleave caps answers with max_think_token_n
            kw["max_think_token_n"] = kw.pop("max_new_tokens")
        return as_output(pipe.interleave(list(conv.items), understanding_output=True, think=think, callback=callback,
                                         **_seeded(kw, seed)))

    return fn


def image_job(conv: Conversation, *, width: int | None, height: int | None, think: bool = False,
              seed: int | None = None, knobs: dict[str, Any] | None = None) -> JobFn:
    """An image answer: ``generate`` for one text, ``edit`` for images + one text, ``interleave`` otherwise."""
    knobs = dict(knobs or {})

    def fn(pipe: Pipeline, callback: Callable[[int, int], None]) -> Any:
        simple = conv.simple()
        if simple is not None and not simple[0]:
            size = {} if width is None else {"width": width, "height": height}
            return pipe.generate(simple[1], think=think, seed=seed, callback=callback, **size, **knobs)
        if simple is not None:
            imgs = simple[0]
            return pipe.edit(imgs[0] if len(imgs) == 1 else imgs, simple[1], think=think, seed=seed,
                             callback=callback, **knobs)
        kw = dict(knobs)
        if width is not None:
            kw["image_shapes"] = (height, width)
        return as_output(pipe.interleave(list(conv.items), understanding_output=False, think=think,
                                         callback=callback, **_seeded(kw, seed)))

    return fn


def _seeded(kw: dict[str, Any], seed: int | None) -> dict[str, Any]:
    return kw if seed is None else {**kw, "seed": seed}


@dataclass
class _Output:
    text: str | None = None
    image: Image.Image | None = None
    seed: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    latents: Any = None


def as_output(result: Any) -> Any:
    """The engine's result as an object with ``text`` and ``image`` (interleave may return a list)."""
    if hasattr(result, "text") and hasattr(result, "image"):
        return result
    if isinstance(result, (list, tuple)):
        texts = [x for x in result if isinstance(x, str)]
        images = [x for x in result if isinstance(x, Image.Image)]
        return _Output(text="".join(texts) if texts else None, image=images[-1] if images else None)
    if isinstance(result, str):
        return _Output(text=result)
    if isinstance(result, Image.Image):
        return _Output(image=result)
    raise TypeError(f"unexpected result from the engine: {type(result).__name__}")


def preview_steps(total: int, count: int) -> set[int]:
    """The steps (1..total-1) at which ``count`` partial images are taken, evenly spaced."""
    return {max(1, min(total - 1, round(total * (k + 1) / (count + 1)))) for k in range(count)} if total > 1 else set()


def wants_preview(step: int, total: int, count: int) -> bool:
    """Whether ``step`` of ``total`` is one of the ``count`` preview steps (picklable: a replica asks it)."""
    return step in preview_steps(total, count)


def fifth_step(step: int, total: int) -> bool:
    """About every fifth of the way (the web UI's previews)."""
    return step < total and step % max(1, total // 5) == 0
