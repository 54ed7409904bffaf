"""VSI-Bench (nyu-visionx/VSI-Bench), scored as thinking-in-space / lmms-eval do.

Layout: ROOT/test.jsonl (or the first release's test-00000-of-00001.parquet, or
test_debiased.parquet / test_pruned.parquet via split="debiased"/"pruned") and the unzipped videos at
ROOT/<dataset>/<scene_name>.mp4. Headline metric: object_counting MRA.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from gasp_vlm.bench.lmms_eval_compat import strip_reasoning_tags
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import LMMS_EVAL_QWEN2_5_VL, Benchmark, ScoreResult, per_key_means, register
from gasp_vlm.bench.tables import BenchmarkDataError, read_jsonl_rows, read_parquet_rows, require_fields

MCA_TYPES = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
             "object_rel_distance", "route_planning", "obj_appearance_order")
NA_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
REL_DIRECTION = "object_rel_direction"
# the 8 reported tasks, in the paper's table order
TASKS = ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
         "object_rel_distance", REL_DIRECTION, "route_planning", "obj_appearance_order")

PRE_PROMPT = "These are frames of a video."  # the YAML's pre_prompt "" is falsy, so code falls back to this
NA_POST_PROMPT = "Please answer the question using a single word or phrase."
MCA_POST_PROMPT = "Answer with the option's letter from the given choices directly."

SPLIT_FILES = {"debiased": "test_debiased.parquet", "pruned": "test_pruned.parquet"}
REQUIRED = ("id", "dataset", "scene_name", "question_type", "question", "ground_truth")


# ---- MRA exactly as the official code computes it ---------------------------------------------------
# num_pts = (end - start) / interval + 2 is 10.999... in float64 and int() truncates it to 10, so the
# thresholds are linspace(0.5, 0.95, 10) (not the 11 the formula suggests); the test is `<=`.
_START, _END, _INTERVAL = 0.5, 0.95, 0.05
MRA_THRESHOLDS = np.linspace(_START, _END, int((_END - _START) / _INTERVAL + 2))


def mean_relative_accuracy(pred: float, target: float) -> float:
    rel = abs(pred - target) / target  # python floats, as upstream (NaN/inf predictions never pass)
    return float((rel <= 1 - MRA_THRESHOLDS).mean())


def first_word(pred: str) -> str:
    """The official `fuzzy_matching`: first space-separated token, trailing dots removed."""
    return pred.split(" ")[0].rstrip(".").strip()


def to_float(s: str) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


# ---- lmms_eval profile: lmms-eval's extract_number (lmms_eval/tasks/vsibench/utils.py, checked on the
# lmms-eval 0.7.3 wheel that `make test-ecosystem` installs). Its rule, re-implemented:
# - digits: the first `-?\d+(?:\.\d+)?` match, so ".5" reads as 5 (the dot is skipped) and "-.5" as 5;
# - words: in the lower-cased text, the first letter run ([a-z]+) that is a number word starts a run; later
#   letter runs extend it while they are number words, "and" is skipped, any other word ends it (so
#   "twenty-one" -> 21, "three hundred and five" -> 305, "three, four" -> 7); hundred multiplies the
#   current group, thousand closes it;
# - whichever starts first in the text wins (a tie cannot happen: a digit is not a letter).
_NUMBER_WORDS = {**{w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
     "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])},
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90, "hundred": 100, "thousand": 1000}
_DIGITS_RE = re.compile(r"-?\d+(?:\.\d+)?")


def words_to_number(words: Sequence[str]) -> float:
    """['three', 'hundred', 'five'] -> 305, ['twenty', 'one'] -> 21, ['two', 'thousand'] -> 2000."""
    total = current = 0
    for w in words:
        v = _NUMBER_WORDS[w]
        if v == 100:
            current = max(current, 1) * 100  # a bare "hundred" is 100
        elif v == 1000:
            total += max(current, 1) * 1000
            current = 0
        else:
            current += v
    return float(total + current)


def extract_number(text: str | None) -> float | None:
    s = str(text).strip().lower() if text is not None else ""
    if not s:
        return None
    start, run = None, []
    for m in re.finditer(r"[a-z]+", s):
        w = m.group(0)
        if start is None:
            if w in _NUMBER_WORDS:
                start, run = m.start(), [w]
        elif w in _NUMBER_WORDS:
            run.append(w)
        elif w != "and":
            break
    digits = _DIGITS_RE.search(s)
    if digits is not None and (start is None or digits.start() < start):
        return float(digits.group(0))
    return words_to_number(run) if run else None


def _option_label(opt: str, i: int) -> str:
    m = re.match(r"\s*\(?([A-Z])[.)]", opt)
    return m.group(1) if m else "ABCDEFGH"[i]


@register
class VSIBench(Benchmark):
    name = "vsibench"
    aliases = ("vsi-bench", "vsi_bench", "vsi")
    profiles = ("official", "lmms_eval")
    media_kind = "video"
    generation = {"official": {"max_new_tokens": 16, "do_sample": False},
                  "lmms_eval": {"max_new_tokens": 16, "do_sample": False}}
    default_frames = 32
    # lmms-eval's Qwen2.5-VL wrapper settings for the lmms_eval profile (pixels and 32 frames applied, all recorded)
    model_settings = {"lmms_eval": LMMS_EVAL_QWEN2_5_VL}

    def resolve_file(self, root: str | Path, split: str | None = None) -> Path:
        root = Path(root)
        if root.is_file():
            return root
        if not root.is_dir():
            raise BenchmarkDataError(f"VSI-Bench root {root} does not exist")
        if split in SPLIT_FILES:
            f = root / SPLIT_FILES[split]
            if not f.is_file():
                raise BenchmarkDataError(f"VSI-Bench: {f} not found (split {split!r})")
            return f
        if split not in (None, "test"):
            raise BenchmarkDataError(f"VSI-Bench: unknown split {split!r}; use test, debiased or pruned")
        if (root / "test.jsonl").is_file():
            return root / "test.jsonl"
        parquets = sorted(root.glob("test-*.parquet"))
        if parquets:
            return parquets[0]
        raise BenchmarkDataError(f"VSI-Bench: no test.jsonl (or test-*.parquet) in {root}")

    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        path = self.resolve_file(root, split)
        video_root = Path(root) if Path(root).is_dir() else path.parent
        rows = read_jsonl_rows(path) if path.suffix == ".jsonl" else read_parquet_rows(path)
        require_fields(rows, REQUIRED, path, "id")
        samples = []
        for r in rows:
            qt = r["question_type"]
            if qt not in MCA_TYPES and qt not in NA_TYPES:
                raise BenchmarkDataError(f"{path}: id {r['id']}: unknown question_type {qt!r}")
            opts = [str(o) for o in (r.get("options") or [])]
            if qt in MCA_TYPES and not opts:
                raise BenchmarkDataError(f"{path}: id {r['id']}: multiple-choice question without options")
            meta = {"dataset": r["dataset"], "scene_name": r["scene_name"]}
            if "pruned" in r:
                meta["pruned"] = bool(r["pruned"])
            samples.append(Sample(
                benchmark=self.name, sample_id=str(r["id"]), split=split or "test", category=qt,
                agg_group=REL_DIRECTION if qt.startswith(REL_DIRECTION) else qt,
                answer_type="mc" if qt in MCA_TYPES else "numeric", question=r["question"], options=opts,
                option_labels=[_option_label(o, i) for i, o in enumerate(opts)], answer=str(r["ground_truth"]),
                media=Media("video", [str(video_root / r["dataset"] / f"{r['scene_name']}.mp4")]), meta=meta))
        return samples

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        if sample.answer_type == "numeric":
            return f"{PRE_PROMPT}\n{sample.question}\n{NA_POST_PROMPT}"
        return "\n".join([PRE_PROMPT, sample.question, "Options:\n" + "\n".join(sample.options), MCA_POST_PROMPT])

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        if profile == "lmms_eval":  # lmms-eval 0.7.3's evaluator strips reasoning tags and whitespace first
            raw_output = strip_reasoning_tags(raw_output)
        if sample.answer_type == "mc":  # both profiles: first word, case-insensitive exact match
            tok = first_word(raw_output)
            return ScoreResult(tok, 1.0 if tok.lower() == sample.answer.lower() else 0.0)
        gt = to_float(sample.answer)
        if profile == "lmms_eval":
            pred = extract_number(raw_output)
            parsed = None if pred is None else repr(pred)
        else:
            parsed = first_word(raw_output)
            pred = to_float(parsed)
        if pred is None or gt is None:  # upstream catches the TypeError and scores the worst case, 0
            return ScoreResult(parsed, 0.0)
        if gt == 0:  # never happens in the release; avoid a ZeroDivisionError
            return ScoreResult(parsed, 1.0 if pred == 0 else 0.0)
        return ScoreResult(parsed, mean_relative_accuracy(pred, gt))

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        per_type = per_key_means(samples, preds, "category")
        groups: dict[str, float] = {}
        for task in TASKS:
            if task == REL_DIRECTION:
                # official: unweighted mean of easy/medium/hard (of those present, for --limit runs)
                subs = [per_type[t] for t in MCA_TYPES[:3] if t in per_type]
                if subs:
                    groups[task] = sum(subs) / len(subs)
            elif task in per_type:
                groups[task] = per_type[task]
        overall = sum(groups.values()) / len(groups) if groups else 0.0  # macro over the 8 tasks
        counts: dict[str, int] = {}
        for s in samples:
            counts[s.category] = counts.get(s.category, 0) + 1
        return {"overall": 100.0 * overall,
                "categories": {k: 100.0 * v for k, v in groups.items()},
                "subcategories": {t: 100.0 * per_type[t] for t in (*MCA_TYPES, *NA_TYPES) if t in per_type},
                "category_counts": counts,
                "headline": {"object_counting": 100.0 * groups["object_counting"]} if "object_counting" in groups else {}}
