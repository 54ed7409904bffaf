"""MMSI-Bench (RunsenXu/MMSI-Bench), scored as its README / VLMEvalKit fork does.

Layout: ROOT/MMSI_Bench.parquet (`id`, `images` = list of JPEG bytes, `question_type`, `question` with
the options embedded, `answer`, `thought`) or the VLMEvalKit ROOT/MMSI_bench.tsv (`index`, `image` =
JSON list of base64, `question`, `answer`, `category`, and option columns `A`..`D` when present, as in the
EASI / VLMEvalKit TSVs). split="circular" is the fork's MMSI_Bench_Circular: every question asked 4 times
with its options rotated; results then carry `circular_*` fields (a question counts only if all 4
rotations are right) next to the vanilla headline (rotation 0).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from gasp_vlm.bench.lmms_eval_compat import strip_reasoning_tags
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import (LMMS_EVAL_QWEN2_5_VL, Benchmark, ScoreResult, micro_and_categories,
                                     register)
from gasp_vlm.bench.tables import (BenchmarkDataError, decode_b64_images, is_missing, parquet_cells,
                                  read_parquet_rows, read_tsv_rows, require_fields, tsv_row)

POST_PROMPT = "Answer with the option's letter from the given choices directly. Enclose the option's letter within ``."
CATEGORIES = tuple(f"Positional Relationship ({p})" for p in
                   ("Cam.–Cam.", "Cam.–Obj.", "Cam.–Reg.", "Obj.–Obj.", "Obj.–Reg.", "Reg.–Reg.")) + (
    "Attribute (Meas.)", "Attribute (Appr.)", "Motion (Cam.)", "Motion (Obj.)", "MSR")
_OFFICIAL_LETTER = re.compile(r"\b[A-D]\b(?!\s[a-zA-Z])")  # a lone capital, not the article in "A bike"
_LMMS_LETTER = re.compile(r"\b[A-F]\b(?!\s[a-zA-Z])", re.IGNORECASE)
OPTION_COLUMNS = "ABCD"
# MMSIBenchCircular (InternRobotics/MMSI-Bench VLMEvalKit fork, vlmeval/dataset/mmsi_bench.py): the 4 orders
# and the option pattern of its extract_options_from_question
CIRCULAR_ORDERS = ("ABCD", "BCDA", "CDAB", "DABC")
_OPTION_RE = re.compile(r"([A-D])\s*:\s*(.*?)(?=\s+[A-D]\s*:|,\s*[A-D]\s*:|$)")


def split_options(question: str) -> tuple[str, dict[str, str]]:
    """(question text, {letter: option}) as MMSIBenchCircular.extract_options_from_question reads them."""
    parts = question.split("Options:", 1)
    if len(parts) < 2:
        return question.strip(), {}
    return parts[0].strip(), {k: v.strip() for k, v in _OPTION_RE.findall(parts[1].strip())}


def join_options(question_text: str, options: dict[str, str]) -> str:
    """MMSIBenchCircular.build_question_with_options: the question with its (rotated) options line."""
    return f"{question_text}\nOptions: " + ", ".join(f"{k}: {v}" for k, v in options.items())


def rotate(options: dict[str, str], answer: str, order: str) -> tuple[dict[str, str], str]:
    """One circular variant: new letter k takes old option order[i]; the answer follows its text."""
    new = {k: options[o] for k, o in zip("ABCD", order) if o in options}
    return new, ("ABCD"[order.index(answer)] if answer in order else answer)


def canonical_category(name: str) -> str:
    """Hyphen/minus spellings ("Cam.-Obj.") -> the release's en-dash ("Cam.–Obj.")."""
    return re.sub(r"(\w\.)\s*[-\u2010\u2011\u2012\u2013\u2014\u2212]\s*(\w)", "\\1\u2013\\2", name.strip())


def extract_letter(pred: str, pattern: re.Pattern = _OFFICIAL_LETTER) -> str | None:
    """``X`` then `X` then {X} narrow the text (each applied in turn), then the first lone letter."""
    for wrap in (r"``([^`]*)``", r"`([^`]*)`", r"\{([^}]*)\}"):
        m = re.search(wrap, pred)
        if m:
            pred = m.group(1)
    m = pattern.search(pred)
    return m.group() if m else None


