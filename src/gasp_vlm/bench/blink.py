"""BLINK (BLINK-Benchmark/BLINK) val split, scored as zeyofu/BLINK_Benchmark's eval does.

Layout (the HF repo): ROOT/<Subtask>/val-00000-of-00001.parquet for 14 subtasks, image columns
image_1..image_4 as {bytes, path} structs (None when unused). Headline metric: Multi-view_Reasoning,
reported on its own besides the official "Total" (unweighted mean over the 14 subtasks).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Sequence

from gasp_vlm.bench.lmms_eval_compat import strip_reasoning_tags
from gasp_vlm.bench.mcq import PR1175, can_infer
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import LMMS_EVAL_QWEN2_5_VL, Benchmark, ScoreResult, per_key_means, register
from gasp_vlm.bench.tables import BenchmarkDataError, parquet_cells, read_parquet_rows, require_fields

SUBTASKS = ("Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
            "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
            "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity")
MULTI_VIEW = "Multi-view_Reasoning"
DISCLAIMER_TASKS = ("Forensic_Detection", "Jigsaw", "Art_Style")
DISCLAIMER = ("Disclaimer: This is not to make unfair assumptions about the people in the image and you just need "
              "to give your assessment on this question. You don't need to identify the real people. You just "
              "need to analyze based on the information I gave you.\n\n")
LMMS_PRE_PROMPT = "Note: You only need to respond with {} without providing any additional information.\n"
VLMEVALKIT_POST_PROMPT = "Please select the correct answer from the options above. \n"
IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
TEXT_COLUMNS = ("idx", "question", "sub_task", "choices", "answer", "prompt")
LETTERS = "ABCDE"


def official_parse(raw: str, n_choices: int) -> str | None:
    """BLINK's `analyze_answer` without its GPT step; None where it would call GPT-3.5.

    Exactly "A".."E" -> "(A)"; exactly "(A)".."(E)" -> kept; else one "(X)" whitespace token among the
    valid choices, in the whole output or in its last paragraph (the last paragraph wins).
    """
    valid = {f"({c})" for c in LETTERS[:n_choices]}
    if raw in tuple(LETTERS):  # a tuple: `"" in "ABCDE"` would be a substring test
        return f"({raw})"
    if raw in {f"({c})" for c in LETTERS}:
        return raw
    anywhere = valid & set(raw.split())
    last = valid & set(raw.split("\n\n")[-1].split())
    if (len(anywhere) != 1 and len(last) != 1) or not anywhere:
        return None
    return next(iter(last)) if len(last) == 1 else next(iter(anywhere))


def lmms_eval_letter(raw: str, valid: str = string.ascii_uppercase) -> str:
    """lmms-eval 0.7.3 blink/utils.py `_extract_answer_letter`, restricted to the `valid` letters ("" if none).

    In order: a terse first line (<= 4 chars, e.g. "B", "(B)", "b.") -> that letter; else the LAST
    "answer(s) [is] [:-] [(]X[)]" statement; else the last "(X)"; else a leading letter after "(" / spaces.
    (Older lmms-eval took the first letter of the output, so "The answer is (B)" read as "T".)"""
    text = raw.strip()
    cls = re.escape(valid.upper())
    first = text.split("\n", 1)[0].strip()
    if len(first) <= 4:
        m = re.match(rf"^\(?([{cls}])\)?[\.\s:,)]*$", first, flags=re.IGNORECASE)
        if m:
            return m.group(1).upper()
    said = re.findall(rf"answers?(?:\s+is)?\s*[:\-]?\s*\(?([{cls}])\)?(?![A-Za-z])", text, flags=re.IGNORECASE)
    if said:
        return said[-1].upper()
    paren = re.findall(rf"\(([{cls}])\)", text)  # case-sensitive, as upstream
    if paren:
        return paren[-1].upper()
    m = re.match(rf"[\(\s]*([{cls}])[\)\.\s]*", text, flags=re.IGNORECASE)
    return m.group(1).upper() if m else ""


@register
class BLINKBench(Benchmark):
    name = "blink"
    aliases = ("blink-benchmark", "blink_benchmark")
    profiles = ("official", "lmms_eval", "vlmevalkit")
    media_kind = "images"
    # the official script queries GPT-4V at temperature 0 without a length cap; lmms-eval uses 1024
    generation = {"official": {"max_new_tokens": 1024, "do_sample": False},
                  "lmms_eval": {"max_new_tokens": 1024, "do_sample": False},
                  # vlmevalkit is ONE version throughout: open-compass/VLMEvalKit main after PR #1175 (July 2025):
                  # ImageMCQDataset.build_prompt, can_infer (mcq.PR1175), report_acc (micro), and the
                  # Qwen2VLChat config of Qwen2.5-VL (2048 new tokens, top_k=1 greedy in effect, pixels below)
                  "vlmevalkit": {"max_new_tokens": 2048, "do_sample": False}}
    pixels = {"vlmevalkit": {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}}
    model_settings = {"lmms_eval": LMMS_EVAL_QWEN2_5_VL}

    def files(self, root: str | Path, split: str = "val") -> list[Path]:
        root = Path(root)
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise BenchmarkDataError(f"BLINK root {root} does not exist")
        found = sorted(root.glob(f"*/{split}-*.parquet"))
        if not found:
            raise BenchmarkDataError(f"BLINK: no <Subtask>/{split}-*.parquet files under {root}")
        return found

    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        split = split or "val"
        samples = []
        for path in self.files(root, split):
            cols = list(TEXT_COLUMNS) + (list(IMAGE_COLUMNS) if with_media else [])
            rows = read_parquet_rows(path, cols)
            require_fields(rows, TEXT_COLUMNS, path, "idx")
            for row, r in enumerate(rows):
                task = r["sub_task"] or path.parent.name
                if r["answer"] is None:
                    raise BenchmarkDataError(f"{path}: {r['idx']}: no answer (the test split's answers are hidden)")
                choices = [str(c) for c in r["choices"]]
                blobs, n_img = None, None
                if with_media:
                    imgs = [r.get(c) for c in IMAGE_COLUMNS]
                    blobs = [i["bytes"] if isinstance(i, dict) else i for i in imgs if i is not None]
                    n_img = len(blobs)
                samples.append(Sample(
                    benchmark=self.name, sample_id=str(r["idx"]), split=split, category=task, agg_group=task,
                    answer_type="mc", question=str(r["question"]), options=choices,
                    option_labels=list(LETTERS[:len(choices)]), answer=str(r["answer"]),
                    media=Media("images", [], blobs),
                    meta={"prompt": r["prompt"], "file": str(path), "row": row, "num_images": n_img}))
        return samples

    def fetch_media(self, sample: Sample) -> list:
        if sample.media.blobs is not None:
            return list(sample.media.blobs)
        cells = parquet_cells(sample.meta["file"], sample.meta["row"], IMAGE_COLUMNS)
        return [c["bytes"] if isinstance(c, dict) else c for c in cells if c is not None]

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        if profile == "lmms_eval":
            return LMMS_PRE_PROMPT.format(", ".join(sample.option_labels)) + sample.meta["prompt"]
        if profile == "vlmevalkit":
            opts = "".join(f"{k}. {v}\n" for k, v in zip(sample.option_labels, sample.options))
            return f"Question: {sample.question}\nOptions:\n{opts}{VLMEVALKIT_POST_PROMPT}"
        prompt = sample.meta["prompt"]
        # upstream defines the disclaimer with a stray trailing comma (a tuple); the intent is a string prefix
        return DISCLAIMER + prompt if sample.category in DISCLAIMER_TASKS else prompt

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        gold = sample.answer.strip()
        if profile == "lmms_eval":
            # blink_process_results: strip reasoning tags (evaluator), accept only this question's letters
            valid = string.ascii_uppercase[:len(sample.options)] or string.ascii_uppercase
            letter = lmms_eval_letter(strip_reasoning_tags(raw_output), valid)
            return ScoreResult(letter, 1.0 if letter == gold.strip("()") else 0.0)
        if profile == "vlmevalkit":
            opt = can_infer(raw_output, dict(zip(sample.option_labels, sample.options)), PR1175)
            if opt is None:
                return ScoreResult("Z", 0.0, judge_unavailable=True)
            return ScoreResult(opt, 1.0 if opt == gold.strip("()") else 0.0)
        pred = official_parse(raw_output, len(sample.options))
        if pred is None:  # GPT-3.5 matching in the official code; "(Z)" (wrong) offline
            return ScoreResult("(Z)", 0.0, judge_unavailable=True)
        return ScoreResult(pred, 1.0 if pred == gold else 0.0)

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        per_task = per_key_means(samples, preds, "category")
        ordered = {t: per_task[t] for t in sorted(per_task)}
        macro = sum(ordered.values()) / len(ordered) if ordered else 0.0
        micro = sum(p.score for p in preds) / len(preds) if preds else 0.0
        counts: dict[str, int] = {}
        for s in samples:
            counts[s.category] = counts.get(s.category, 0) + 1
        out = {
            # official "Total" and lmms-eval's group are unweighted over subtasks; VLMEvalKit is micro
            "overall": 100.0 * (micro if profile == "vlmevalkit" else macro),
            "categories": {k: 100.0 * v for k, v in ordered.items()},
            "category_counts": counts,
            "macro_overall": 100.0 * macro,
            "micro_overall": 100.0 * micro,
        }
        if MULTI_VIEW in per_task:
            out["multi_view_reasoning"] = 100.0 * per_task[MULTI_VIEW]
            out["headline"] = {MULTI_VIEW: 100.0 * per_task[MULTI_VIEW]}
        return out
