"""Training rows whose task would be a guess are bad rows with the reason, never trained as t2i."""

import json
import shutil
from pathlib import Path

import pytest

from bagel_engine.batch.reader import read_rows
from bagel_engine.params import BagelInputError
from bagel_engine.train.data import row_sample

DATA = Path(__file__).parent / "data" / "train"


def rows(tmp_path, *items):
    shutil.copy(DATA / "red_circle.png", tmp_path / "a.png")
    shutil.copy(DATA / "blue_circle.png", tmp_path / "b.png")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return read_rows(path)


@pytest.mark.parametrize("row,reason", [
    ({"image": "a.png", "question": "What color?"}, "question without an answer"),
    ({"image": "a.png", "instruction": "make it blue"}, "without the edited image"),
    ({"image": "a.png", "image_2": "b.png", "prompt": "two circles"}, "not a t2i row"),
])
def test_rows_left_to_a_guess_are_bad(tmp_path, row, reason):
    (r,) = rows(tmp_path, row)
    with pytest.raises(BagelInputError, match=reason):
        row_sample(r)
    if "image_2" not in row:  # said outright, the same row is text to image
        assert row_sample(r, "t2i").has_loss


def test_clear_rows_keep_their_task(tmp_path):
    t2i, edit, vqa = rows(tmp_path, {"image": "a.png", "prompt": "a red circle"},
                          {"image": "a.png", "instruction": "make it blue", "output_image": "b.png"},
                          {"image": "a.png", "question": "What color?", "answer": "red"})
    assert len(row_sample(t2i).segments) == 2
    assert len(row_sample(edit).segments) == 4
    assert row_sample(vqa).segments[-1].text == "red"


def test_the_stream_shuffles_once_per_epoch_and_keeps_the_order(tmp_path, monkeypatch):
    import random

    from bagel_engine.batch.reader import Row
    from bagel_engine.train.data import DataStream

    rows = [Row(position=i, source=Path("x.jsonl"), line=i + 1, data={"text": f"row {i}"}) for i in range(50)]
    shuffles = []
    real = random.Random.shuffle
    monkeypatch.setattr(random.Random, "shuffle", lambda self, x: shuffles.append(1) or real(self, x))
    stream = DataStream(rows, packer=None, max_tokens=64, seed=3, rank=1, world=2)
    first = [stream._share(0) for _ in range(10)]
    expected = list(range(50))
    real(random.Random(3), expected)
    assert [r.position for r in first[0]] == expected[1::2] and all(s is first[0] for s in first)
    stream._share(1)
    assert len(shuffles) == 2  # one per epoch, however many samples are drawn
