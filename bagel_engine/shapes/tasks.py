"""Tasks of the shapes world, drawn from the fixed templates with a ``random.Random``: text-to-image
prompts, edit instructions and questions, each with the scene(s) it describes and the
specification the judge checks.

``held_out`` says what to do with the held-out colour-shape pairs (``world.HELD_OUT``):

- ``"exclude"``: they never appear in a picture to generate (t2i pictures, edit targets): training
  data, and the in-distribution categories of the evaluation;
- ``"only"``: every t2i prompt names one of them (the evaluation's held-out category).

Edit inputs and questions may show them in either mode (the issue's contract).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from bagel_engine.shapes import world as shapes_world
from bagel_engine.shapes.world import Obj, Placer

Kind = tuple[str, str]
ALL_KINDS: tuple[Kind, ...] = tuple((c, s) for c in shapes_world.COLORS for s in shapes_world.SHAPES)
T2I_CATEGORIES = ("single", "position", "count", "two", "relation")
EDIT_CATEGORIES = ("recolor", "move", "remove", "add")
VQA_CATEGORIES = ("color", "shape", "count", "where", "yesno")
RELATIONS = {"to the left of": "left_of", "to the right of": "right_of", "above": "above", "below": "below"}


@dataclass(frozen=True)
class Anchor:
    """Where an expected object must be: at a point (``at``, it stays) or in a region (``region``)."""

    kind: Kind
    at: tuple[float, float] | None = None
    region: str | None = None


@dataclass
class Spec:
    """What a correct picture holds: exactly ``counts`` objects (colour and shape), an object of
    ``position[0]`` in region ``position[1]``, the relation ``(a, rel, b)`` between two centres,
    and (edits) ``anchors``."""

    counts: dict[Kind, int]
    position: tuple[Kind, str] | None = None
    relation: tuple[Kind, str, Kind] | None = None
    anchors: list[Anchor] = field(default_factory=list)


@dataclass
class T2ITask:
    category: str
    prompt: str
    scene: list[Obj]  # a picture that satisfies the prompt (training target)
    spec: Spec
    held_out: bool = False


@dataclass
class EditTask:
    category: str
    instruction: str
    source: list[Obj]
    target: list[Obj]
    spec: Spec


@dataclass
class VQATask:
    category: str
    question: str
    scene: list[Obj]
    answer: str  # the one right word


def _kinds(held_out: str) -> list[Kind]:
    if held_out == "exclude":
        return [k for k in ALL_KINDS if k not in shapes_world.HELD_OUT]
    return list(ALL_KINDS)


def _pick(rng: random.Random, kinds: list[Kind], n: int = 1) -> list[Kind]:
    return rng.sample(kinds, n)


# ----------------------------------------------------------------------------- text to image
def t2i_task(rng: random.Random, category: str | None = None, held_out: str = "exclude",
             size: int = shapes_world.CANVAS, new_color: str | None = None) -> T2ITask:
    """A prompt of ``category`` (random when None) and a scene that satisfies it. ``new_color`` (one of
    ``world.EXTRA_COLORS``): one object of the prompt has that colour."""
    for _ in range(100):
        cat = category or rng.choice(T2I_CATEGORIES)
        task = _t2i_attempt(rng, cat, held_out, Placer(rng, size), new_color)
        if task is not None:
            return task
    raise RuntimeError(f"could not place a {category} scene")


def _t2i_attempt(rng: random.Random, cat: str, held_out: str, placer: Placer,
                 new_color: str | None = None) -> T2ITask | None:
    kinds = _kinds(held_out)
    if new_color is not None:
        a = (new_color, rng.choice(shapes_world.SHAPES))
        b_choices = [k for k in kinds if k != a]
    elif held_out == "only":
        a = rng.choice(shapes_world.HELD_OUT)
        b_choices = [k for k in ALL_KINDS if k != a and k not in shapes_world.HELD_OUT]
    else:
        a = rng.choice(kinds)
        b_choices = [k for k in kinds if k != a]
    b = rng.choice(b_choices)
    if rng.random() < 0.5 and cat in ("two", "relation"):
        a, b = b, a  # the held-out pair is first or second
    objs: list[Obj] = []
    if cat == "single":
        o = placer.place(*a, objs)
        prompt, spec = shapes_world.phrase(a), Spec({a: 1})
        objs = [o] if o else []
    elif cat == "position":
        pos = rng.choice(shapes_world.POSITIONS)
        o = placer.place(*a, objs, position=pos)
        where = "in the center" if pos == "center" else f"on the {pos}"
        prompt, spec = f"{shapes_world.phrase(a)} {where}", Spec({a: 1}, position=(a, pos))
        objs = [o] if o else []
    elif cat == "count":
        n = rng.choice((2, 3))
        for _ in range(n):
            o = placer.place(*a, objs)
            if o is None:
                return None
            objs.append(o)
        prompt, spec = f"{shapes_world.NUMBERS[n]} {a[0]} {shapes_world.plural(a[1])}", Spec({a: n})
    elif cat == "two":
        oa = placer.place(*a, objs)
        ob = oa and placer.place(*b, [oa])
        objs = [oa, ob] if oa and ob else []
        prompt, spec = f"{shapes_world.phrase(a)} and {shapes_world.phrase(b)}", Spec({a: 1, b: 1})
    elif cat == "relation":
        words = rng.choice(list(RELATIONS))
        rel = RELATIONS[words]
        oa = placer.place(*a, objs)
        ob = oa and placer.place(*b, [oa], where=lambda o: _relation_holds(oa, rel, o, margin=placer.gap))
        objs = [oa, ob] if oa and ob else []
        prompt, spec = f"{shapes_world.phrase(a)} {words} {shapes_world.phrase(b)}", Spec({a: 1, b: 1}, relation=(a, rel, b))
    else:
        raise ValueError(f"unknown t2i category {cat!r}; choose one of {', '.join(T2I_CATEGORIES)}")
    if not objs or any(o is None for o in objs):
        return None
    return T2ITask(cat, prompt, objs, spec, held_out=held_out == "only")


def _relation_holds(a: Obj, rel: str, b: Obj, margin: float = 0.0) -> bool:
    """``a rel b`` between centres (with ``margin``: the boxes are clearly apart along the axis)."""
    need = (a.r + b.r + margin) if margin else 0.0
    if rel == "left_of":
        return b.cx - a.cx > need
    if rel == "right_of":
        return a.cx - b.cx > need
    if rel == "above":
        return b.cy - a.cy > need
    if rel == "below":
        return a.cy - b.cy > need
    raise ValueError(rel)


# ----------------------------------------------------------------------------- editing
def edit_task(rng: random.Random, category: str | None = None, held_out: str = "exclude",
              size: int = shapes_world.CANVAS) -> EditTask:
    for _ in range(200):
        cat = category or rng.choice(EDIT_CATEGORIES)
        task = _edit_attempt(rng, cat, held_out, Placer(rng, size))
        if task is not None:
            return task
    raise RuntimeError(f"could not make a {category} edit")


def _stay(o: Obj) -> Anchor:
    return Anchor(o.kind, at=(o.cx, o.cy))


def _edit_attempt(rng: random.Random, cat: str, held_out: str, placer: Placer) -> EditTask | None:
    allowed = _kinds(held_out)  # kinds a target may show
    n_source = 2 if cat == "remove" else 1 if cat == "add" else rng.choice((1, 2))
    source: list[Obj] = []
    shapes = rng.sample(shapes_world.SHAPES, n_source)  # distinct shapes: "the {shape}" names one object
    for shape in shapes:
        o = placer.place(rng.choice(list(shapes_world.COLORS)), shape, source)
        if o is None:
            return None
        source.append(o)
    i = rng.randrange(len(source))
    obj, others = source[i], source[:i] + source[i + 1:]
    if cat == "recolor":
        color = rng.choice([c for c in shapes_world.COLORS if c != obj.color])
        new = Obj(color, obj.shape, obj.cx, obj.cy, obj.r)
        target = others + [new]
        instruction = f"make the {obj.shape} {color}"
        anchors = [_stay(o) for o in target]
    elif cat == "move":
        pos = rng.choice([p for p in shapes_world.POSITIONS if p != shapes_world.region_of(obj.cx, obj.cy, placer.size)])
        new = placer.moved(obj, pos, others)
        if new is None:
            return None
        target = others + [new]
        where = "center" if pos == "center" else pos
        instruction = f"move the {obj.color} {obj.shape} to the {where}"
        anchors = [_stay(o) for o in others] + [Anchor(new.kind, region=pos)]
    elif cat == "remove":
        target = others
        instruction = f"remove the {obj.color} {obj.shape}"
        anchors = [_stay(o) for o in others]
    elif cat == "add":
        pos = rng.choice(shapes_world.POSITIONS)
        kind = rng.choice([k for k in allowed if k[1] != obj.shape])
        new = placer.place(*kind, source, position=pos)
        if new is None:
            return None
        target = source + [new]
        where = "in the center" if pos == "center" else f"on the {pos}"
        instruction = f"add {shapes_world.phrase(kind)} {where}"
        anchors = [_stay(obj), Anchor(kind, region=pos)]
    else:
        raise ValueError(f"unknown edit category {cat!r}; choose one of {', '.join(EDIT_CATEGORIES)}")
    if any(o.kind not in allowed for o in target):
        return None
    counts: dict[Kind, int] = {}
    for o in target:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    return EditTask(cat, instruction, source, target, Spec(counts, anchors=anchors))


# ----------------------------------------------------------------------------- questions
def vqa_task(rng: random.Random, category: str | None = None, size: int = shapes_world.CANVAS) -> VQATask:
    for _ in range(200):
        cat = category or rng.choice(VQA_CATEGORIES)
        task = _vqa_attempt(rng, cat, Placer(rng, size))
        if task is not None:
            return task
    raise RuntimeError(f"could not make a {category} question")


def _scene(placer: Placer, kinds: list[Kind], positions: list[str | None] | None = None) -> list[Obj] | None:
    objs: list[Obj] = []
    for k, kind in enumerate(kinds):
        o = placer.place(*kind, objs, position=positions[k] if positions else None)
        if o is None:
            return None
        objs.append(o)
    return objs


def _vqa_attempt(rng: random.Random, cat: str, placer: Placer) -> VQATask | None:
    colors = list(shapes_world.COLORS)
    n = rng.choice((1, 2))
    if cat == "color":
        shapes = rng.sample(shapes_world.SHAPES, n)
        kinds = [(rng.choice(colors), s) for s in shapes]
        scene = _scene(placer, kinds)
        return scene and VQATask(cat, f"What color is the {shapes[0]}?", scene, kinds[0][0])
    if cat == "shape":
        cs = rng.sample(colors, n)
        kinds = [(c, rng.choice(shapes_world.SHAPES)) for c in cs]
        scene = _scene(placer, kinds)
        return scene and VQATask(cat, f"What shape is the {cs[0]} object?", scene, kinds[0][1])
    if cat == "count":
        shape = rng.choice(shapes_world.SHAPES)
        count = rng.choice((1, 2, 3))
        kinds = [(rng.choice(colors), shape) for _ in range(count)]
        if rng.random() < 0.5:
            kinds.append((rng.choice(colors), rng.choice([s for s in shapes_world.SHAPES if s != shape])))
        rng.shuffle(kinds)
        scene = _scene(placer, kinds)
        return scene and VQATask(cat, f"How many {shapes_world.plural(shape)} are there?", scene, shapes_world.NUMBERS[count])
    if cat == "where":
        pos = rng.choice(shapes_world.POSITIONS)
        kinds = rng.sample(ALL_KINDS, n)
        scene = _scene(placer, kinds, [pos] + [None] * (n - 1))
        c, s = kinds[0]
        return scene and VQATask(cat, f"Where is the {c} {s}?", scene, pos)
    if cat == "yesno":
        kinds = rng.sample(ALL_KINDS, n)
        if rng.random() < 0.5:
            asked, answer = rng.choice(kinds), "yes"
        else:  # a near miss: a colour or a shape of the scene, not together
            c, s = rng.choice(kinds)
            near = [k for k in ALL_KINDS if k not in kinds and (k[0] == c or k[1] == s)]
            asked, answer = rng.choice(near), "no"
        scene = _scene(placer, kinds)
        return scene and VQATask(cat, f"Is there a {asked[0]} {asked[1]}?", scene, answer)
    raise ValueError(f"unknown question category {cat!r}; choose one of {', '.join(VQA_CATEGORIES)}")
