"""A training sample: an ordered plan of segments, the way BAGEL was trained on interleaved data.

Each segment becomes one *split* of the packed sequence (``bagel_engine.train.packing``):

- ``Text``: ``<|im_start|> text <|im_end|>``, causal. With ``loss`` the model learns to write it
  (cross-entropy on every token after ``<|im_start|>``, the closing ``<|im_end|>`` included).
- ``Picture(as_vit=True)``: the image's ViT tokens between ``<|vision_start|>`` / ``<|vision_end|>``,
  full attention inside the block (what understanding and editing condition on).
- ``Picture(as_vae=True)``: the clean VAE latents (t = 0) of a conditioning image, full attention.
- ``Picture(target=True)``: the image to generate: its latents noised at a random flow time and
  regressed to the velocity (MSE). Nothing after it sees these noisy tokens, and they take no
  RoPE position of their own, exactly as at inference, where the noisy block never enters the cache.

``droppable`` segments are left out with the dropout probabilities of ``Dropout`` (official:
text 0.1, ViT 0.4, VAE 0.1): that is how the model learns the unconditional branches that
classifier-free guidance needs. The builders below give the official plans per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from PIL import Image


@dataclass(frozen=True)
class Text:
    text: str
    loss: bool = False
    droppable: bool = False


@dataclass(frozen=True)
class Picture:
    image: Image.Image = field(compare=False)
    as_vae: bool = False  # clean latents (conditioning)
    as_vit: bool = False  # ViT tokens (conditioning)
    target: bool = False  # noised latents with the MSE loss (what to generate)
    droppable: bool = False

    def __post_init__(self):
        if self.target and (self.as_vae or self.as_vit):
            raise ValueError("a target picture is only noised latents: give its conditioning uses as another Picture")
        if not (self.target or self.as_vae or self.as_vit):
            raise ValueError("a Picture must be a target or be seen through the VAE and/or the ViT")


Segment = Union[Text, Picture]


@dataclass(frozen=True)
class Dropout:
    """Probability of leaving out a droppable segment of each kind (the official defaults)."""

    text: float = 0.1
    vit: float = 0.4
    vae: float = 0.1


@dataclass(frozen=True)
class ImageTransforms:
    """Resize rules for a sample's pictures (max side, min side, stride, max pixels) instead of the model's own:
    the official dataset YAML's per-group ``image_transform_args`` / ``vit_image_transform_args``."""

    vae: tuple[int, int, int, int | None] | None = None
    vit: tuple[int, int, int, int | None] | None = None


@dataclass
class Sample:
    segments: list[Segment]
    name: str = ""  # where it came from, for messages
    transforms: ImageTransforms | None = None  # None: the model's own resize rules

    @property
    def has_loss(self) -> bool:
        return any((isinstance(s, Text) and s.loss) or (isinstance(s, Picture) and s.target) for s in self.segments)


# ----------------------------------------------------------------------------- official plans per task
def text_to_image(prompt: str, image: Image.Image, name: str = "") -> Sample:
    """Prompt (droppable for guidance), then the image to generate."""
    return Sample([Text(prompt, droppable=True), Picture(image, target=True)], name)


def edit(images: list[Image.Image], instruction: str, target: Image.Image, name: str = "") -> Sample:
    """Each input image through the VAE and the ViT, the instruction, then the edited image (every
    condition droppable, as in the official edit data)."""
    segments: list[Segment] = []
    for image in images:
        segments += [Picture(image, as_vae=True, droppable=True), Picture(image, as_vit=True, droppable=True)]
    segments += [Text(instruction, droppable=True), Picture(target, target=True)]
    return Sample(segments, name)


def edit_steps(images: list[Image.Image], steps: list[tuple[str, Image.Image]], name: str = "") -> Sample:
    """A step-by-step edit (the official unified edit data with several images): the input image(s) through
    the VAE and the ViT, then per step its instruction and its result to generate; a result that the next
    step edits goes in again as clean context (VAE and ViT), so the same picture is both a noised target and,
    after it, a condition (later tokens never see its noisy copy). Every condition droppable."""
    if not steps:
        raise ValueError("a step-by-step edit needs at least one step")
    segments: list[Segment] = []
    for image in images:
        segments += [Picture(image, as_vae=True, droppable=True), Picture(image, as_vit=True, droppable=True)]
    for k, (instruction, result) in enumerate(steps):
        segments += [Text(instruction, droppable=True), Picture(result, target=True)]
        if k + 1 < len(steps):
            segments += [Picture(result, as_vae=True, droppable=True), Picture(result, as_vit=True, droppable=True)]
    return Sample(segments, name)


def understanding(images: list[Image.Image], question: str, answer: str, name: str = "") -> Sample:
    """Images through the ViT, the question, then the answer to learn (as the official VLM data)."""
    segments: list[Segment] = [Picture(image, as_vit=True) for image in images]
    segments += [Text(question), Text(answer, loss=True)]
    return Sample(segments, name)


def conversation(turns: list[tuple[str, str]], images: list[Image.Image], name: str = "",
                 placeholder: str = "<image>") -> Sample:
    """A multi-turn conversation ``[(role, text), ...]`` with roles ``user`` / ``assistant`` (or
    LLaVA's ``human`` / ``gpt``); each ``<image>`` in a user turn stands for the next image, which
    goes in before that turn's text. Assistant turns are learnt."""
    segments: list[Segment] = []
    pending = list(images)
    for role, text in turns:
        role = role.lower()
        if role in ("user", "human"):
            for _ in range(text.count(placeholder)):
                if not pending:
                    raise ValueError(f"{name or 'sample'}: more {placeholder} placeholders than images")
                segments.append(Picture(pending.pop(0), as_vit=True))
            text = text.replace(placeholder, "").strip()
            if text:
                segments.append(Text(text))
        elif role in ("assistant", "gpt"):
            segments.append(Text(text, loss=True))
        elif role == "system":
            segments.append(Text(text))
        else:
            raise ValueError(f"{name or 'sample'}: unknown role {role!r} (use user / assistant / system)")
    if pending:  # images without placeholders go first, as in the understanding plan
        segments = [Picture(image, as_vit=True) for image in pending] + segments
    return Sample(segments, name)
