"""MMSI-Bench (RunsenXu/MMSI-Bench), scored as its README / VLMEvalKit fork does.

Layout: ROOT/MMSI_Bench.parquet (`id`, `images` = list of JPEG bytes, `question_type`, `question` with
the options embedded, `answer`, `thought`) or the VLMEvalKit ROOT/MMSI_bench.tsv (`index`, `image` =
JSON list of base64, `question`, `answer`, `category`).
"""

from __future__ import annotations

import re
from pathlib import Path

from gasp_vlm.bench.records import Media, Sample
from gasp_vlm.bench.registry import Benchmark, ScoreResult, register
from gasp_vlm.bench.tables import (BenchmarkDataError, decode_b64_images, parquet_cells, read_parquet_rows,
                                  read_tsv_rows, require_fields, tsv_row)

POST_PROMPT = "Answer with the option's letter from the given choices directly. Enclose the option's letter within ``."
CATEGORIES = tuple(f"Positional Relationship ({p})" for p in
                   ("Cam.–Cam.", "Cam.–Obj.", "Cam.–Reg.", "Obj.–Obj.", "Obj.–Reg.", "Reg.–Reg.")) + (
    "Attribute (Meas.)", "Attribute (Appr.)", "Motion (Cam.)", "Motion (Obj.)", "MSR")
_OFFICIAL_LETTER = re.compile(r"\b[A-D]\b(?!\s[a-zA-Z])")  # a lone capital, not the article in "A bike"
_LMMS_LETTER = re.compile(r"\b[A-F]\b(?!\s[a-zA-Z])", re.IGNORECASE)


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
    media_kind = "images"
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
            cat = canonical_category(str(r[cat_key]))
            samples.append(Sample(
                benchmark=self.name, sample_id=str(r[id_key]).strip(), split="test", category=cat, agg_group=cat,
                answer_type="mc", question=str(r["question"]), options=[], option_labels=list("ABCD"),
                answer=str(r["answer"]).strip(), media=Media("images", [], blobs),
                meta={"file": str(path), "row": row}))
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
        return f"{sample.question}\n{POST_PROMPT}"

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        if profile == "lmms_eval":
            letter = extract_letter(raw_output, _LMMS_LETTER)
            letter = letter.upper() if letter else None
            return ScoreResult(letter, 1.0 if letter and letter == sample.answer.upper() else 0.0)
        letter = extract_letter(raw_output)
        if letter is None:  # the official pipeline falls back to VLMEvalKit's LLM extraction here
            return ScoreResult(None, 0.0, judge_unavailable=True)
        return ScoreResult(letter, 1.0 if sample.answer.lower() == letter.lower()[0] else 0.0)
