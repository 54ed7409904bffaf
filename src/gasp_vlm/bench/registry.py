"""Benchmark registry and the shared scoring loop.

A benchmark is a small class registered under a name (lm-evaluation-harness style). It owns four
versioned pieces: `load` (on-disk layout -> Samples), `render_prompt` (Sample -> text), `score`
(raw output -> parsed answer + score) and `aggregate` (scores -> the official summary). Profiles
select between the official protocol and compatibility variants (e.g. lmms-eval's parsers).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gasp_vlm.bench.records import Prediction, Sample

_REGISTRY: dict[str, type["Benchmark"]] = {}
_ALIASES: dict[str, str] = {}

# lmms-eval's Qwen2.5-VL defaults (EvolvingLMMs-Lab/lmms-eval lmms_eval/models/simple/qwen2_5_vl.py,
# Qwen2_5_VL.__init__ / generate_until; models/chat/qwen2_5_vl.py inherits them): what every `lmms_eval`
# profile feeds a Qwen2.5-VL model. min/max_pixels go to images and to each video frame.
LMMS_EVAL_QWEN2_5_VL: dict[str, Any] = {
    "harness": "lmms-eval qwen2_5_vl",
    "min_pixels": 256 * 28 * 28,  # 200704
    "max_pixels": 1605632,
    "max_num_frames": 32,
    "system_prompt": "You are a helpful assistant.",
    "frame_sampling": "qwen_vl_utils.process_vision_info decodes the video at its default 2 fps (T frames), then "
                      "np.linspace(0, T-1, max_num_frames, dtype=int), appending T-1 if absent",
}
_BUILTIN_MODULES = ("vsibench", "all_angles", "blink", "mmsi", "videomme", "mvbench")


@dataclass
class ScoreResult:
    parsed: str | None
    score: float
    judge_unavailable: bool = False  # the official pipeline would have called a GPT judge here


class Benchmark:
    """Base class; subclasses set the class attributes and implement the four methods."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ("official",)
    media_kind: str = "images"  # "video": frames are sampled from one file per sample
    # decoding per profile (greedy everywhere; max_new_tokens as each official pipeline sets it)
    generation: dict[str, dict[str, Any]] = {"official": {"max_new_tokens": 16, "do_sample": False}}
    # per-request image sizing the official pipeline fixes for Qwen-VL models (None: the model's default)
    pixels: dict[str, dict[str, int] | None] = {}
    # model-side settings a profile's harness imposes (e.g. LMMS_EVAL_QWEN2_5_VL); the runner applies
    # min/max_pixels and max_num_frames and records all of it in run.json. The system turn stays the
    # adapter's own chat default (Qwen2.5-VL's is the same "You are a helpful assistant.")
    model_settings: dict[str, dict[str, Any]] = {}

    # -- the four pieces ---------------------------------------------------------------------------
    def load(self, root: str | Path, *, split: str | None = None, with_media: bool = False) -> list[Sample]:
        raise NotImplementedError

    def render_prompt(self, sample: Sample, profile: str = "official") -> str:
        raise NotImplementedError

    def score(self, sample: Sample, raw_output: str, profile: str = "official") -> ScoreResult:
        raise NotImplementedError

    def aggregate(self, samples: Sequence[Sample], preds: Sequence[Prediction], profile: str = "official") -> dict:
        """Default: micro overall + per-category means, in percent."""
        return micro_and_categories(samples, preds)

    def fetch_media(self, sample: Sample) -> list:
        """The sample's images in order, as encoded bytes or file paths (decoded by bench.media)."""
        return list(sample.media.blobs) if sample.media.blobs is not None else list(sample.media.paths)

    def video_frames(self, sample: Sample, k: int, videos: Any) -> tuple[list, list[int], int]:
        """K frames of a video-kind sample as (PIL frames, indices, total frames); `videos` is the run's
        VideoFrameCache. Default: K uniform frames over the whole file. MVBench overrides it (time bounds,
        frame folders)."""
        return videos.read(sample.media.paths[0], k)

    # -- helpers -------------------------------------------------------------------------------------
    def check_profile(self, profile: str) -> str:
        if profile not in self.profiles:
            raise ValueError(f"benchmark {self.name!r} has no profile {profile!r}; available: {', '.join(self.profiles)}")
        return profile

    def generation_config(self, profile: str = "official") -> dict[str, Any]:
        return dict(self.generation.get(profile, self.generation["official"]))

    def pixel_config(self, profile: str = "official") -> dict[str, int] | None:
        px = self.pixels.get(profile)
        if not px:  # a harness profile sizes images as that harness's model wrapper does
            model = self.model_config(profile) or {}
            px = {k: model[k] for k in ("min_pixels", "max_pixels") if k in model}
        return dict(px) if px else None

    def model_config(self, profile: str = "official") -> dict[str, Any] | None:
        cfg = self.model_settings.get(profile)
        return dict(cfg) if cfg else None

    def __repr__(self) -> str:
        return f"<Benchmark {self.name}>"


