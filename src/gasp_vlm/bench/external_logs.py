"""Per-sample outputs of other harnesses -> our predictions, so they are rescored by our scorers.

lmms-eval (``--log_samples``) writes ``samples_<task>_<date>.jsonl`` (optionally ``.gz``): one JSON object
per document with ``doc_id`` (its position in the task's split), ``doc`` (the dataset row, media columns
dropped), ``target``, ``arguments``, ``resps`` ([[text]]) and ``filtered_resps`` ([text]) plus the task's
metric keys. A row is matched to our sample by the benchmark's own id column in ``doc`` (VSI-Bench ``id``,
BLINK ``idx``, All-Angles / MMSI ``index`` or ``id``); rows without ``doc`` fall back to ``doc_id`` as the
position in our load order (the same split file, so the same order). ``filtered_resps`` is what
lmms-eval scored, so it is the raw output here.

VLMEvalKit writes ``<model>_<dataset>.xlsx`` (or ``.tsv`` / ``.csv`` / ``.json`` with ``PRED_FORMAT``): the
benchmark TSV's columns (image columns dropped) plus ``prediction``; rows match our samples by ``index``
(All-Angles and MMSI load VLMEvalKit's TSVs, so their ids are those indices).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Sequence

from gasp_vlm.bench.records import Sample
from gasp_vlm.bench.tables import BenchmarkDataError

ID_KEYS = ("id", "idx", "index", "question_id", "sample_id")
SOURCES = ("lmms-eval", "vlmevalkit")


def _first_text(x: Any) -> str | None:
    while isinstance(x, list):
        if not x:
            return None
        x = x[0]
    return None if x is None else str(x)


def _rows(path: Path) -> list[dict]:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise BenchmarkDataError(f"{path}: missing file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkDataError(f"{path}: unreadable ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise BenchmarkDataError(f"{path}:{n}: not a JSON line (expected lmms-eval's samples_*.jsonl)") from None
        if not isinstance(rows[-1], dict) or ("filtered_resps" not in rows[-1] and "resps" not in rows[-1]):
            raise BenchmarkDataError(f"{path}:{n}: no filtered_resps/resps (not an lmms-eval --log_samples file)")
    return rows


def _content_index(samples: Sequence[Sample]) -> dict[tuple, str | None]:
    """MVBench: (video stem, question, candidates) and (question, candidates) -> sample_id (None: ambiguous).
    The stem, since lmms-eval's `video` revision may name a clip differently from the main branch."""
    index: dict[tuple, str | None] = {}
    for s in samples:
        if s.benchmark != "mvbench":
            continue
        qc = (s.question, tuple(s.options))
        for key in ((Path(str(s.meta["video"])).stem, *qc), qc):
            index[key] = None if key in index else s.sample_id
    return index


def _match_content(index: dict[tuple, str | None], doc: dict) -> str | None:
    qc = (str(doc.get("question")), tuple(str(c) for c in doc.get("candidates") or []))
    return index.get((Path(str(doc.get("video"))).stem, *qc)) or index.get(qc)


