"""Video-MME (lmms-lab/Video-MME), prompted, parsed and aggregated as lmms-eval's `videomme` task does.

Layout (HF `lmms-lab/Video-MME`): ROOT/videomme/test-00000-of-00001.parquet (2,700 rows: video_id, duration,
domain, sub_category, url, videoID, question_id, task_type, question, options, answer) and the unzipped
videos_chunked_*.zip at ROOT/data/<videoID>.mp4 (lmms-eval also accepts .MP4 / .mkv). `options` already
carry their letters ("A. Apples."); `answer` is the letter.

Source: lmms-eval 0.7.3 `lmms_eval/tasks/videomme/utils.py` (videomme_doc_to_text, extract_characters_regex ->
`_task_utils/mcq_extract.extract_mcq_answer`, videomme_process_results, videomme_aggregate_results) and
`videomme.yaml` (default lmms_eval_specific_kwargs, generation_kwargs); responses first go through lmms-eval's
default reasoning-tag stripping (lmms_eval_compat). ``videomme`` is the subtitle-free task; ``videomme_w_subtitle``
(lmms-eval's task of that name) puts each video's subtitles (ROOT/subtitle/<videoID>.srt, from subtitle.zip) before
the question, selected as bench/subtitles.py describes. Headline: overall accuracy (micro over questions; an
unparsed answer counts as wrong), plus short / medium / long (lmms-eval only logs the breakdowns; its metric is
the overall).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from gasp_vlm.bench.lmms_eval_compat import extract_mcq_answer, strip_reasoning_tags
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import Benchmark, ScoreResult, register
from gasp_vlm.bench.tables import BenchmarkDataError, read_parquet_rows, require_fields

DURATIONS = ("short", "medium", "long")
DOMAINS = ("Knowledge", "Film & Television", "Sports Competition", "Artistic Performance", "Life Record",
           "Multilingual")
TASK_TYPES = ("Temporal Perception", "Spatial Perception", "Attribute Perception", "Action Recognition",
              "Object Recognition", "OCR Problems", "Counting Problem", "Temporal Reasoning", "Spatial Reasoning",
              "Action Reasoning", "Object Reasoning", "Information Synopsis")
REQUIRED = ("duration", "domain", "sub_category", "videoID", "question_id", "task_type", "question", "options",
            "answer")
CHOICES = ("A", "B", "C", "D")
PARQUET = "videomme/test-00000-of-00001.parquet"
LAYOUT = (f"expected the HF lmms-lab/Video-MME layout: ROOT/{PARQUET} (columns {', '.join(REQUIRED)}) "
          "and the videos at ROOT/data/<videoID>.mp4")

# lmms-eval videomme_doc_to_text: this instruction is used even without subtitles ("... and the subtitles").
OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
# videomme.yaml default post_prompt (note the leading newline: a blank line before it)
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
# "paper" profile: the Video-MME authors' frames-only prompt, quoted in a comment of the same utils.py
PAPER_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. Respond with "
                "only the letter (A, B, C, or D) of the correct option.")
PAPER_POST = "The best answer is:"
# videomme_doc_to_text_subtitle: the block before the question (note the space before the newline)
SUBTITLES_PROMPT = "This video's subtitles are listed below: \n"


def extract_characters_regex(s: str) -> str:
    """lmms-eval 0.7.3's Video-MME parser: `extract_mcq_answer(s, choices=["A", "B", "C", "D"])`.

    (Older lmms-eval releases stripped a few "The answer is" prefixes and took the first capital A-D anywhere;
    that rule is gone upstream, and no release is pinned for it here, so it is not kept.)"""
    return extract_mcq_answer(s, choices=CHOICES)


def _subtitle_path(data_dir: Path, video_id: str) -> Path:
    return data_dir.parent / "subtitle" / f"{video_id}.srt"


def _video_path(data_dir: Path, video_id: str) -> Path:
    p = data_dir / f"{video_id}.mp4"
    for alt in (p, p.with_suffix(".MP4"), p.with_suffix(".mkv")):  # lmms-eval's fallbacks, in its order
        if alt.is_file():
            return alt
    return p  # absent: check_media_exists names it before any model time is spent


@register
class VideoMME(Benchmark):
    name = "videomme"
    aliases = ("video-mme", "video_mme")
    profiles = ("official", "paper")
    media_kind = "video"
    # videomme.yaml: max_new_tokens 16, temperature 0 (greedy)
    generation = {"official": {"max_new_tokens": 16, "do_sample": False},
                  "paper": {"max_new_tokens": 16, "do_sample": False}}
    # lmms-eval's Qwen2.5-VL / LLaVA-OneVision / llava_vid runs default to 32 uniform frames
    default_frames = 32

    def resolve_file(self, root: str | Path) -> tuple[Path, Path]:
        """(question parquet, video folder)."""
        root = Path(root)
        if root.is_file():
            if root.suffix != ".parquet":
                raise BenchmarkDataError(f"Video-MME: {root} is not a parquet file; {LAYOUT}")
            base = root.parent.parent if root.parent.name == "videomme" else root.parent
            return root, base / "data"
        if not root.is_dir():
            raise BenchmarkDataError(f"Video-MME root {root} does not exist; {LAYOUT}")
        found = sorted((root / "videomme").glob("test-*.parquet")) or sorted(root.glob("test-*.parquet"))
        if not found:
            raise BenchmarkDataError(f"Video-MME: no {root / PARQUET}; {LAYOUT}")
        return found[0], root / "data"

    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        if split not in (None, "test", *DURATIONS):
            raise BenchmarkDataError(f"Video-MME: unknown split {split!r}; use test, short, medium or long")
        path, data_dir = self.resolve_file(root)
        rows = read_parquet_rows(path)
        require_fields(rows, REQUIRED, path, "question_id")
        samples = []
        for r in rows:
            qid = str(r["question_id"])
            if r["duration"] not in DURATIONS:
                raise BenchmarkDataError(f"{path}: question_id {qid}: unknown duration {r['duration']!r}")
            opts = [str(o) for o in (r["options"] or [])]
            if len(opts) < 2:
                raise BenchmarkDataError(f"{path}: question_id {qid}: expected a list of options, got {r['options']!r}")
            if split in DURATIONS and r["duration"] != split:
                continue  # lmms-eval's videomme_long etc. filter on duration the same way
            samples.append(Sample(
                benchmark=self.name, sample_id=qid, split=split or "test", category=str(r["task_type"]),
                agg_group=str(r["duration"]), answer_type="mc", question=str(r["question"]), options=opts,
                option_labels=[o.strip()[:1] for o in opts], answer=str(r["answer"]).strip(),
                media=Media("video", [str(_video_path(data_dir, str(r["videoID"])))]),
                meta={"duration": r["duration"], "domain": r["domain"], "sub_category": r["sub_category"],
                      "videoID": r["videoID"], "video_id": r.get("video_id"), "url": r.get("url"),
                      "subtitle": str(_subtitle_path(data_dir, str(r["videoID"])))}))
        return samples

    @staticmethod
    def question_block(sample: Sample) -> str:
        """The question and its lettered options, one per line (lmms-eval's `question + "\\n" + option`)."""
        return sample.question + "\n" + "\n".join(sample.options)

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        question = self.question_block(sample)
        if profile == "paper":
            return f"{PAPER_PROMPT}\n{question}\n{PAPER_POST}"
        return f"{OPTION_PROMPT}\n{question}\n{POST_PROMPT}"

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        pred = extract_characters_regex(strip_reasoning_tags(raw_output))
        return ScoreResult(pred, 1.0 if pred.lower() == sample.answer.lower() else 0.0)

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        """videomme_aggregate_results: every number is a micro mean over the questions of its bucket."""
        buckets: dict[str, dict[str, list[float]]] = {k: {} for k in ("duration", "domain", "sub_category", "task")}
        all_scores = []
        for s, p in zip(samples, preds):
            all_scores.append(p.score)
            for key, val in (("duration", s.meta["duration"]), ("domain", s.meta["domain"]),
                             ("sub_category", s.meta["sub_category"]), ("task", s.category)):
                buckets[key].setdefault(str(val), []).append(p.score)

        def pct(d: dict[str, list[float]], order: Sequence[str] = ()) -> dict[str, float]:
            keys = [k for k in order if k in d] + [k for k in d if k not in order]
            return {k: 100.0 * sum(d[k]) / len(d[k]) for k in keys}

        durations = pct(buckets["duration"], DURATIONS)
        return {"overall": 100.0 * sum(all_scores) / len(all_scores) if all_scores else 0.0,
                "categories": pct(buckets["task"], TASK_TYPES),
                "durations": durations, "domains": pct(buckets["domain"], DOMAINS),
                "sub_categories": pct(buckets["sub_category"]),
                "category_counts": {k: len(v) for k, v in buckets["task"].items()},
                "headline": durations}


@register
class VideoMMESubtitles(VideoMME):
    """lmms-eval's `videomme_w_subtitle`: the same questions, videos, parser and aggregation, with the video's
    subtitles at 32 uniformly sampled frames before the question (a video without an .srt file reads "No
    subtitles available") and "The best answer is:" in place of the post-prompt."""

    name = "videomme_w_subtitle"
    aliases = ("videomme-subtitles", "video-mme-subtitles")
    profiles = ("official",)
    generation = {"official": {"max_new_tokens": 16, "do_sample": False}}  # videomme_w_subtitle.yaml

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        from gasp_vlm.bench.subtitles import subtitle_text

        subs = subtitle_text(sample.media.paths[0], sample.meta["subtitle"])
        return f"{SUBTITLES_PROMPT}{subs}\n{OPTION_PROMPT}\n{self.question_block(sample)}\n{PAPER_POST}"