def register(cls: type[Benchmark]) -> type[Benchmark]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    for a in (cls.name, *cls.aliases):
        _ALIASES[a.lower()] = cls.name
    return cls


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"gasp_vlm.bench.{mod}")


def available_benchmarks() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_benchmark(name: str) -> Benchmark:
    """Instantiate a registered benchmark by name or alias (case-insensitive, '-'/'_' equivalent)."""
    _load_builtins()
    key = name.lower()
    canon = _ALIASES.get(key) or _ALIASES.get(key.replace("-", "_")) or _ALIASES.get(key.replace("_", "-"))
    if canon is None:
        raise KeyError(f"unknown benchmark {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[canon]()


# ---- aggregation helpers -------------------------------------------------------------------------

def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def per_key_means(samples: Sequence[Sample], preds: Sequence[Prediction], key: str = "category") -> dict[str, float]:
    """Mean score (0-1) per `Sample.<key>`, keys in first-seen order."""
    buckets: dict[str, list[float]] = defaultdict(list)
    for s, p in zip(samples, preds):
        buckets[getattr(s, key)].append(p.score)
    return {k: _mean(v) for k, v in buckets.items()}


def micro_and_categories(samples: Sequence[Sample], preds: Sequence[Prediction]) -> dict:
    """Official VLMEvalKit-style report: overall = mean over all questions, plus per-category means."""
    cats = per_key_means(samples, preds, "category")
    return {"overall": 100.0 * _mean([p.score for p in preds]),
            "categories": {k: 100.0 * v for k, v in cats.items()},
            "category_counts": _counts(samples, "category")}


def _counts(samples: Sequence[Sample], key: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in samples:
        out[getattr(s, key)] += 1
    return dict(out)


# ---- the shared scoring loop -----------------------------------------------------------------------

def score_samples(bench: Benchmark, samples: Sequence[Sample], raw_by_id: dict[str, Any],
                  profile: str = "official") -> tuple[dict, list[Prediction]]:
    """Score raw outputs against samples; return (results dict in percent, per-sample predictions).

    `raw_by_id` maps sample_id -> raw output string, or -> a dict with at least `raw_output` (extra
    fields such as `prompt`/`frame_indices` are carried into the Prediction). A sample without a
    prediction (or with a null raw_output) scores 0 and counts in `num_missing`.
    """
    bench.check_profile(profile)
    preds: list[Prediction] = []
    missing = judge = 0
    judge_by_cat: dict[str, int] = {}
    known = set()
    for s in samples:
        known.add(s.sample_id)
        rec = raw_by_id.get(s.sample_id)
        if isinstance(rec, dict):
            raw, prompt, frames = rec.get("raw_output"), rec.get("prompt"), rec.get("frame_indices")
        else:
            raw, prompt, frames = rec, None, None
        if raw is None:
            missing += 1
            preds.append(Prediction(s.sample_id, None, None, 0.0, prompt, frames, profile, False, s.category))
            continue
        r = bench.score(s, raw, profile)
        judge += int(r.judge_unavailable)
        if r.judge_unavailable:  # where the official pipeline would have paid a GPT judge
            judge_by_cat[str(s.category)] = judge_by_cat.get(str(s.category), 0) + 1
        preds.append(Prediction(s.sample_id, raw, r.parsed, float(r.score), prompt, frames, profile,
                                r.judge_unavailable, s.category))
    results = {"benchmark": bench.name, "profile": profile}
    results.update(bench.aggregate(samples, preds, profile))
    results.update({"num_samples": len(samples), "num_missing": missing,
                    "num_unknown_predictions": sum(1 for k in raw_by_id if k not in known),
                    "judge_unavailable": judge, "judge_unavailable_by_category": judge_by_cat})
    return results, preds
