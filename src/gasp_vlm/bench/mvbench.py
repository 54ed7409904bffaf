"""MVBench (OpenGVLab/MVBench), prompted, parsed and aggregated as lmms-eval's `mvbench_*` tasks do.

Layout (HF `OpenGVLab/MVBench`, main branch, zips under video/ unzipped in place): ROOT/json/<task>.json, one
list per task of {video, question, candidates, answer[, start, end]}, and the media at
ROOT/video/<prefix>/<video> with the per-task prefixes of the official loader (Ask-Anything mvbench.ipynb
`data_list`, reproduced in TASKS). Episodic reasoning is a folder of 3 fps frames (00001.jpg, ...); five tasks
carry start/end bounds in seconds.

Source: lmms-eval `lmms_eval/tasks/mvbench/utils.py` (0.7.3: mvbench_doc_to_text, mcq_acc, mvbench_process_results,
mvbench_aggregate_results), `_default_template_yaml` (generation) and `mvbench_<task>.yaml` (post_prompt per
task; lmms-eval 0.7.3 gives all 20 POST_PROMPT). lmms-eval reads the dataset's `video`
revision (folders LMMS_EVAL_FOLDERS), whose clips are already cut to the bounds: when those folders exist they
are used and sampled whole, as lmms-eval does. Otherwise (main branch) the bounds are applied when sampling
frames (K uniform frames within [start, end], index rule of the official `get_index` for the window ends).
Headline: the mean of the 20 task accuracies (MVBench's "Avg"); lmms-eval 0.7.3 reports only the per-task
scores (its `mvbench` group has no aggregate_metric_list), so this mean is taken on top of them.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gasp_vlm.bench.lmms_eval_compat import strip_reasoning_tags
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import Benchmark, ScoreResult, register
from gasp_vlm.bench.tables import BenchmarkDataError, read_json_rows, require_fields

# task -> (media prefix under ROOT/video/, data_type, has start/end), in the paper's table order
TASKS: dict[str, tuple[str, str, bool]] = {
    "action_sequence": ("star/Charades_v1_480", "video", True),
    "action_prediction": ("star/Charades_v1_480", "video", True),
    "action_antonym": ("ssv2_video", "video", False),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action": ("FunQA_test/test", "video", False),
    "object_existence": ("clevrer/video_validation", "video", False),
    "object_interaction": ("star/Charades_v1_480", "video", True),
    "object_shuffle": ("perception/videos", "video", False),
    "moving_direction": ("clevrer/video_validation", "video", False),
    "action_localization": ("sta/sta_video", "video", True),
    "scene_transition": ("scene_qa/video", "video", False),
    "action_count": ("perception/videos", "video", False),
    "moving_count": ("clevrer/video_validation", "video", False),
    "moving_attribute": ("clevrer/video_validation", "video", False),
    "state_change": ("perception/videos", "video", False),
    "fine_grained_pose": ("nturgbd", "video", False),
    "character_order": ("perception/videos", "video", False),
    "egocentric_navigation": ("vlnqa", "video", False),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "frame", True),
    "counterfactual_inference": ("clevrer/video_validation", "video", False),
}
FRAME_FPS = 3  # frames_fps3_hq: the official read_frame assumes 3 fps, numbering from 1
REQUIRED = ("video", "question", "candidates", "answer")
LAYOUT = ("expected the HF OpenGVLab/MVBench layout: ROOT/json/<task>.json (lists of {video, question, candidates, "
          "answer[, start, end]}) and media at ROOT/video/<prefix>/<video>, e.g. video/star/Charades_v1_480/X.mp4")

# lmms-eval 0.7.3 mvbench_<task>.yaml: every one of the 20 tasks sets post_prompt "Only give the best option.\n"
# (the snapshot this module was first written from gave 12 tasks "Answer with the option's letter ...")
POST_PROMPT = "Only give the best option.\n"
POST_PROMPTS = {t: POST_PROMPT for t in TASKS}
# lmms-eval 0.7.3 DATA_LIST: where the dataset's `video` revision keeps each task's clips, already cut to the
# question's [start, end] (episodic_reasoning as a video too: its yaml leaves mvbench_frames_doc_to_visual
# commented out). The lmms-eval model wrapper then samples K frames uniformly over the whole clip.
LMMS_EVAL_FOLDERS = {
    "object_interaction": "star/Charades_segment", "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment", "action_localization": "sta/sta_video_segment",
    "fine_grained_pose": "nturgbd_convert", "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "action_antonym": "ssv2_video_mp4"}
LMMS_EVAL_FOLDERS.update({t: v[0] for t, v in TASKS.items() if t not in LMMS_EVAL_FOLDERS})


# ---- mcq_acc, re-implemented rule for rule --------------------------------------------------------------
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # upstream's (?!<=...) is a typo for (?<!...): kept
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_OPTION_RE = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LETTER_RE = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, 32)  # upstream passes re.UNICODE (32) where `count` goes


def mcq_process(answer: str) -> str:
    """mcq_acc's inner `process`: "X. text" -> X; else the first standalone a-e letter, else the cleaned text."""
    m = _OPTION_RE.match(answer.strip())
    if m:
        return m.group(1).upper()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = _process_punctuation(answer)
    answer = answer.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = _LETTER_RE.search(answer)  # note: the article "a" counts as option A
    return m.group(1).upper() if m else answer