def read_lmms_eval_samples(path: str | Path, samples: Sequence[Sample], benchmark: str) -> list[dict]:
    """lmms-eval's per-sample log -> prediction records (sample_id, raw_output, prompt, source_doc_id)."""
    path = Path(path)
    known = {s.sample_id for s in samples}
    # MVBench docs carry no id and lmms-eval logs each of its 20 tasks separately (doc_id restarts at 0 per
    # task), so they are matched by content instead of by position
    by_content = _content_index(samples)
    out, unknown = [], []
    for row in _rows(path):
        doc = row.get("doc") if isinstance(row.get("doc"), dict) else None
        sid = None
        if doc is not None:
            sid = next((str(doc[k]).strip() for k in ID_KEYS if k in doc and str(doc[k]).strip() in known), None)
            if sid is None and any(k in doc for k in ID_KEYS):
                unknown.append(next(str(doc[k]) for k in ID_KEYS if k in doc))
                continue
            if sid is None and by_content and "candidates" in doc:
                sid = _match_content(by_content, doc)
                if sid is None:
                    unknown.append(f"{doc.get('video')}: {doc.get('question')}")
                    continue
        if sid is None and by_content:  # a position means nothing across MVBench's per-task logs
            raise BenchmarkDataError(f"{path}: an MVBench row without its `doc` (video, question, candidates) "
                                     f"cannot be matched; log with lmms-eval --log_samples")
        if sid is None:
            i = row.get("doc_id")
            if not isinstance(i, int) or not 0 <= i < len(samples):
                raise BenchmarkDataError(f"{path}: doc_id {i!r} has no {benchmark} sample at that position "
                                         f"({len(samples)} samples)")
            sid = samples[i].sample_id
        raw = _first_text(row.get("filtered_resps", row.get("resps")))
        out.append({"sample_id": sid, "raw_output": raw if raw is not None else "", "prompt": None,
                    "source": "lmms-eval", "source_doc_id": row.get("doc_id")})
    if unknown and not out:
        raise BenchmarkDataError(f"{path}: none of its documents is a {benchmark} sample (ids such as "
                                 f"{unknown[:3]}): a log of another benchmark or split?")
    if unknown:
        raise BenchmarkDataError(f"{path}: {len(unknown)} documents are not {benchmark} samples (e.g. {unknown[:3]})")
    return out


def _index_text(v: Any) -> str:
    """VLMEvalKit indices come back from Excel as floats (3.0); our ids are their integer text."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: missing file")
    if suffix == ".xlsx":
        try:
            import openpyxl
        except ImportError:
            raise BenchmarkDataError(f"{path}: reading .xlsx needs openpyxl: pip install 'gasp-vlm[eval]'") from None
        try:
            sheet = openpyxl.load_workbook(path, read_only=True, data_only=True).worksheets[0]
        except Exception as e:  # openpyxl raises several kinds for a broken workbook
            raise BenchmarkDataError(f"{path}: unreadable workbook ({e})") from None
        rows = list(sheet.iter_rows(values_only=True))
        if not rows:
            return []
        header = [str(h) for h in rows[0]]
        return [dict(zip(header, r)) for r in rows[1:] if any(c is not None for c in r)]
    if suffix in (".tsv", ".csv"):
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):  # pandas orient="columns"/"dict": {column: {row: value}}
            cols = list(data)
            keys = list(data[cols[0]]) if cols else []
            return [{c: data[c].get(k) for c in cols} for k in keys]
        return list(data)
    raise BenchmarkDataError(f"{path}: unknown VLMEvalKit prediction format {suffix!r} (xlsx, tsv, csv or json)")


def read_vlmevalkit_predictions(path: str | Path, samples: Sequence[Sample], benchmark: str) -> list[dict]:
    """VLMEvalKit's prediction table -> prediction records (sample_id, raw_output)."""
    path = Path(path)
    rows = _table(path)
    if not rows or "index" not in rows[0] or "prediction" not in rows[0]:
        raise BenchmarkDataError(f"{path}: expected VLMEvalKit's prediction table with 'index' and 'prediction' "
                                 f"columns, got {sorted(rows[0]) if rows else 'no rows'}")
    known = {s.sample_id for s in samples}
    out, unknown = [], []
    for r in rows:
        sid = _index_text(r["index"])
        if sid not in known:
            unknown.append(sid)
            continue
        pred = r.get("prediction")
        out.append({"sample_id": sid, "raw_output": "" if pred is None else str(pred), "prompt": None,
                    "source": "vlmevalkit"})
    if unknown:
        raise BenchmarkDataError(f"{path}: {len(unknown)} rows whose index is not a {benchmark} sample "
                                 f"(e.g. {unknown[:3]}): a table of another benchmark?")
    return out
