"""The results manifest, written so that a kill at any moment loses nothing finished.

- Files are written whole to a temp file in the same folder and renamed over the target
  (:func:`atomic_write_bytes`), so a reader sees the old file or the new one, never half of one.
- While a job runs, each process appends its finished rows to its own part file
  (``manifest.part-<shard>-r<rank>of<world>.jsonl``), one complete line per row, flushed and
  fsynced. A kill can leave at most a truncated last line; readers skip it and the next writer
  cuts it off before appending.
- At the end one process merges everything it finds (the merged manifest and every part) into
  ``manifest.jsonl`` and ``manifest.csv`` (``manifest.shard<K>of<N>.*`` for a ``--shard`` job),
  keeping the latest record per row id, then deletes its own job's parts.

A resumed job reads all of it to know which rows are finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from bagel_engine.params import DiskFull, disk_full, is_disk_full

TMP_MARK = ".bagel-tmp"
HOST_TAG = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())  # temp names: .<name>.<pid>@<host>.bagel-tmp
TMP_RE = re.compile(r"\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_-]+))?" + re.escape(TMP_MARK) + "$")
PART_RE = re.compile(r"^manifest\.part-(?P<tag>[A-Za-z0-9]+)-r(?P<rank>\d+)of(?P<world>\d+)"
                     r"(?:-join(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)x(?P<token>[0-9a-f]+))?\.jsonl$")
CSV_COLUMNS = ("id", "index", "status", "output", "text", "think", "answer", "error", "seed", "prompt", "inputs",
               "params", "timings", "source", "rank", "finished_at")


# ----------------------------------------------------------------------------- atomic files
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    # (a thread's own name too: two jobs of one process may write the same file at once)
    tmp = path.with_name(f".{path.name}.t{threading.get_ident()}.{os.getpid()}@{HOST_TAG}{TMP_MARK}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise disk_full(e, str(path)) from e
        raise
    _fsync_dir(path.parent)


def save_image(image, path: Path, meta: dict | None = None) -> None:
    """Write ``image`` atomically in the format its suffix names (``.png``, ``.jpg`` / ``.jpeg``, ``.webp``),
    creating sub-folders; a PNG carries ``meta`` (prompt, seed, knobs, model) in its text chunks."""
    from bagel_engine.image_metadata import SUFFIX_FORMATS, encode_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, encode_image(image, SUFFIX_FORMATS.get(path.suffix.lower(), "PNG"), meta))


def remove_temp_files(folder: Path) -> int:
    """Delete the temp files that killed jobs left behind (never a live writer's); returns how many."""
    from bagel_engine.batch.lock import HOST, holder_alive

    count = 0
    for f in Path(folder).glob(f".*{TMP_MARK}"):
        m = TMP_RE.search(f.name)
        if m and holder_alive(HOST if m["host"] in (None, HOST_TAG) else m["host"], int(m["pid"])):
            continue
        try:
            f.unlink()
            count += 1
        except OSError:
            pass
    return count


# ----------------------------------------------------------------------------- names
def shard_tag(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"s{shard[0]}of{shard[1]}"


def manifest_stem(shard: tuple[int, int] | None) -> str:
    return "manifest" if shard is None else f"manifest.shard{shard[0]}of{shard[1]}"


def part_path(folder: Path, shard: tuple[int, int] | None, rank: int, world: int, join_token: str | None = None) -> Path:
    """A process's part file; a job that joined another (``--join``) has its own, named by pid, host and token."""
    joiner = f"-join{os.getpid()}@{HOST_TAG}x{join_token}" if join_token else ""
    return Path(folder) / f"manifest.part-{shard_tag(shard)}-r{rank}of{world}{joiner}.jsonl"


def live_joiner(path: Path) -> bool:
    """Whether ``path`` is the part file of a joined job that may still be writing it."""
    from bagel_engine.batch.lock import HOST, holder_alive

    m = PART_RE.match(path.name)
    if not m or not m.group("pid"):
        return False
    return holder_alive(HOST if m["host"] == HOST_TAG else m["host"], int(m["pid"]))


# ----------------------------------------------------------------------------- records
def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one JSONL manifest; lines that do not parse (a truncated last line) are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "id" in record and "status" in record:
            records.append(record)
    return records


def manifest_files(folder: Path) -> list[Path]:
    """Every manifest file in ``folder``: merged ones first, then parts."""
    folder = Path(folder)
    merged = sorted(p for p in folder.glob("manifest*.jsonl") if not PART_RE.match(p.name))
    parts = sorted(p for p in folder.glob("manifest.part-*.jsonl") if PART_RE.match(p.name))
    return merged + parts


def latest_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Row id -> its latest record (by ``finished_at``) over all manifest files in ``folder``."""
    latest: dict[str, dict[str, Any]] = {}
    for path in manifest_files(folder):
        for record in read_records(path):
            key = str(record["id"])
            old = latest.get(key)
            if old is None or finished_time(record) >= finished_time(old):
                latest[key] = record
    return latest


def finished_time(record: dict[str, Any]) -> float:
    """A record's ``finished_at`` as epoch seconds: ISO-8601 text, or the epoch float of older manifests."""
    value = record.get("finished_at")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0


class PartWriter:
    """Appends complete records to one process's part file, each line flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_partial_line()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _cut_partial_line(self) -> None:
        """A killed writer may have left a line without its newline: cut it before appending."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "r+b") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=_jsonable) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        view = memoryview(line)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as e:  # no half line left behind: the row is simply not recorded
            os.ftruncate(self._fd, size)
            if is_disk_full(e):
                raise disk_full(e, f"the record of row {record.get('id')!r} to {self.path}") from e
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def now() -> str:
    """The time a row finished, ISO-8601 in UTC to the microsecond (``2026-12-02T18:40:05.123456+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- merge
def write_manifest(folder: Path, stem: str, records: Iterable[dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``<stem>.jsonl`` and ``<stem>.csv`` atomically; returns both paths."""
    folder = Path(folder)
    records = list(records)
    jsonl = "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in records)
    out_jsonl = folder / f"{stem}.jsonl"
    atomic_write_bytes(out_jsonl, jsonl.encode("utf-8"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        row = {}
        for c in CSV_COLUMNS:
            value = r.get(c)
            if isinstance(value, (dict, list)):
                value = json.dumps(value, ensure_ascii=False, default=_jsonable)
            row[c] = "" if value is None else value
        writer.writerow(row)
    out_csv = folder / f"{stem}.csv"
    atomic_write_bytes(out_csv, buffer.getvalue().encode("utf-8"))
    return out_jsonl, out_csv


def write_results(folder: Path, name: str, rows: list[dict[str, str]]) -> Path:
    """diffgentor's results table: each row's input columns plus ``output_image`` (the picture's path in the
    output folder; empty for a row that failed or is not finished), written atomically."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(c for c in row if c != "output_image"))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "output_image"], extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(folder) / name
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return path


def merge(folder: Path, keys: list[str], shard: tuple[int, int] | None, own: Path | None = None,
          joined: bool = False) -> list[dict[str, Any]]:
    """Merge every record found for ``keys`` (in that order) into the job's manifest, then delete
    the job's part files: never a live joined job's (``--join``: it is still writing), and for a job that
    joined another (``joined``) only its ``own`` (the holder is still writing its parts). Returns the
    merged records (rows never finished are left out)."""
    folder = Path(folder)
    latest = latest_records(folder)
    records = [latest[k] for k in keys if k in latest]
    write_manifest(folder, manifest_stem(shard), records)
    tag = shard_tag(shard)
    for path in folder.glob("manifest.part-*.jsonl"):
        m = PART_RE.match(path.name)
        if not m or m.group("tag") != tag:
            continue
        if path != own and (live_joiner(path) or (joined and not m.group("pid"))):
            continue
        try:
            path.unlink()
        except OSError:
            pass
    return records