# ---- frame sampling within the bounds ----------------------------------------------------------------
def bounded_indices(n_frames: int, fps: float, bound: Sequence[float] | None, k: int, first_idx: int = 0) -> list[int]:
    """K uniform indices inside [start, end] s. The window ends follow the official get_index:
    start = max(first_idx, round(start*fps)), end = min(round(end*fps), max_frame); frame folders count from 1."""
    max_frame = n_frames - 1 + first_idx
    start, end = first_idx, max_frame
    if bound is not None:
        start, end = max(first_idx, round(bound[0] * fps)), min(round(bound[1] * fps), max_frame)
        if end < start:  # a bound outside the clip: use the whole clip rather than fail the run
            start, end = first_idx, max_frame
    return np.linspace(start, end, k, dtype=int).tolist()


def _decode_at(path: Path, idx: list[int]) -> list[Any]:
    from gasp_vlm.bench.media import decode_at

    got, _, tail = decode_at(path, idx)
    if tail is None:
        raise ValueError("no decodable frames")
    return [got.get(i, tail) for i in idx]  # a header that over-counts frames: repeat the last real one


@register
class MVBench(Benchmark):
    name = "mvbench"
    aliases = ("mv-bench", "mv_bench")
    profiles = ("official",)
    media_kind = "video"
    generation = {"official": {"max_new_tokens": 16, "do_sample": False}}  # _default_template_yaml, greedy
    default_frames = 32  # lmms-eval's video models (qwen2_5_vl, llava_onevision, llava_vid) default to 32
    frame_sampling = ("np.linspace(start, end, K, dtype=int) inside each question's [start, end] bound (window ends "
                      "as the official get_index; frame folders at 3 fps, numbered from 1), else over all frames "
                      "(lmms-eval's pre-cut `video`-revision clips, when present, are sampled whole)")

    def _task_files(self, root: Path) -> list[tuple[str, Path]]:
        if root.is_file():
            if root.stem not in TASKS:
                raise BenchmarkDataError(f"MVBench: {root} is not one of the 20 task files; {LAYOUT}")
            return [(root.stem, root)]
        json_dir = root / "json"
        if not json_dir.is_dir():
            raise BenchmarkDataError(f"MVBench: no folder {json_dir}; {LAYOUT}")
        found = [(t, json_dir / f"{t}.json") for t in TASKS if (json_dir / f"{t}.json").is_file()]
        if not found:
            raise BenchmarkDataError(f"MVBench: none of the 20 task files (e.g. {json_dir / 'action_sequence.json'}) "
                                     f"found; {LAYOUT}")
        return found

    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        root = Path(root)
        if not root.exists():
            raise BenchmarkDataError(f"MVBench root {root} does not exist; {LAYOUT}")
        if split not in (None, "test", "train", *TASKS):  # lmms-eval calls the only split "train"; a task name filters
            raise BenchmarkDataError(f"MVBench: unknown split {split!r}; use test or one task name")
        base = root.parent.parent if root.is_file() else root
        samples = []
        for task, path in self._task_files(root):
            if split in TASKS and task != split:
                continue
            prefix, data_type, has_bound = TASKS[task]
            media_dir, bounded = base / "video" / prefix, has_bound
            if not media_dir.is_dir() and (base / "video" / "data0613" / prefix).is_dir():
                media_dir = base / "video" / "data0613" / prefix  # an older unzip layout of the main branch
            seg = LMMS_EVAL_FOLDERS[task]
            if seg != prefix:  # lmms-eval's `video` revision present: its pre-cut clips, sampled whole
                for cand in (base / seg, base / "video" / seg):
                    if cand.is_dir():
                        media_dir, data_type, bounded = cand, "video", False
                        break
            rows = read_json_rows(path)
            require_fields(rows, REQUIRED + (("start", "end") if bounded else ()), path)
            for i, r in enumerate(rows):
                cands = [str(c) for c in r["candidates"]]
                if str(r["answer"]) not in cands:  # upstream would crash on a None letter
                    raise BenchmarkDataError(f"{path}: row {i}: answer {r['answer']!r} is not among the candidates")
                letters = list(string.ascii_uppercase[:len(cands)])
                meta: dict[str, Any] = {"task": task, "video": r["video"], "data_type": data_type,
                                        "answer_text": str(r["answer"])}
                if bounded:
                    meta["bound"] = [float(r["start"]), float(r["end"])]
                samples.append(Sample(
                    benchmark=self.name, sample_id=f"{task}_{i}", split=split or "test", category=task,
                    agg_group=task, answer_type="mc", question=str(r["question"]), options=cands,
                    # the gold letter, as mvbench_process_results derives it (first equal candidate)
                    option_labels=letters, answer=letters[cands.index(str(r["answer"]))],
                    media=Media("video", [str(media_dir / r["video"])]), meta=meta))
        return samples

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        opts = "".join(f"({lab}) {o}\n" for lab, o in zip(sample.option_labels, sample.options))
        return "Question:" + sample.question + "\nOption:\n" + opts + POST_PROMPTS[sample.category]

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        pred = mcq_process(strip_reasoning_tags(raw_output))
        return ScoreResult(pred, 1.0 if pred == mcq_process(sample.answer) else 0.0)

    def video_frames(self, sample: Sample, k: int, videos: Any) -> tuple[list[Any], list[int], int]:
        """Whole unbounded videos go through the shared cache; bounded clips and frame folders are sampled here."""
        from gasp_vlm.bench.media import MediaError, video_header

        path, bound = Path(sample.media.paths[0]), sample.meta.get("bound")
        if path.is_dir():  # episodic_reasoning: 00001.jpg ... at 3 fps
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if not files:
                raise MediaError(f"frame folder {path} holds no .jpg/.png frames")
            idx = bounded_indices(len(files), FRAME_FPS, bound, k, first_idx=1)
            from gasp_vlm.bench.media import decode_image

            return [decode_image(files[i - 1]) for i in idx], idx, len(files)
        if bound is None:
            return videos.read(path, k)
        if not path.is_file():
            raise MediaError(f"video not found: {path}")
        try:
            n, fps, _ = video_header(path)
            idx = bounded_indices(n, fps or 30.0, bound, k)
            return _decode_at(path, idx), idx, n
        except Exception as e:  # PyAV raises several error types for broken files
            raise MediaError(f"cannot decode video {path}: {e}") from None

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        """mvbench_aggregate_results per task: accuracy over the answered questions (an empty output is left out
        of the denominator, as upstream does); overall = unweighted mean of the task accuracies (MVBench "Avg";
        lmms-eval 0.7.3 computes no group score)."""
        per: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        empty = 0
        for s, p in zip(samples, preds):
            counts[s.category] = counts.get(s.category, 0) + 1
            # mvbench_aggregate_results skips pred_answer == "", the response after lmms-eval's
            # reasoning-tag stripping (which also strips whitespace): a blank answer is left out too
            if p.raw_output is not None and strip_reasoning_tags(p.raw_output) == "":
                empty += 1
                per.setdefault(s.category, [])
                continue
            per.setdefault(s.category, []).append(p.score)  # a missing answer (None) stays in, as a 0
        order = [t for t in TASKS if t in per]
        cats = {t: 100.0 * sum(per[t]) / len(per[t]) if per[t] else 0.0 for t in order}
        overall = sum(cats.values()) / len(cats) if cats else 0.0
        return {"overall": overall, "categories": cats, "category_counts": {t: counts[t] for t in order},
                "num_empty_excluded": empty, "headline": {"mean_of_tasks": overall}}
