"""The contract every front end (server, UI, batch, eval, CLI) relies on: what a pipeline offers, as a
typed Protocol. ``bagel_engine.load`` returns a ``BagelPipeline`` that satisfies it; tests stand a small
fake behind the same methods. Front ends type their pipeline as :class:`Pipeline`, never ``Any``."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

StepCallback = Callable[[int, int], None]  # (step or token k, total); raise in it to stop the job
TextCallback = Callable[[str], None]  # each new piece of text as it is written


@runtime_checkable
class Pipeline(Protocol):
    model_name: str

    def generate(self, prompt: str | Sequence[str], *, height: int | None = None, width: int | None = None,
                 think: bool = False, seed: int | Sequence[int] | None = None,
                 callback: StepCallback | None = None, **knobs: Any) -> Any: ...

    def edit(self, images: Any, prompt: str, *, think: bool = False, seed: int | None = None,
             callback: StepCallback | None = None, **knobs: Any) -> Any: ...

    def understand(self, images: Any, question: str, *, think: bool = False, max_new_tokens: int | None = None,
                   do_sample: bool = False, text_temperature: float = 0.3, seed: int | None = None,
                   callback: StepCallback | None = None, on_text: TextCallback | None = None) -> Any: ...

    def chat(self, prompt: str, *, think: bool = False, max_new_tokens: int | None = None, do_sample: bool = False,
             text_temperature: float = 0.3, seed: int | None = None, callback: StepCallback | None = None,
             on_text: TextCallback | None = None) -> Any: ...

    def interleave(self, inputs: Sequence[Any], **options: Any) -> Any: ...
