"""Per-sample outputs of other harnesses -> our predictions, so they are rescored by our scorers.

lmms-eval (``--log_samples``) writes ``samples_<task>_<date>.jsonl`` (optionally ``.gz``): one JSON object
per document with ``doc_id`` (its position in the task's split), ``doc`` (the dataset row, media columns
dropped), ``target``, ``arguments``, ``resps`` ([[text]]) and ``filtered_resps`` ([text]) plus the task's
metric keys. A row is matched to our sample by the benchmark's own id column in ``doc`` (VSI-Bench ``id``,
BLINK ``idx``, All-Angles / MMSI ``index`` or ``id``); rows without ``doc`` fall back to ``doc_id`` as the
position in our load order (the same split file, so the same order). ``filtered_resps`` is what
lmms-eval scored, so it is the raw output here.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Sequence

from gasp_vlm.bench.records import Sample
from gasp_vlm.bench.tables import BenchmarkDataError

ID_KEYS = ("id", "idx", "index", "question_id", "sample_id")
SOURCES = ("lmms-eval",)


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


def read_lmms_eval_samples(path: str | Path, samples: Sequence[Sample], benchmark: str) -> list[dict]:
    """lmms-eval's per-sample log -> prediction records (sample_id, raw_output, prompt, source_doc_id)."""
    path = Path(path)
    known = {s.sample_id for s in samples}
    out, unknown = [], []
    for row in _rows(path):
        doc = row.get("doc") if isinstance(row.get("doc"), dict) else None
        sid = None
        if doc is not None:
            sid = next((str(doc[k]).strip() for k in ID_KEYS if k in doc and str(doc[k]).strip() in known), None)
            if sid is None and any(k in doc for k in ID_KEYS):
                unknown.append(next(str(doc[k]) for k in ID_KEYS if k in doc))
                continue
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
