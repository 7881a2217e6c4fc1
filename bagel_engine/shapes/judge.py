"""The programmatic judge of the shapes world: what objects a picture holds, and whether a
picture or an answer is right.

Detection, for a picture of any size:

1. Every pixel is explained as a blend ``white + alpha * (colour - white)`` of the background and
   the palette colour whose blend line passes nearest to it (so the soft edge of a blurred blue
   object stays blue instead of looking purple). A pixel at least half-way to its colour
   (``alpha >= 0.5``) and close to that line belongs to that colour; a pixel far from white that no
   blend explains is *stray*.
2. Connected components (8-neighbours) of each colour's pixels are candidate objects; specks
   smaller than a tenth of the smallest object are stray too.
3. A component's shape comes from how it fills its bounding box, overall and in its top and bottom
   quarters (square: full everywhere; triangle, apex up: empty top, full bottom; circle: the same
   partial fill at top and bottom); its centre is the centre of the box (as in ``world``).

A picture with more stray pixels than 3 % of its area, or a component of no known shape or size,
is not a picture of the shapes world: noise is rejected, never read as objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bagel_engine.shapes import world as shapes_world
from bagel_engine.shapes.tasks import Spec, VQATask, _relation_holds

Kind = tuple[str, str]
STRAY_LIMIT = 0.03  # of the picture's area
STAY_TOLERANCE = 0.10  # of the side: how far an object that "stays" may move


@dataclass
class Found:
    color: str
    shape: str | None  # None: no known shape
    cx: float
    cy: float
    w: int
    h: int
    area: int

    @property
    def kind(self) -> Kind:
        return self.color, self.shape or "?"


@dataclass
class Detection:
    objects: list[Found]
    stray: float  # fraction of the picture's pixels
    size: tuple[int, int]  # (width, height)
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems

    def kinds(self) -> dict[Kind, int]:
        out: dict[Kind, int] = {}
        for o in self.objects:
            out[o.kind] = out.get(o.kind, 0) + 1
        return out

    def region(self, o: Found) -> str | None:
        w, h = self.size
        return shapes_world.region_of(o.cx * shapes_world.CANVAS / w, o.cy * shapes_world.CANVAS / h, shapes_world.CANVAS)


def _labels(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8-neighbours) of a boolean mask, as arrays of flat indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    flat = mask.ravel()
    out = []
    for start in np.flatnonzero(flat):
        if seen.flat[start]:
            continue
        stack, members = [start], []
        seen.flat[start] = True
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, w)
            for dy in (-1, 0, 1):
                yy = y + dy
                if yy < 0 or yy >= h:
                    continue
                for dx in (-1, 0, 1):
                    xx = x + dx
                    if 0 <= xx < w:
                        q = yy * w + xx
                        if flat[q] and not seen.flat[q]:
                            seen.flat[q] = True
                            stack.append(q)
        out.append(np.array(members))
    return out


def _shape(box: np.ndarray) -> str | None:
    """The shape of a component from its bounding box's filled pixels (True)."""
    h, w = box.shape
    if h < 3 or w < 3 or max(h, w) > 2.0 * min(h, w):
        return None
    q = max(1, h // 4)
    fill, top, bottom = box.mean(), box[:q].mean(), box[-q:].mean()
    if top > 0.85 and bottom > 0.85 and fill > 0.88:
        return "square"
    if bottom - top > 0.35 and 0.3 < fill < 0.7:
        return "triangle"
    if abs(bottom - top) < 0.25 and 0.55 < fill < 0.9:
        return "circle"
    return None


def detect(image: Image.Image, extra_colors: tuple[str, ...] = ()) -> Detection:
    """The objects of a picture (see the module doc); ``extra_colors``: names of ``world.EXTRA_COLORS``
    that may appear too."""
    colors = shapes_world.palette(extra_colors)
    names, palette = list(colors), np.array(list(colors.values()), np.float32)
    rgb = np.asarray(image.convert("RGB"), np.float32)
    h, w, _ = rgb.shape
    d = 255.0 - rgb.reshape(-1, 3)  # offset from white, (N, 3)
    line = 255.0 - palette  # (colours, 3): white minus colour
    alpha = (d @ line.T) / (line * line).sum(1)  # (N, 6)
    alpha_c = np.clip(alpha, 0.0, 1.0)
    residual = np.linalg.norm(d[:, None, :] - alpha_c[:, :, None] * line[None], axis=2)  # (N, 6)
    best = residual.argmin(1)
    a = alpha_c[np.arange(len(d)), best]
    r = residual[np.arange(len(d)), best]
    far = np.abs(d).max(1) > 60  # visibly not white
    explained = r < 40 + 30 * a  # blends of one colour with white (more slack near the full colour)
    member = far & explained & (a >= 0.5)
    stray = far & ~member & ~(explained & (a < 0.5))  # half-way blends are edges, not stray
    stray_count = int(stray.sum())
    side = min(w, h)
    min_area = max(4, int(0.1 * 2 * (shapes_world.SIZE_RANGE[0] * side) ** 2))  # a tenth of the smallest triangle
    objects: list[Found] = []
    problems: list[str] = []
    for ci, name in enumerate(names):
        mask = (member & (best == ci)).reshape(h, w)
        for comp in _labels(mask):
            if len(comp) < min_area:
                stray_count += len(comp)
                continue
            ys, xs = np.divmod(comp, w)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            shape = _shape(mask[y0:y1, x0:x1])
            bw, bh = x1 - x0, y1 - y0
            lo, hi = 2 * 0.06 * side, 2 * 0.22 * side  # sides of 0.10-0.16 objects, with slack
            if not (lo <= max(bw, bh) <= hi):
                shape = None
            objects.append(Found(name, shape, (x0 + x1) / 2, (y0 + y1) / 2, bw, bh, len(comp)))
    stray_frac = stray_count / (w * h)
    if stray_frac > STRAY_LIMIT:
        problems.append(f"{100 * stray_frac:.1f}% stray pixels (noise or colours outside the palette)")
    unknown = [o for o in objects if o.shape is None]
    if unknown:
        problems.append(f"{len(unknown)} blob(s) of no known shape or size")
    return Detection(objects, stray_frac, (w, h), problems)


# ----------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    correct: bool
    reason: str = ""


def _kinds_text(kinds: dict[Kind, int]) -> str:
    return ", ".join(f"{n} {c} {s}" for (c, s), n in sorted(kinds.items())) or "nothing"


def judge_picture(image: Image.Image, spec: Spec, extra_colors: tuple[str, ...] = ()) -> Verdict:
    """Whether ``image`` holds exactly the objects of ``spec`` with its position, relation and anchors."""
    det = detect(image, extra_colors)
    if not det.valid:
        return Verdict(False, "; ".join(det.problems))
    found = det.kinds()
    if found != spec.counts:
        return Verdict(False, f"found {_kinds_text(found)}; expected {_kinds_text(spec.counts)}")
    by_kind = {o.kind: o for o in det.objects}
    scale = shapes_world.CANVAS / min(det.size)
    if spec.position is not None:
        kind, pos = spec.position
        got = det.region(by_kind[kind])
        if got != pos:
            return Verdict(False, f"the {kind[0]} {kind[1]} is {got or 'in a corner'}, not {pos}")
    if spec.relation is not None:
        a, rel, b = spec.relation
        oa, ob = by_kind[a], by_kind[b]
        pa = shapes_world.Obj(*a, oa.cx * scale, oa.cy * scale, 0)
        pb = shapes_world.Obj(*b, ob.cx * scale, ob.cy * scale, 0)
        if not _relation_holds(pa, rel, pb):
            return Verdict(False, f"the {a[0]} {a[1]} is not {rel.replace('_', ' ')} the {b[0]} {b[1]}")
    for anchor in spec.anchors:
        o = by_kind[anchor.kind]
        if anchor.region is not None and det.region(o) != anchor.region:
            return Verdict(False, f"the {anchor.kind[0]} {anchor.kind[1]} is {det.region(o) or 'in a corner'}, "
                                  f"not {anchor.region}")
        if anchor.at is not None:
            dist = float(np.hypot(o.cx * scale - anchor.at[0], o.cy * scale - anchor.at[1]))
            if dist > STAY_TOLERANCE * shapes_world.CANVAS:
                return Verdict(False, f"the {anchor.kind[0]} {anchor.kind[1]} moved by {dist:.1f} px")
    return Verdict(True)


_COMPETITORS = {
    "color": [[c] for c in shapes_world.COLORS],
    "shape": [[s, shapes_world.plural(s)] for s in shapes_world.SHAPES],
    "count": [["one", "1"], ["two", "2"], ["three", "3"]],
    "where": [["left"], ["right"], ["top"], ["bottom"], ["center", "centre", "middle"]],
    "yesno": [["yes"], ["no"]],
}


def judge_answer(text: str | None, task: VQATask) -> Verdict:
    """Right when the answer holds the right word (or its synonym) and no competing word."""
    words = set(re.findall(r"[a-z0-9]+", (text or "").lower()))
    groups = _COMPETITORS[task.category]
    right = next(g for g in groups if task.answer in g)
    if not words & set(right):
        return Verdict(False, f"{text!r} does not say {task.answer!r}")
    others = [w for g in groups if g is not right for w in g if w in words]
    if others:
        return Verdict(False, f"{text!r} also says {', '.join(others)}")
    return Verdict(True)
