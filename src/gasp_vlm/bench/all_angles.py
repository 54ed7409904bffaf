"""All-Angles Bench (ch-chenyu/All-Angles-Bench), scored as its VLMEvalKit fork does.

Layout: ROOT/data.json (list of questions; `image_path` lists are relative to ROOT) plus the images in
nested folders; or the VLMEvalKit TSV (ROOT/bench_tsv/all_angles_bench_huggingface.tsv or any *.tsv
given directly) whose `image_path` cell is a list literal. Headline metric: camera_pose_estimation.
"""

from __future__ import annotations

import ast
import json
import string
from pathlib import Path
from typing import Sequence

from gasp_vlm.bench.mcq import FORK_2025_04, PR1175, can_infer
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import Benchmark, ScoreResult, micro_and_categories, register
from gasp_vlm.bench.tables import (BenchmarkDataError, decode_b64_images, is_missing, read_json_rows, read_tsv_rows,
                                  require_fields, tsv_row)

POST_PROMPT = "Please select the correct answer from the options above. \n"  # trailing space + newline are upstream's
TSV_DEFAULT = Path("bench_tsv") / "all_angles_bench_huggingface.tsv"
REQUIRED = ("index", "category", "question", "answer")


def _as_list(v, path: Path, idx) -> list[str]:
    """image_path cells: a list (JSON) or a list literal / single path string (TSV)."""
    if isinstance(v, list):
        return [str(x) for x in v]
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            for parse in (json.loads, ast.literal_eval):
                try:
                    out = parse(s)
                    return [str(x) for x in out]
                except (ValueError, SyntaxError):
                    continue
            raise BenchmarkDataError(f"{path}: index {idx}: cannot parse image_path {s[:80]!r}")
        return [s]
    raise BenchmarkDataError(f"{path}: index {idx}: image_path must be a list of paths")


@register
class AllAnglesBench(Benchmark):
    name = "all_angles"
    aliases = ("all-angles", "all_angles_bench", "all-angles-bench", "allangles")
    # official: the fork's own (pre-#1175) VLMEvalKit matching; vlmevalkit: the same pipeline scored with
    # VLMEvalKit's matching after PR #1175 (letter near the end, no option-text match on long answers)
    profiles = ("official", "vlmevalkit")
    matching = {"official": FORK_2025_04, "vlmevalkit": PR1175}
    media_kind = "images"
    # the fork's Qwen2.5-VL settings: temperature 0.01 / top_p 0.001 / top_k 1 is greedy in effect
    generation = {p: {"max_new_tokens": 2048, "do_sample": False} for p in profiles}
    # VLMEvalKit Qwen2VLChat image sizing (small views are upscaled to >= 1280 visual tokens each)
    pixels = {p: {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28} for p in profiles}

    def resolve_file(self, root: str | Path) -> Path:
        root = Path(root)
        if root.is_file():
            return root
        if not root.is_dir():
            raise BenchmarkDataError(f"All-Angles Bench root {root} does not exist")
        for cand in (root / "data.json", root / TSV_DEFAULT):
            if cand.is_file():
                return cand
        tsvs = sorted(root.glob("*.tsv"))
        if tsvs:
            return tsvs[0]
        raise BenchmarkDataError(f"All-Angles Bench: no data.json (or {TSV_DEFAULT}) in {root}")

    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        path = self.resolve_file(root)
        img_root = Path(root) if Path(root).is_dir() else path.parent
        if path.suffix == ".tsv":
            rows = read_tsv_rows(path)
            if path.parent.name == "bench_tsv":  # paths in the official TSV are relative to the HF root
                img_root = path.parent.parent
        else:
            rows = read_json_rows(path)
        require_fields(rows, REQUIRED, path, "index")
        samples = []
        for row, r in enumerate(rows):
            idx = r["index"]
            labels = [c for c in string.ascii_uppercase if c in r and not is_missing(r[c])]
            if r["answer"] not in labels:
                raise BenchmarkDataError(f"{path}: index {idx}: answer {r['answer']!r} is not one of {labels}")
            blobs = None
            if "image_path" in r and not is_missing(r["image_path"]):
                paths = [p if Path(p).is_absolute() else str(img_root / p) for p in _as_list(r["image_path"], path, idx)]
            elif "image" in r:  # non-meta VLMEvalKit TSV: base64 image(s) inline, decoded on request
                paths = []
                blobs = decode_b64_images(r["image"]) if with_media else None
            else:
                raise BenchmarkDataError(f"{path}: index {idx}: no image_path")
            pair = r.get("pair_idx")
            samples.append(Sample(
                benchmark=self.name, sample_id=str(idx).strip(), split="test", category=str(r["category"]),
                agg_group=str(r["category"]), answer_type="mc", question=str(r["question"]),
                options=[str(r[c]) for c in labels], option_labels=labels, answer=str(r["answer"]).strip(),
                media=Media("images", paths, blobs),
                meta={"folder": r.get("folder"), "pair_idx": None if is_missing(pair) else str(pair),
                      "sourced_dataset": r.get("sourced_dataset"), "file": str(path), "row": row}))
        return samples

    def fetch_media(self, sample: Sample) -> list:
        if sample.media.blobs is None and not sample.media.paths:  # base64 TSV loaded without media
            return decode_b64_images(tsv_row(sample.meta["file"], sample.meta["row"])["image"])
        return super().fetch_media(sample)

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        # VLMEvalKit ImageMCQDataset.build_prompt with the fork's "Hint:" line disabled
        opts = "".join(f"{k}. {v}\n" for k, v in zip(sample.option_labels, sample.options))
        return f"Question: {sample.question}\nOptions:\n{opts}{POST_PROMPT}"

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        choices = dict(zip(sample.option_labels, sample.options))
        opt = can_infer(raw_output, choices, self.matching[profile])
        if opt is None:  # VLMEvalKit would ask chatgpt-0125 here; offline it records "Z" (wrong)
            return ScoreResult("Z", 0.0, judge_unavailable=True)
        return ScoreResult(opt, 1.0 if opt == sample.answer else 0.0)

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        out = micro_and_categories(samples, preds)  # report_acc: overall is micro over questions
        if "camera_pose_estimation" in out["categories"]:
            out["headline"] = {"camera_pose_estimation": out["categories"]["camera_pose_estimation"]}
        return out
