"""The shapes world's judge: right on drawn pictures (clean, blurred, noisy), wrong on wrong ones,
and never fooled by noise."""

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bagel_engine.shapes import tasks as T
from bagel_engine.shapes import world as W
from bagel_engine.shapes.judge import detect, judge_answer, judge_picture


def corrupt(img: Image.Image, mode: str, rng: random.Random) -> Image.Image:
    if mode == "clean":
        return img
    if mode == "blurred":
        return img.filter(ImageFilter.GaussianBlur(0.8))
    a = np.asarray(img, np.float32) + np.random.default_rng(rng.randrange(1 << 30)).normal(0, 12, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["clean", "blurred", "noisy"])
def test_drawn_pictures_are_judged_right(mode):
    rng = random.Random(f"judge-{mode}")
    verdicts = []
    for cat in T.T2I_CATEGORIES:
        for _ in range(30):
            t = T.t2i_task(rng, cat)
            verdicts.append(judge_picture(corrupt(W.draw(t.scene), mode, rng), t.spec).correct)
    for cat in T.EDIT_CATEGORIES:
        for _ in range(30):
            e = T.edit_task(rng, cat)
            verdicts.append(judge_picture(corrupt(W.draw(e.target), mode, rng), e.spec).correct)
    assert sum(verdicts) / len(verdicts) >= 0.98


def test_pictures_at_128_pixels_are_judged_right():
    rng = random.Random(3)
    verdicts = []
    for cat in T.T2I_CATEGORIES:
        for _ in range(10):
            t = T.t2i_task(rng, cat, size=128)
            verdicts.append(judge_picture(W.draw(t.scene, 128), t.spec).correct)
    assert sum(verdicts) / len(verdicts) >= 0.98


def test_noise_and_blank_pictures_are_rejected():
    rng = random.Random(0)
    noise = np.random.default_rng(0)
    for _ in range(40):
        t = T.t2i_task(rng)
        uniform = Image.fromarray(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        assert not judge_picture(uniform, t.spec).correct
        # noise around a grey mean, the picture an untrained model draws
        grey = Image.fromarray(np.clip(noise.normal(150, 40, (64, 64, 3)), 0, 255).astype(np.uint8))
        assert not judge_picture(grey, t.spec).correct
        assert not judge_picture(Image.new("RGB", (64, 64), "white"), t.spec).correct
    assert not detect(Image.fromarray(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8))).valid


def test_wrong_pictures_are_judged_wrong():
    rng = random.Random(1)
    for _ in range(50):
        t = T.t2i_task(rng, "position")
        (kind, pos) = t.spec.position
        o = t.scene[0]
        # the right object in the mirrored place
        other = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}.get(pos)
        if other:
            moved = W.Placer(rng).moved(o, other, [])
            assert not judge_picture(W.draw([moved]), t.spec).correct
        # another colour, another shape
        color = next(c for c in W.COLORS if c != o.color)
        assert not judge_picture(W.draw([W.Obj(color, o.shape, o.cx, o.cy, o.r)]), t.spec).correct
        shape = next(s for s in W.SHAPES if s != o.shape)
        assert not judge_picture(W.draw([W.Obj(o.color, shape, o.cx, o.cy, o.r)]), t.spec).correct
    for _ in range(30):
        t = T.t2i_task(rng, "count")
        assert not judge_picture(W.draw(t.scene[:-1]), t.spec).correct  # one too few
        e = T.edit_task(rng, "recolor")
        assert not judge_picture(W.draw(e.source), e.spec).correct  # the edit not done


def test_relation_verdict_follows_the_centres():
    a = W.Obj("red", "circle", 15, 32, 7)
    b = W.Obj("blue", "square", 48, 32, 7)
    spec = T.Spec({("red", "circle"): 1, ("blue", "square"): 1}, relation=(("red", "circle"), "left_of", ("blue", "square")))
    assert judge_picture(W.draw([a, b]), spec).correct
    assert not judge_picture(W.draw([W.Obj("red", "circle", 48, 32, 7), W.Obj("blue", "square", 15, 32, 7)]), spec).correct


@pytest.mark.parametrize("category,answer,text,ok", [
    ("color", "red", "red", True),
    ("color", "red", "The triangle is red.", True),
    ("color", "red", "red or blue", False),
    ("color", "red", "blue", False),
    ("count", "two", "2", True),
    ("count", "two", "There are two.", True),
    ("count", "two", "two or three", False),
    ("shape", "circle", "circles", True),
    ("where", "center", "in the middle", True),
    ("where", "left", "top left", False),
    ("yesno", "no", "No.", True),
    ("yesno", "no", "", False),
])
def test_answers(category, answer, text, ok):
    task = T.VQATask(category, "?", [], answer)
    assert judge_answer(text, task).correct is ok


def test_held_out_pairs_never_in_pictures_to_generate():
    rng = random.Random(5)
    for _ in range(300):
        t = T.t2i_task(rng)
        assert not any(W.is_held_out(*o.kind) for o in t.scene)
        e = T.edit_task(rng)
        assert not any(W.is_held_out(*o.kind) for o in e.target)
    held = [T.t2i_task(rng, held_out="only") for _ in range(50)]
    assert all(any(W.is_held_out(*o.kind) for o in t.scene) for t in held)


def test_drawn_scenes_follow_the_world_rules():
    rng = random.Random(7)
    for _ in range(200):
        t = T.t2i_task(rng)
        for o in t.scene:
            assert 0.10 * W.CANVAS <= o.r <= 0.16 * W.CANVAS
            assert o.r <= o.cx <= W.CANVAS - o.r and o.r <= o.cy <= W.CANVAS - o.r
        if t.spec.position:
            assert W.region_of(t.scene[0].cx, t.scene[0].cy) == t.spec.position[1]
        for i, a in enumerate(t.scene):  # no overlap
            for b in t.scene[i + 1:]:
                assert abs(a.cx - b.cx) >= a.r + b.r or abs(a.cy - b.cy) >= a.r + b.r
