"""What the official benchmark suites share: the ranks' prompt ranges, the bounding-box crop of every saved
picture, and the record of bad inputs (``OUT/bad_rows.jsonl``; ``bad_rows.rank{r}.jsonl`` for rank r > 0)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

from bagel_engine.batch.manifest import now

log = logging.getLogger(__name__)


def rank_range(total: int, rank: int, world: int) -> range:
    """The official split: contiguous ranges of ceil(total / world) prompts."""
    per = (total + world - 1) // world
    return range(min(rank * per, total), min(rank * per + per, total))


def cropped_png(image) -> bytes:
    """The picture cropped to its bounding box (``getbbox``, the official scripts' crop) as PNG bytes; an
    all-black picture (no box) is kept whole."""
    box = image.getbbox()
    if box is not None:
        image = image.crop(box)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def record_bad(out: Path, rank: int, where, error: str) -> None:
    """Add a bad input to the record, once (a rerun meets it again and does not repeat it)."""
    path = Path(out) / ("bad_rows.jsonl" if rank == 0 else f"bad_rows.rank{rank}.jsonl")
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                seen = json.loads(line)
            except ValueError:
                continue
            if seen.get("index") == where and seen.get("error") == error:
                return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"index": where, "error": error, "finished_at": now()}) + "\n")


def run_items(items: list, indexes, out: Path, rank: int, done: Callable[[Any], bool], make: Callable[[int, Any], None],
              progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """The loop every suite runs over the items a rank owns: an item that is a string (why it cannot be used) is
    recorded as bad, one whose outputs exist (``done``) is skipped, the others are made (``make(index, item)``; a
    BagelInputError / ValueError is recorded and the run goes on). The counts."""
    indexes = list(indexes)
    counts = {"prompts": len(indexes), "generated": 0, "skipped": 0, "failed": 0}
    for finished, index in enumerate(indexes, 1):
        item = items[index]
        if isinstance(item, str):
            record_bad(out, rank, index, item)
            counts["failed"] += 1
        elif done(item):
            counts["skipped"] += 1
        else:
            try:
                make(index, item)
                counts["generated"] += 1
            except ValueError as e:  # BagelInputError included
                log.warning("item %d failed: %s", index, e)
                record_bad(out, rank, index, str(e))
                counts["failed"] += 1
        if progress:
            progress(finished, len(indexes))
    return counts


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line; a last line cut by a kill is closed first, so the new record stays whole."""
    import json
    from pathlib import Path

    path = Path(path)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                line = "\n" + line
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def parse_python(path, option: str):
    """The syntax tree of a benchmark's Python file the user gave as ``option`` (read, never run)."""
    import ast
    from pathlib import Path

    from bagel_engine.params import BagelInputError

    try:
        return ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as e:
        raise BagelInputError(f"{option} {path}: cannot read it as Python ({e})") from None
