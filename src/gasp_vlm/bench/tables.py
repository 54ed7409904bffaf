"""Reading benchmark tables (JSONL / JSON / TSV / parquet) with errors that name the file and row."""

from __future__ import annotations

import csv
import functools
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence


class BenchmarkDataError(ValueError):
    """The local benchmark copy is missing a file or has an unexpected layout/field."""


def read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with path.open("r", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def read_json_rows(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # some dumps wrap the list: {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise BenchmarkDataError(f"{path}: expected a JSON list of questions")
        data = lists[0]
    if not isinstance(data, list):
        raise BenchmarkDataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def read_tsv_rows(path: Path) -> list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # VLMEvalKit TSVs may hold base64 images
    with path.open("r", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@functools.lru_cache(maxsize=1)
def _tsv_rows_cached(path: str, mtime: float) -> list[dict]:
    return read_tsv_rows(Path(path))


def tsv_row(path: str | Path, row: int) -> dict:
    """One row of a TSV, the file parsed once and cached (base64 image TSVs are re-read lazily per sample)."""
    p = Path(path)
    return _tsv_rows_cached(str(p), p.stat().st_mtime)[row]


def decode_b64_images(cell: Any) -> list[bytes]:
    """A VLMEvalKit `image` cell: one base64 string or a JSON/list literal of them."""
    import ast
    import base64

    if isinstance(cell, list):
        items = cell
    else:
        s = str(cell).strip()
        if s.startswith("["):
            try:
                items = json.loads(s)
            except json.JSONDecodeError:
                items = ast.literal_eval(s)
        else:
            items = [s] if s else []
    return [base64.b64decode(b) for b in items]


def read_parquet_rows(path: Path, columns: Sequence[str] | None = None) -> list[dict]:
    """Rows of a parquet file as dicts; `columns` restricts what is read (skip image columns when scoring)."""
    import pyarrow.parquet as pq

    try:
        schema_names = pq.read_schema(path).names
        cols = [c for c in columns if c in schema_names] if columns is not None else None
        return pq.read_table(path, columns=cols).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
        raise BenchmarkDataError(f"{path}: cannot read parquet ({e})") from None


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def require_fields(rows: Iterable[dict], fields: Sequence[str], path: Path, id_field: str | None = None) -> None:
    for i, r in enumerate(rows):
        missing = [f for f in fields if f not in r]
        if missing:
            where = f"row {i}" + (f" ({id_field}={r.get(id_field)!r})" if id_field and id_field in r else "")
            raise BenchmarkDataError(f"{path}: {where} lacks field(s) {', '.join(missing)}")


def is_missing(v: Any) -> bool:
    """None / NaN / empty string (pandas writes a missing option as NaN, or as '' in a TSV)."""
    if v is None:
        return True
    if isinstance(v, float) and v != v:
        return True
    return isinstance(v, str) and v.strip() == ""


_TABLE_CACHE: dict[tuple[str, tuple[str, ...]], Any] = {}


def parquet_cells(path: str | Path, row: int, columns: Sequence[str]) -> list[Any]:
    """Values of `columns` at `row`, read lazily from a memory-mapped parquet (one file cached at a time).

    WHY: BLINK/MMSI keep images inside the parquet; materialising every image of a 1 GB file as Python
    bytes just to run the first few samples is wasteful, and scoring must not touch them at all.
    """
    import pyarrow.parquet as pq

    key = (str(path), tuple(columns))
    table = _TABLE_CACHE.get(key)
    if table is None:
        _TABLE_CACHE.clear()
        names = pq.read_schema(path).names
        missing = [c for c in columns if c not in names]
        if missing:
            raise BenchmarkDataError(f"{path}: no column(s) {', '.join(missing)}")
        table = pq.read_table(path, columns=list(columns), memory_map=True)
        _TABLE_CACHE[key] = table
    return [table.column(c)[row].as_py() for c in columns]
