"""The shapes world of the demo model ``bagel-shapes``: flat coloured circles, squares and triangles
on a white canvas, the sentences that describe them, and how scenes are drawn.

Everything here is a fixed contract shared by the data generator, the training recipe and the
judge of ``bagel eval shapes``: the palette, the shapes, their sizes, the five position regions
and the prompt / instruction / question templates.

Geometry: an object is ``(colour, shape, cx, cy, r)`` in pixels; ``r`` is the radius of a circle
and the half-side of a square and of a triangle's bounding box (apex up, base at ``cy + r``), so
every object's bounding box is ``[cx - r, cx + r] x [cy - r, cy + r]`` and its centre ``(cx, cy)``
is the centre of that box (which is what the judge measures).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

CANVAS = 64  # the demo model's picture side
BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
# Colours outside the world, for teaching a model something new (docs/demo-model.md: a LoRA for pink).
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"pink": (240, 100, 180)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
NUMBERS = {1: "one", 2: "two", 3: "three"}
SIZE_RANGE = (0.10, 0.16)  # radius / half-side as a fraction of the canvas side
HELD_OUT = (("purple", "triangle"), ("orange", "square"), ("green", "circle"))


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    cx: float
    cy: float
    r: float

    @property
    def kind(self) -> tuple[str, str]:
        return self.color, self.shape

    def box(self) -> tuple[float, float, float, float]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


def palette(extra: tuple[str, ...] = ()) -> dict[str, tuple[int, int, int]]:
    """The world's colours plus the named ``EXTRA_COLORS``."""
    unknown = [c for c in extra if c not in EXTRA_COLORS and c not in COLORS]
    if unknown:
        raise ValueError(f"unknown colour(s) {', '.join(unknown)}; extra colours: {', '.join(EXTRA_COLORS)}")
    return {**COLORS, **{c: EXTRA_COLORS[c] for c in extra if c in EXTRA_COLORS}}


def region_of(cx: float, cy: float, size: int = CANVAS) -> str | None:
    """The position word of a centre, or None in a corner (outside every region)."""
    third = size / 3
    col = 0 if cx < third else 2 if cx > 2 * third else 1
    row = 0 if cy < third else 2 if cy > 2 * third else 1
    return {(0, 1): "left", (2, 1): "right", (1, 0): "top", (1, 2): "bottom", (1, 1): "center"}.get((col, row))


def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT


def plural(shape: str) -> str:
    return shape + "s"


def phrase(kind: tuple[str, str]) -> str:
    return f"a {kind[0]} {kind[1]}"


def draw(objects: list[Obj] | tuple[Obj, ...], size: int = CANVAS) -> Image.Image:
    """The scene as an RGB picture: white background, flat objects, hard edges."""
    canvas = np.full((size, size, 3), 255, np.uint8)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    for o in objects:
        dx, dy = xs - o.cx, ys - o.cy
        if o.shape == "circle":
            mask = dx * dx + dy * dy <= o.r * o.r
        elif o.shape == "square":
            mask = (np.abs(dx) <= o.r) & (np.abs(dy) <= o.r)
        elif o.shape == "triangle":  # apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
            frac = (dy + o.r) / (2 * o.r)  # 0 at the apex, 1 at the base
            mask = (frac >= 0) & (frac <= 1) & (np.abs(dx) <= o.r * frac)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
        canvas[mask] = COLORS.get(o.color) or EXTRA_COLORS[o.color]
    return Image.fromarray(canvas, "RGB")


# ----------------------------------------------------------------------------- placing objects
class Placer:
    """Draws object positions and sizes with a ``random.Random``: inside the canvas, in a region
    when asked (with a margin from its borders), never overlapping (boxes at least ``gap`` px apart)."""

    def __init__(self, rng: random.Random, size: int = CANVAS, gap: float = 3.0, margin: float = 2.0):
        self.rng, self.size, self.gap, self.margin = rng, size, gap, margin

    def radius(self) -> float:
        lo, hi = SIZE_RANGE
        return self.rng.uniform(lo, hi) * self.size

    def _range(self, band: int, r: float) -> tuple[float, float]:
        """Centre coordinates inside third ``band`` (0, 1, 2; -1: anywhere), the object inside the canvas."""
        s, m = self.size, self.margin
        lo, hi = r + 1, s - r - 1
        if band == 0:
            hi = min(hi, s / 3 - m)
        elif band == 1:
            lo, hi = max(lo, s / 3 + m), min(hi, 2 * s / 3 - m)
        elif band == 2:
            lo = max(lo, 2 * s / 3 + m)
        return lo, hi

    def _bands(self, position: str | None) -> tuple[int, int]:
        return {None: (-1, -1), "left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2),
                "center": (1, 1)}[position]

    def free(self, o: Obj, others: list[Obj]) -> bool:
        return all(abs(o.cx - p.cx) >= o.r + p.r + self.gap or abs(o.cy - p.cy) >= o.r + p.r + self.gap
                   for p in others)

    def place(self, color: str, shape: str, others: list[Obj], position: str | None = None,
              tries: int = 200, where=None) -> Obj | None:
        """A new object that overlaps none of ``others``; in ``position``'s region when given, and
        satisfying ``where(obj)`` when given. None when no place was found."""
        bx, by = self._bands(position)
        for _ in range(tries):
            r = self.radius()
            (x0, x1), (y0, y1) = self._range(bx, r), self._range(by, r)
            if x0 > x1 or y0 > y1:
                continue
            o = Obj(color, shape, self.rng.uniform(x0, x1), self.rng.uniform(y0, y1), r)
            if self.free(o, others) and (where is None or where(o)):
                return o
        return None

    def moved(self, o: Obj, position: str, others: list[Obj], tries: int = 200) -> Obj | None:
        """``o`` at a new place in ``position``'s region (same size and kind)."""
        bx, by = self._bands(position)
        (x0, x1), (y0, y1) = self._range(bx, o.r), self._range(by, o.r)
        if x0 > x1 or y0 > y1:
            return None
        for _ in range(tries):
            n = replace(o, cx=self.rng.uniform(x0, x1), cy=self.rng.uniform(y0, y1))
            if self.free(n, others):
                return n
        return None
