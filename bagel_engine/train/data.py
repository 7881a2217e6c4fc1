"""Training data: rows of CSV / JSONL / Parquet files (the batch jobs' readers) become samples,
and samples become packed sequences of at most ``max_tokens`` tokens.

Columns (names as in batch jobs: case and ``-`` / ``_`` do not matter):

============  ==========================================================================
task          columns
============  ==========================================================================
t2i           ``prompt`` (or ``caption`` / ``instruction``) and the image to learn: ``image``
              (or ``target_image`` / ``output_image``)
edit          ``instruction`` (or ``prompt``), input image(s) ``image`` / ``image_2`` ... /
              ``input_images``, and ``output_image`` (or ``target_image`` / ``edited_image``);
              or, step by step, input image(s) and ``steps``: ``[{"instruction": ..., "output_image":
              ...}, ...]`` (each result is edited by the next step: the official multi-image edit plan)
official      the official trainer's parquet rows, as they are: text to image ``image`` (bytes) + ``captions``
              (a JSON object of caption variants, one chosen per use); editing ``image_list`` (image bytes)
              + ``instruction_list`` (per step, a list of instruction variants), sampled into one- or
              multi-step edits by the official rules (``official_edit_plan``)
understand    image(s), ``question`` (or ``prompt``) and ``answer`` (or ``response``)
chat          ``prompt`` (or ``question``) and ``answer`` (or ``response``)
conversation  ``conversations`` (LLaVA: ``[{"from": "human", "value": "<image>\\n..."}, ...]``) or
              ``messages`` (``[{"role": "user", "content": ...}, ...]``), and image(s); or a ``video`` (a file or
              a folder of frames, its ``<video>`` placeholder standing for the sampled frames: ``train.video``)
============  ==========================================================================

``--task auto`` (the default) picks per row: a conversation column, else an output image with
inputs (edit), else an answer (understand with images, chat without), else t2i. Images are
paths relative to the data file, URLs, data URLs, or bytes (Parquet). A row that cannot become a
sample (missing column, unreadable image, longer than ``max_tokens``) is recorded as bad and
skipped; training goes on.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bagel_engine.batch.reader import Row, read_rows
from bagel_engine.batch.request import image_values, load_image
from bagel_engine.params import BagelInputError
from bagel_engine.train import sample as sample_plans
from bagel_engine.train.packing import PackedBatch, SequencePacker, sample_length
from bagel_engine.train.video import FrameSampling, expand_video_placeholder, read_frames

log = logging.getLogger(__name__)

TASKS = ("auto", "t2i", "edit", "understand", "chat", "conversation", "official_t2i", "official_edit")
PROMPTS = ("prompt", "caption", "instruction", "question", "text")
ANSWERS = ("answer", "response", "output", "completion")
TARGETS = ("output_image", "target_image", "edited_image", "target")
CONVERSATIONS = ("conversations", "messages")


def _text(row: Row, columns: tuple[str, ...], what: str) -> str:
    for column in columns:
        value = row.get(column)
        if value is not None:
            return value if isinstance(value, str) else str(value)
    raise BagelInputError(f"no {what}: the row has none of the columns {', '.join(columns)} "
                          f"(columns: {', '.join(sorted(row.data)) or 'none'})")


def _has(row: Row, columns: tuple[str, ...]) -> bool:
    return any(row.get(c) is not None for c in columns)


def _images(row: Row, exclude: tuple[str, ...] = ()) -> list:
    base = row.folder
    out = []
    for i, (column, value) in enumerate(image_values(row)):
        if column in exclude:
            continue
        image, _ = load_image(value, base, f"image {i + 1} ({column})")
        out.append(image.convert("RGB"))
    return out


def _target(row: Row):
    for column in TARGETS:
        value = row.get(column)
        if value is not None:
            image, _ = load_image(value, row.folder, f"target image ({column})")
            return image.convert("RGB")
    raise BagelInputError(f"no image to learn: the row has none of the columns {', '.join(TARGETS)}")


def _steps(row: Row) -> list[tuple[str, Any]]:
    """``steps`` of a step-by-step edit: a (JSON) list of ``{"instruction", "output_image"}``."""
    value = row.get("steps")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BagelInputError("steps is not a JSON list of {instruction, output_image}") from None
    if not isinstance(value, list) or not value:
        raise BagelInputError("steps must be a non-empty list of {instruction, output_image}")
    out = []
    for k, step in enumerate(value):
        if not isinstance(step, dict):
            raise BagelInputError(f"step {k + 1} must be an object with instruction and output_image")
        instruction = next((step[c] for c in ("instruction", "prompt") if isinstance(step.get(c), str)), None)
        target = next((step[c] for c in TARGETS if step.get(c) is not None), None)
        if instruction is None or target is None:
            raise BagelInputError(f"step {k + 1} needs an instruction and an output_image")
        image, _ = load_image(target, row.folder, f"step {k + 1} output_image")
        out.append((instruction, image.convert("RGB")))
    return out


def _turns(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BagelInputError("the conversation is not a JSON list of turns") from None
    if not isinstance(value, list) or not value:
        raise BagelInputError("the conversation must be a non-empty list of turns")
    turns = []
    for turn in value:
        if not isinstance(turn, dict):
            raise BagelInputError(f"a turn must be an object, got {turn!r:.60}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise BagelInputError("every turn needs a role ('from' / 'role') and a text ('value' / 'content')")
        turns.append((role, text))
    if not any(r.lower() in ("gpt", "assistant") for r, _ in turns):
        raise BagelInputError("the conversation has no assistant turn to learn")
    return turns


def _official_images(row: Row, column: str) -> list:
    value = row.get(column)
    items = list(value) if value is not None and not isinstance(value, (str, bytes)) else [value]
    out = []
    for k, item in enumerate(items):
        image, _ = load_image(item, row.folder, f"{column}[{k}]")
        out.append(image.convert("RGB"))
    return out


def _as_list(value: Any, what: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BagelInputError(f"{what} is not JSON") from None
    if value is None or isinstance(value, (str, bytes, dict)):
        raise BagelInputError(f"{what} must be a list")
    return list(value)


def official_t2i_caption(captions: Any, rng: random.Random) -> str:
    """The official t2i rule: one of the caption variants (a JSON object), chosen at random per use; a
    row without any is trained with the caption " "."""
    if isinstance(captions, str):
        try:
            captions = json.loads(captions)
        except json.JSONDecodeError:
            raise BagelInputError("captions is not a JSON object of caption variants") from None
    if not isinstance(captions, dict):
        raise BagelInputError("captions must be a JSON object of caption variants")
    variants = [str(v) for v in captions.values()]
    return rng.choice(variants) if variants else " "


def official_edit_plan(num_images: int, instructions: list[list[str]], rng: random.Random
                       ) -> tuple[int, list[tuple[str, int]]]:
    """The official unified-edit rule for a row of ``num_images`` images: a start image and an end one at
    most two steps later, chosen at random; when the edit spans two steps, half the time their instructions
    (one variant each, chosen at random) are joined as one (``"a. b."``; the official quirk: an end at the
    last image is then moved one back), else each step is its own instruction and target. Returns the start
    image and ``[(instruction, result image), ...]``."""
    if num_images < 2:
        raise BagelInputError(f"an edit row needs at least two images in image_list, has {num_images}")
    if len(instructions) < num_images - 1:
        raise BagelInputError(f"instruction_list has {len(instructions)} steps for {num_images} images")
    start = rng.choice(range(num_images - 1))
    end = rng.choice(range(start + 1, min(start + 3, num_images)))
    if end - start > 1 and rng.random() < 0.5:
        if end == num_images - 1:
            end -= 1
        text = "".join(rng.choice(instructions[k - 1]) + ". " for k in range(start + 1, end + 1))
        return start, [(text.rstrip(), end)]
    return start, [(rng.choice(instructions[k - 1]), k) for k in range(start + 1, end + 1)]


def row_task(row: Row) -> str:
    """The task of a row under ``--task auto``, or :class:`BagelInputError` when its columns leave it
    to a guess (a question without an answer, an instruction without its edited image): such a row is
    bad, never trained as something else; ``--task t2i`` says that it is meant as text to image."""
    if _has(row, CONVERSATIONS):
        return "conversation"
    if _has(row, ("image_list",)) and _has(row, ("instruction_list",)):
        return "official_edit"
    if _has(row, ("captions",)) and not _has(row, PROMPTS):
        return "official_t2i"
    if _has(row, TARGETS) or _has(row, ("steps",)):
        return "edit"
    if _has(row, ANSWERS):
        return "understand" if image_values(row) else "chat"
    if _has(row, ("question",)):
        raise BagelInputError("a question without an answer (no column answer / response): nothing to learn; "
                              "use --task t2i to learn the image from the question")
    if _has(row, ("instruction",)) and not _has(row, ("prompt", "caption")):
        raise BagelInputError("an instruction and image(s) without the edited image (no column output_image / "
                              "target_image / edited_image): an edit without its target? use --task t2i to learn "
                              "the image from the instruction")
    if len(image_values(row)) > 1:
        raise BagelInputError(f"{len(image_values(row))} images and no answer or output image: not a t2i row "
                              "(one image) nor an edit (needs output_image)")
    return "t2i"


def row_rng(row: Row, seed: int = 0, epoch: int = 0) -> random.Random:
    """The random draws of one use of a row (caption variant, edit steps): fixed by the seed, the epoch and
    the row, so that a resumed run, a sequence that puts a sample back and every rank draw the same."""
    return random.Random(f"{seed}:{epoch}:{row.source}:{row.position}")


def row_sample(row: Row, task: str = "auto", rng: random.Random | None = None,
               frames: FrameSampling | None = None) -> sample_plans.Sample:
    """The sample of one row, or :class:`BagelInputError` saying what is wrong with it. ``rng``: the draws
    of the official formats (default: the row's own, :func:`row_rng`); ``frames``: how a video row's frames are
    sampled (default: :class:`FrameSampling`'s)."""
    if row.error:
        raise BagelInputError(row.error)
    name = row.where()
    task = row_task(row) if task == "auto" else task
    rng = rng or row_rng(row)
    if task == "official_t2i":
        images = _official_images(row, "image")
        if len(images) != 1:
            raise BagelInputError(f"an official t2i row holds one image, found {len(images)}")
        return sample_plans.text_to_image(official_t2i_caption(row.get("captions"), rng), images[0], name)
    if task == "official_edit":
        images = _official_images(row, "image_list")
        instructions = [[str(v) for v in _as_list(step, "an instruction_list step")]
                        for step in _as_list(row.get("instruction_list"), "instruction_list")]
        start, steps = official_edit_plan(len(images), instructions, rng)
        return sample_plans.edit_steps([images[start]], [(text, images[k]) for text, k in steps], name)
    if task == "t2i":
        prompt = _text(row, PROMPTS, "prompt")
        if _has(row, TARGETS):
            image = _target(row)
        else:
            images = _images(row)
            if len(images) != 1:
                raise BagelInputError(f"a t2i row needs exactly one image, found {len(images)}")
            image = images[0]
        return sample_plans.text_to_image(prompt, image, name)
    if task == "edit":
        inputs = _images(row, exclude=TARGETS)
        if not inputs:
            raise BagelInputError("an edit row needs at least one input image (image / input_images)")
        if row.get("steps") is not None:
            return sample_plans.edit_steps(inputs, _steps(row), name)
        return sample_plans.edit(inputs, _text(row, ("instruction", "prompt", "text"), "instruction"), _target(row), name)
    if task == "understand":
        images = _images(row)
        if not images:
            raise BagelInputError("an understand row needs at least one image")
        return sample_plans.understanding(images, _text(row, ("question", "prompt", "instruction"), "question"),
                               _text(row, ANSWERS, "answer"), name)
    if task == "chat":
        return sample_plans.Sample([sample_plans.Text(_text(row, ("prompt", "question", "instruction"), "prompt")),
                         sample_plans.Text(_text(row, ANSWERS, "answer"), loss=True)], name)
    if task == "conversation":
        column = next(c for c in CONVERSATIONS if row.get(c) is not None) if _has(row, CONVERSATIONS) else None
        if column is None:
            raise BagelInputError("no conversation: the row has no column conversations / messages")
        turns, images = _turns(row.get(column)), _images(row)
        video = row.get("video")
        if video is not None:
            if images:
                raise BagelInputError("a row has images or a video, not both")
            images = read_frames(Path(row.folder or ".") / str(video), frames or FrameSampling(), rng)
            turns = expand_video_placeholder(turns, len(images))
        try:
            return sample_plans.conversation(turns, images, name)
        except ValueError as e:
            raise BagelInputError(str(e)) from None
    raise BagelInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def usable_sample(row: Row, packer: SequencePacker, max_tokens: int, task: str = "auto",
                  rng: random.Random | None = None,
                  transforms: sample_plans.ImageTransforms | None = None,
                  frames: FrameSampling | None = None) -> tuple[sample_plans.Sample, int] | str:
    """``(sample, tokens)`` of a row, or the reason it cannot be trained on (bad content, sizes the
    model cannot take, more tokens than ``max_tokens``). ``transforms``: its pictures' resize rules (None:
    the model's)."""
    try:
        sample = row_sample(row, task, rng, frames)
        sample.transforms = transforms
        n = sample_length(packer, sample)
    except ValueError as e:  # BagelInputError included
        return str(e)
    if n > max_tokens:
        return f"{n} tokens, more than --max-tokens {max_tokens}"
    return sample, n


def restore_rng(rng: random.Random, state) -> None:
    """A ``random.Random`` state as a checkpoint's JSON gives it back (lists for tuples)."""
    rng.setstate((state[0], tuple(state[1]), state[2]))


@dataclass
class BadRow:
    where: str
    error: str


@dataclass
class DataStream:
    """An endless stream of packed sequences for one data-parallel rank.

    Rows are shuffled per epoch with ``seed + epoch`` (the same order on every rank); rank ``r`` of
    ``world`` takes rows ``r, r + world, ...``. ``state()`` / ``restore()`` give the position, so a
    resumed run continues with the next unseen row."""

    rows: list[Row]
    packer: SequencePacker
    max_tokens: int
    task: str = "auto"
    seed: int = 0
    rank: int = 0
    world: int = 1
    epoch: int = 0
    cursor: int = 0  # rows of this epoch's share already taken
    bad: list[BadRow] = field(default_factory=list)
    _bad_seen: set = field(default_factory=set)
    _shares: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_path(cls, path: str | Path, packer: SequencePacker, max_tokens: int, **kw) -> "DataStream":
        rows = read_rows(Path(path))
        if not rows:
            raise BagelInputError(f"{path}: no rows to train on")
        return cls(rows, packer, max_tokens, **kw)

    def _share(self, epoch: int) -> list[Row]:
        """This rank's rows of ``epoch``, in order (shuffled once per epoch, not once per sample: a
        shuffle of 64,000 rows per sample cost more than the training step of a small model)."""
        cached = self._shares.get(epoch)
        if cached is None:
            order = list(range(len(self.rows)))
            random.Random(self.seed + epoch).shuffle(order)
            cached = [self.rows[i] for i in order[self.rank::self.world]]
            self._shares = {epoch: cached}
        return cached

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "packer_rng": self.packer.rng.getstate()}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        restore_rng(self.packer.rng, state["packer_rng"])

    def _record(self, row: Row, error: str) -> None:
        if row.position not in self._bad_seen:
            self._bad_seen.add(row.position)
            self.bad.append(BadRow(row.where(), error))
            log.warning("skipping %s: %s", row.where(), error)

    def _next_sample(self) -> tuple[sample_plans.Sample, int]:
        share = self._share(self.epoch)
        tried = 0
        while True:
            if self.cursor >= len(share):
                if tried and len(self._bad_seen) >= len(self.rows):
                    first = "; ".join(f"{b.where}: {b.error}" for b in self.bad[:3])
                    raise BagelInputError(f"every row of the training data is bad ({len(self.bad)} rows), e.g. {first}")
                self.epoch, self.cursor = self.epoch + 1, 0
                share = self._share(self.epoch)
                if not share:
                    raise BagelInputError(f"rank {self.rank} of {self.world} has no rows: fewer rows than ranks")
            row = share[self.cursor]
            self.cursor += 1
            tried += 1
            if row.position in self._bad_seen:
                continue
            usable = usable_sample(row, self.packer, self.max_tokens, self.task, row_rng(row, self.seed, self.epoch))
            if isinstance(usable, str):
                self._record(row, usable)
                continue
            return usable

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        """Samples in order until the next would pass ``max_tokens`` (at least one per sequence)."""
        samples, total = [], 0
        while True:
            sample, n = self._next_sample()
            if samples and total + n > self.max_tokens:
                self.cursor -= 1  # put it back: the next sequence starts with it
                return self.packer.pack(samples)
            samples.append(sample)
            total += n
            if total == self.max_tokens:
                return self.packer.pack(samples)


def _usable_rows(rows: list[Row], packer: SequencePacker, max_tokens: int, task: str,
                 bad: list[BadRow], transforms: list | None = None) -> Iterator[tuple[Row, sample_plans.Sample, int]]:
    """The rows that can be trained on, in order, with their samples and token counts; the others go to ``bad``.
    ``transforms``: each row's resize rules (None: the model's)."""
    for i, row in enumerate(rows):
        usable = usable_sample(row, packer, max_tokens, task, transforms=transforms[i] if transforms else None)
        if isinstance(usable, str):
            bad.append(BadRow(row.where(), usable))
            continue
        yield row, *usable


def pack_in_order(path: str | Path, packer: SequencePacker, max_tokens: int, task: str = "auto"
                  ) -> tuple[list[PackedBatch], list[BadRow]]:
    """Every good row of ``path`` once, in order, packed greedily into sequences of at most
    ``max_tokens`` (evaluation data); the bad rows with their reasons."""
    batches, bad, current, total = [], [], [], 0
    for _, sample, n in _usable_rows(read_rows(Path(path)), packer, max_tokens, task, bad):
        if current and total + n > max_tokens:
            batches.append(packer.pack(current))
            current, total = [], 0
        current.append(sample)
        total += n
    if current:
        batches.append(packer.pack(current))
    if not batches:
        raise BagelInputError(f"{path}: no usable rows to evaluate on")
    return batches, bad


class Prefetcher:
    """Packs the next sequences in a background thread (image decoding and resizing off the training
    loop) while the device trains on the current one. ``state()`` is the stream's position after the
    last sequence *taken*, so a checkpoint never skips the sequences still waiting in the queue."""

    def __init__(self, stream: DataStream, depth: int = 2):
        import queue
        import threading

        self.stream = stream
        self._state = stream.state()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="bagel-train-data", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                item = (next(self.stream), self.stream.state(), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                item = (None, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> PackedBatch:
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self._state = state
        return batch

    def state(self) -> dict:
        return self._state

    def close(self) -> None:
        """Stop the thread and wait for it, so that no packing runs while the interpreter shuts down."""
        import queue

        self._stop.set()
        while self._thread.is_alive():
            try:  # make room for a producer waiting to put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


def survey(path: str | Path, packer: SequencePacker, max_tokens: int, task: str = "auto") -> dict:
    """What a training file holds, without a model's weights (``bagel train --check``): rows per
    task, bad rows with their reasons, tokens per sample, and how the samples pack into sequences of
    ``max_tokens`` (in file order, as one epoch would, before shuffling)."""
    return survey_rows(read_rows(Path(path)), packer, max_tokens, task)


def survey_rows(rows: list[Row], packer: SequencePacker, max_tokens: int, task: str = "auto",
                transforms: list | None = None) -> dict:
    """:func:`survey` of rows already read (the groups of an official dataset YAML, with each row's group's
    resize rules in ``transforms``)."""
    tasks: dict[str, int] = {}
    lengths, bad = [], []
    image_tokens = text_tokens = 0
    for row, sample, n in _usable_rows(rows, packer, max_tokens, task, bad, transforms):
        kind = row_task(row) if task == "auto" else task
        tasks[kind] = tasks.get(kind, 0) + 1
        lengths.append(n)
        text = sum(len(packer.tokenizer.frame(s.text)) for s in sample.segments if isinstance(s, sample_plans.Text))
        text_tokens += text
        image_tokens += n - text
    sequences, fill = 0, 0
    for n in lengths:
        if sequences == 0 or fill + n > max_tokens:
            sequences, fill = sequences + 1, 0
        fill += n
    total = sum(lengths)
    ordered = sorted(lengths)
    return {
        "rows": len(rows), "good": len(lengths), "bad": [{"where": b.where, "error": b.error} for b in bad],
        "tasks": tasks, "tokens": total, "text_tokens": text_tokens, "image_tokens": image_tokens,
        "tokens_per_sample": {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]} if ordered else None,
        "max_tokens": max_tokens, "sequences_per_epoch": sequences,
        "packing_efficiency": total / (sequences * max_tokens) if sequences else 0.0,
    }
