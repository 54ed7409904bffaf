"""Benchmark-agnostic records: one `Sample` per question, one `Prediction` per model answer.

Every benchmark loader turns its on-disk layout into `Sample`s; every scorer turns a raw model output
into a `Prediction`. Keeping both plain (JSON-serialisable apart from in-memory image bytes) lets
`gasp score` work from a predictions file alone and lets every prediction carry the exact prompt and
frame indices that produced it (for auditing a run later).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

ANSWER_TYPES = ("mc", "numeric", "text")


@dataclass
class Media:
    """What the model sees. `kind` is "video" (one file, frames sampled at run time) or "images".

    `paths` are files on disk; `blobs` are encoded images held in memory (BLINK/MMSI keep their images
    inside parquet cells). Loaders fill `blobs` only when asked for media (`with_media=True`), so that
    scoring never decodes or even reads image columns.
    """

    kind: str = "images"
    paths: list[str] = field(default_factory=list)
    blobs: list[bytes] | None = None

    @property
    def count(self) -> int:
        return len(self.blobs) if self.blobs is not None else len(self.paths)


@dataclass
class Sample:
    benchmark: str
    sample_id: str           # stable string id (VSI str(id), BLINK idx, All-Angles str(index), MMSI str(id))
    split: str
    category: str            # finest official type, e.g. "object_rel_direction_hard"
    agg_group: str           # official reporting bucket, e.g. "object_rel_direction"
    answer_type: str         # one of ANSWER_TYPES
    question: str            # raw question text as stored in the dataset
    options: list[str]       # raw option strings (may be empty, e.g. VSI numeric or MMSI embedded options)
    option_labels: list[str]  # letters matching `options` ("A", "B", ...)
    answer: str              # raw gold answer ("A", "(A)", "2.5")
    media: Media = field(default_factory=Media)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["media"].pop("blobs", None)  # bytes are not JSON; the paths/ids in meta locate them again
        return d


@dataclass
class Prediction:
    sample_id: str
    raw_output: str | None   # None = the model never answered this sample (counted as missing)
    parsed: str | None = None
    score: float = 0.0
    prompt: str | None = None
    frame_indices: list[int] | None = None
    profile: str = "official"
    judge_unavailable: bool = False  # official code would have asked a GPT judge here
    category: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


# ---- predictions files ---------------------------------------------------------------------------

class PredictionsFileError(ValueError):
    """A predictions JSONL file is malformed; the message names the file and the line."""


def iter_prediction_lines(path: str | Path, *, tolerate_truncated_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) from a JSONL predictions file.

    Every record needs a string-able `sample_id` and a `raw_output` (string or null). A malformed line
    raises `PredictionsFileError` naming file and line, except - when `tolerate_truncated_tail` - an
    unparsable *last* line without a trailing newline, which is what a crash mid-write leaves behind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    data = path.read_bytes()
    lines = data.split(b"\n")
    ends_with_newline = data.endswith(b"\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_tail = i == len(lines) and not ends_with_newline
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if tolerate_truncated_tail and is_tail:
                return
            raise PredictionsFileError(f"{path}:{i}: not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        if not isinstance(rec, dict) or "sample_id" not in rec:
            raise PredictionsFileError(f"{path}:{i}: expected an object with 'sample_id' and 'raw_output'")
        if "raw_output" not in rec:
            raise PredictionsFileError(f"{path}:{i}: missing 'raw_output' for sample_id {rec['sample_id']!r}")
        if rec["raw_output"] is not None and not isinstance(rec["raw_output"], str):
            raise PredictionsFileError(f"{path}:{i}: 'raw_output' must be a string or null, "
                                       f"got {type(rec['raw_output']).__name__}")
        rec["sample_id"] = str(rec["sample_id"])
        yield i, rec


class DuplicatePredictionsError(PredictionsFileError):
    """One sample_id has two different raw outputs; scoring either one would silently pick a winner."""


MAX_LISTED_DUPLICATES = 5  # ids (with their lines) spelled out in the error message


def read_predictions(path: str | Path, *, tolerate_truncated_tail: bool = False
                             ) -> tuple[dict[str, dict], dict[str, int]]:
    """sample_id -> record, refusing ids that repeat with a different `raw_output`.

    Repeats with the same `raw_output` (e.g. a log appended to twice) are harmless: the first record is
    kept and they are only counted. Returns (records, {"duplicate_ids": ids seen more than once,
    "duplicate_lines": repeated lines dropped}); raises `DuplicatePredictionsError` naming the file,
    the number of conflicting ids and the first few with their line numbers.
    """
    records: dict[str, dict] = {}
    lines: dict[str, list[int]] = {}
    conflicting: list[str] = []  # first-seen order, so the message points at the earliest problem
    for lineno, rec in iter_prediction_lines(path, tolerate_truncated_tail=tolerate_truncated_tail):
        sid = rec["sample_id"]
        lines.setdefault(sid, []).append(lineno)
        if sid not in records:
            records[sid] = rec
        elif rec["raw_output"] != records[sid]["raw_output"] and sid not in conflicting:
            conflicting.append(sid)
    if conflicting:
        shown = ", ".join(f"{sid!r} (lines {', '.join(map(str, lines[sid]))})"
                          for sid in conflicting[:MAX_LISTED_DUPLICATES])
        extra = len(conflicting) - MAX_LISTED_DUPLICATES
        more = f" and {extra} more" if extra > 0 else ""
        raise DuplicatePredictionsError(
            f"{path}: {len(conflicting)} sample_id(s) appear more than once with different raw_output: "
            f"{shown}{more}; keep one answer per sample_id")
    dup_ids = sum(1 for ls in lines.values() if len(ls) > 1)
    dup_lines = sum(len(ls) - 1 for ls in lines.values())
    return records, {"duplicate_ids": dup_ids, "duplicate_lines": dup_lines}


def repair_truncated_tail(path: str | Path) -> int:
    """Cut an interrupted last line (no trailing newline) off a JSONL file; return bytes removed.

    WHY: appending after a half-written line would glue two records into one invalid line.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    cut = data.rfind(b"\n") + 1
    tail = data[cut:]
    try:
        json.loads(tail.decode("utf-8"))
        with path.open("ab") as f:  # a complete record that only lacks its newline: keep it
            f.write(b"\n")
        return 0
    except (json.JSONDecodeError, UnicodeDecodeError):
        with path.open("r+b") as f:
            f.truncate(cut)
        return len(tail)
