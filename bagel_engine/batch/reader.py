"""Reading batch inputs: CSV, JSONL (or a JSON list) and Parquet, one file or a folder of them.

Every row becomes a :class:`Row` with normalized column names (lower case, ``_`` for ``-`` and
spaces), blank cells as ``None``, its position across all files (0-based, in sorted file order)
and the file it came from (relative image paths resolve against that file's folder). A line that
cannot be parsed becomes a row with ``error`` set, so the job records it as failed and goes on.

Parquet columns holding bytes (embedded images) are read lazily, one row group at a time, so a
file of many large images is never held in memory at once.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bagel_engine.knobs import normalize_column
from bagel_engine.params import BagelInputError

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Row:
    position: int  # 0-based position across all input files
    source: Path  # the file it came from
    line: int  # 1-based line (CSV/JSONL) or row number (Parquet) in that file, for messages
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the line itself could not be read
    base: Path | None = None  # where relative image paths point (default: the file's folder)

    @property
    def folder(self) -> Path:
        return self.base if self.base is not None else self.source.parent

    def get(self, column: str) -> Any:
        value = self.data.get(column)
        if isinstance(value, LazyCell):
            value = value.load()
        return None if _blank(value) else value

    def where(self) -> str:
        return f"{self.source.name}:{self.line}"

    def cells_as_text(self) -> dict[str, str]:
        """The row's cells as a results table shows them: lists and objects as JSON, embedded bytes left
        out (a ``{"bytes", "path"}`` image as its path)."""
        out = {}
        for column, value in self.data.items():
            if isinstance(value, LazyCell) or isinstance(value, (bytes, bytearray)):
                value = None
            elif isinstance(value, dict) and "bytes" in value:
                value = value.get("path")
            if isinstance(value, (dict, list)):
                value = json.dumps(value, ensure_ascii=False, default=str)
            out[column] = "" if value is None else str(value)
        return out


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def input_files(path: Path, exclude: Path | None = None) -> list[Path]:
    """The input files under ``path`` (itself when a file), sorted, skipping ``exclude`` (the output folder)."""
    path = Path(path)
    if not path.exists():
        raise BagelInputError(f"input not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise BagelInputError(
                f"cannot read {path}: expected one of {', '.join(sorted(SUFFIXES))} (CSV, JSONL or Parquet)")
        return [path]
    excluded = exclude.resolve() if exclude is not None else None
    files = []
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in SUFFIXES or f.name.startswith("."):
            continue
        if excluded is not None and (excluded == f.resolve().parent or excluded in f.resolve().parents):
            continue
        files.append(f)
    if not files:
        raise BagelInputError(f"no CSV, JSONL or Parquet files in {path}")
    return files


def read_rows(path: Path, exclude: Path | None = None) -> list[Row]:
    """All rows of the input (a file or a folder of files), in order."""
    rows: list[Row] = []
    for file in input_files(path, exclude):
        kind = SUFFIXES[file.suffix.lower()]
        reader = {"csv": _read_csv, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[kind]
        try:
            for line, data, error in reader(file):
                rows.append(Row(len(rows), file, line, data, error))
        except UnicodeDecodeError as e:
            raise BagelInputError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise BagelInputError(f"{file}: not a readable CSV file ({e})") from None
    return rows


def _normalize(record: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key is None:  # CSV cells beyond the header
            continue
        name = normalize_column(key)
        if name not in out or _blank(out[name]):
            out[name] = None if _blank(value) else value
    return out


def _read_csv(file: Path) -> Iterator[tuple[int, dict, str | None]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for record in reader:
            # reader.line_num is the physical line where this record ended
            yield reader.line_num, _normalize(record), None


def _read_jsonl(file: Path) -> Iterator[tuple[int, dict, str | None]]:
    with open(file, encoding="utf-8-sig") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield number, {}, f"{file.name}:{number}: not valid JSON ({e.msg})"
                continue
            if not isinstance(record, dict):
                yield number, {}, f"{file.name}:{number}: expected a JSON object, got {type(record).__name__}"
                continue
            yield number, _normalize(record), None


def _read_json(file: Path) -> Iterator[tuple[int, dict, str | None]]:
    try:
        records = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise BagelInputError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(records, dict) and isinstance(records.get("rows"), list):
        records = records["rows"]
    if not isinstance(records, list):
        raise BagelInputError(f"{file}: expected a JSON list of objects (or JSON Lines in a .jsonl file)")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            yield number, {}, f"{file.name}: item {number}: expected a JSON object, got {type(record).__name__}"
        else:
            yield number, _normalize(record), None


# ----------------------------------------------------------------------------- Parquet
def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BagelInputError(
            "reading Parquet needs pyarrow: pip install 'bagel-engine[data]' (or pip install pyarrow)") from None
    return pq


def _holds_bytes(arrow_type) -> bool:
    import pyarrow as pa

    t = arrow_type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _holds_bytes(t.value_type)
    if pa.types.is_struct(t):
        return any(_holds_bytes(t.field(i).type) for i in range(t.num_fields))
    return False


class _ParquetBytes:
    """Reads the byte columns of one Parquet file on demand, caching one row group."""

    def __init__(self, file: Path, columns: list[str]):
        self.file, self.columns = file, columns
        self._pf = None
        self._starts: list[int] = []
        self._cached: tuple[int, dict[str, list]] | None = None

    def value(self, row: int, column: str) -> Any:
        if self._pf is None:
            self._pf = _pyarrow().ParquetFile(self.file)
            start, self._starts = 0, []
            for i in range(self._pf.num_row_groups):
                self._starts.append(start)
                start += self._pf.metadata.row_group(i).num_rows
        group = max(i for i, s in enumerate(self._starts) if s <= row)
        if self._cached is None or self._cached[0] != group:
            table = self._pf.read_row_group(group, columns=self.columns)
            self._cached = (group, {c: table.column(c).to_pylist() for c in self.columns})
        return self._cached[1][column][row - self._starts[group]]


@dataclass
class LazyCell:
    reader: _ParquetBytes
    row: int
    column: str

    def load(self) -> Any:
        return self.reader.value(self.row, self.column)


def _read_parquet(file: Path) -> Iterator[tuple[int, dict, str | None]]:
    pq = _pyarrow()
    try:
        pf = pq.ParquetFile(file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
        raise BagelInputError(f"{file}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    byte_cols = [f.name for f in schema if _holds_bytes(f.type)]
    plain_cols = [f.name for f in schema if f.name not in byte_cols]
    lazy = _ParquetBytes(file, byte_cols)
    plain = pf.read(columns=plain_cols).to_pylist() if plain_cols else [{} for _ in range(pf.metadata.num_rows)]
    for i, record in enumerate(plain):
        record = dict(record)
        for c in byte_cols:
            record[c] = LazyCell(lazy, i, c)
        data = {}
        for key, value in record.items():
            name = normalize_column(key)
            if name not in data:
                data[name] = value if isinstance(value, LazyCell) or not _blank(value) else None
        yield i + 1, data, None