@register
class MMSIBench(Benchmark):
    name = "mmsi"
    aliases = ("mmsi-bench", "mmsi_bench")
    profiles = ("official", "lmms_eval")
    splits = ("test", "circular")
    media_kind = "images"
    model_settings = {"lmms_eval": LMMS_EVAL_QWEN2_5_VL}  # lmms-eval's Qwen2.5-VL wrapper defaults
    generation = {"official": {"max_new_tokens": 2048, "do_sample": False},
                  "lmms_eval": {"max_new_tokens": 2048, "do_sample": False}}
    # VLMEvalKit Qwen2VLChat image sizing (small views are upscaled to >= 1280 visual tokens each)
    pixels = {"official": {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}}

    def resolve_file(self, root: str | Path) -> Path:
        root = Path(root)
        if root.is_file():
            return root
        if not root.is_dir():
            raise BenchmarkDataError(f"MMSI-Bench root {root} does not exist")
        for name in ("MMSI_Bench.parquet", "MMSI_bench.tsv"):
            if (root / name).is_file():
                return root / name
        found = sorted(root.glob("*.parquet")) or sorted(root.glob("*.tsv"))
        if found:
            return found[0]
        raise BenchmarkDataError(f"MMSI-Bench: no MMSI_Bench.parquet (or MMSI_bench.tsv) in {root}")

    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        if split not in (None, *self.splits):
            raise BenchmarkDataError(f"MMSI-Bench: unknown split {split!r}; use test or circular")
        path = self.resolve_file(root)
        if path.suffix == ".tsv":
            rows = read_tsv_rows(path)
            require_fields(rows, ("index", "question", "answer", "category"), path, "index")
            id_key, cat_key = "index", "category"
        else:
            cols = ["id", "question_type", "question", "answer"] + (["images"] if with_media else [])
            rows = read_parquet_rows(path, cols)
            require_fields(rows, ("id", "question_type", "question", "answer"), path, "id")
            id_key, cat_key = "id", "question_type"
        samples = []
        for row, r in enumerate(rows):
            blobs = None
            # images are decoded only on request (with_media); otherwise fetch_media reads them lazily
            if with_media:
                if path.suffix == ".tsv":
                    blobs = decode_b64_images(r.get("image") or "[]")
                else:
                    blobs = list(r.get("images") or [])
                if not blobs:
                    raise BenchmarkDataError(f"{path}: {id_key} {r[id_key]}: no images")
            sid, question, answer = str(r[id_key]).strip(), str(r["question"]), str(r["answer"]).strip()
            text, options = split_options(question)
            columns = {c: str(r[c]).strip() for c in OPTION_COLUMNS if c in r and not is_missing(r[c])}
            if columns:  # the TSV's own option columns win over the text parsed from the question
                options = columns
            cat = canonical_category(str(r[cat_key]))
            base = dict(benchmark=self.name, split=split or "test", category=cat, agg_group=cat, answer_type="mc",
                        media=Media("images", [], blobs))
            if split != "circular":
                if columns and "Options:" not in question:  # a TSV that keeps options out of the question
                    question = join_options(question.strip(), columns)
                samples.append(Sample(sample_id=sid, question=question, options=list(options.values()),
                                      option_labels=list(options) or list(OPTION_COLUMNS), answer=answer,
                                      meta={"file": str(path), "row": row}, **base))
                continue
            if not options or answer not in options:
                continue  # MMSIBenchCircular skips a question whose options or answer it cannot read
            for i, order in enumerate(CIRCULAR_ORDERS):
                opts, ans = rotate(options, answer, order)
                # the fork numbers variant i as index + i * 10^6 and groups them by g_index
                vid = str(int(sid) + i * 1_000_000) if sid.isdigit() else f"{sid}@{i}"
                samples.append(Sample(sample_id=vid, question=join_options(text, opts), options=list(opts.values()),
                                      option_labels=list(opts), answer=ans,
                                      meta={"file": str(path), "row": row, "g_index": sid, "rotation": i}, **base))
        return samples

    def fetch_media(self, sample: Sample) -> list:
        if sample.media.blobs is not None:
            return list(sample.media.blobs)
        path = Path(sample.meta["file"])
        if path.suffix == ".tsv":  # re-read that row's base64 cell
            return decode_b64_images(tsv_row(path, sample.meta["row"]).get("image") or "[]")
        (images,) = parquet_cells(path, sample.meta["row"], ["images"])
        if not images:
            raise BenchmarkDataError(f"{path}: id {sample.sample_id}: no images")
        return list(images)

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        if profile == "lmms_eval":  # lmms-eval 0.7.3 msr_doc_to_text: question.strip() + yaml post_prompt
            return f"{sample.question.strip()}\n{POST_PROMPT}"
        return f"{sample.question}\n{POST_PROMPT}"

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        if profile == "lmms_eval":
            # lmms-eval 0.7.3 extract_single_choice_with_word_boundary, on the reasoning-stripped response
            letter = extract_letter(strip_reasoning_tags(raw_output), _LMMS_LETTER)
            letter = letter.upper() if letter else None
            return ScoreResult(letter, 1.0 if letter and letter == sample.answer.upper() else 0.0)
        letter = extract_letter(raw_output)
        if letter is None:  # the official pipeline falls back to VLMEvalKit's LLM extraction here
            return ScoreResult(None, 0.0, judge_unavailable=True)
        return ScoreResult(letter, 1.0 if sample.answer.lower() == letter.lower()[0] else 0.0)

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        if not any("rotation" in s.meta for s in samples):
            return micro_and_categories(samples, preds)
        # MMSIBenchCircular.evaluate: vanilla = the rotation-0 variant of each question (the headline);
        # circular = a question is right only if every one of its variants is
        first = [(s, p) for s, p in zip(samples, preds) if s.meta["rotation"] == 0]
        out = micro_and_categories([s for s, _ in first], [p for _, p in first])
        groups: dict[str, list[float]] = defaultdict(list)
        cat_of: dict[str, str] = {}
        for s, p in zip(samples, preds):
            groups[s.meta["g_index"]].append(p.score)
            cat_of.setdefault(s.meta["g_index"], s.category)
        hits = {g: float(all(x == 1.0 for x in scores)) for g, scores in groups.items()}
        by_cat: dict[str, list[float]] = defaultdict(list)
        for g, h in hits.items():
            by_cat[cat_of[g]].append(h)
        out.update(circular_overall=100.0 * sum(hits.values()) / len(hits) if hits else 0.0,
                   circular_categories={c: 100.0 * sum(v) / len(v) for c, v in by_cat.items()},
                   circular_questions=len(hits), vanilla_overall=out["overall"])
        return out
