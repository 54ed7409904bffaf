"""Resumable benchmark generation + scoring.

`run_eval` renders each sample with its benchmark's prompt and media (VSI: K uniform frames), asks a
`Generator` for answers in batches, appends one JSON line per answer to OUT/predictions.jsonl (flushed
per line, so a crash loses at most the line being written), and finally scores into OUT/results.json.
Re-running with the same OUT skips the sample_ids already answered. Every setting that can change a
score (prompt profile, frames, decoding, library versions) is written to OUT/run.json.
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from gasp_vlm.bench.media import MediaError, VideoFrameCache, check_media_exists, decode_image
from gasp_vlm.bench.records import PredictionsFileError, Sample, read_predictions, repair_truncated_tail
from gasp_vlm.bench.registry import Benchmark, get_benchmark, score_samples
from gasp_vlm.io import write_json_atomic, write_jsonl_atomic

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RUN = "run.json"
SCORED = "scored.jsonl"
# run.json keys that must match for a resumed run to append to the same predictions file
RESUME_KEYS = ("benchmark", "profile", "split", "model", "frames", "generation", "pixels")


class Generator(Protocol):
    """Anything that maps requests dict(prompt, images=[PIL] | None, video=[PIL] | None) to output strings."""

    def __call__(self, requests: list[dict]) -> list[str]: ...


class AdapterGenerator:
    """A `Generator` over a gasp_vlm model adapter (`adapter.generate(requests, max_new_tokens, ...)`)."""

    def __init__(self, adapter: Any, **generation: Any) -> None:
        self.adapter = adapter
        self.generation = dict(generation)

    def __call__(self, requests: list[dict]) -> list[str]:
        return list(self.adapter.generate(requests, **self.generation))


def load_generator(model: str, generation: dict[str, Any], *, dtype: str = "float32", device: str = "cpu",
                   seed: int = 0) -> AdapterGenerator:
    """Load a preset / HF directory / exported GASP model through gasp_vlm.models.load_adapter."""
    from gasp_vlm.models import load_adapter  # the model side lives in gasp_vlm.models

    adapter = load_adapter(model, dtype=dtype, device=device, seed=seed)
    return AdapterGenerator(adapter, **generation)


def describe_generator(generator: Any) -> dict[str, Any]:
    """What is known about the model behind a generator (family, preset, frame mode, pixel defaults)."""
    adapter = getattr(generator, "adapter", None)
    if adapter is None:
        return {"generator": type(generator).__name__}
    info: dict[str, Any] = {"generator": type(generator).__name__}
    for k in ("family", "preset", "frame_mode", "min_pixels", "max_pixels"):
        v = getattr(adapter, k, None)
        if isinstance(v, (str, int, float, bool)):
            info[k] = v
    model = getattr(adapter, "model", None)
    if model is not None and hasattr(model, "parameters"):  # the weights' dtype: compared by `eval --compare`
        info["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return info


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("gasp-vlm", "torch", "transformers", "numpy", "av", "pillow", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def build_request(bench: Benchmark, sample: Sample, profile: str, frames: int | None,
                  pixels: dict[str, int] | None = None,
                  videos: VideoFrameCache | None = None) -> tuple[dict, list[int] | None]:
    """(request for the generator, frame indices used or None). `pixels` adds min/max_pixels to the request;
    `videos` shares decoded videos between the questions about them (default: no cache)."""
    req, idx = _build_request(bench, sample, profile, frames, videos or VideoFrameCache(0))
    if pixels:
        req.update(pixels)
    return req, idx


def _build_request(bench: Benchmark, sample: Sample, profile: str, frames: int | None,
                   videos: VideoFrameCache) -> tuple[dict, list[int] | None]:
    prompt = bench.render_prompt(sample, profile)
    if sample.media.kind == "video":
        try:
            imgs, idx, _total = bench.video_frames(sample, frames or 32, videos)
        except MediaError as e:
            raise MediaError(f"{sample.benchmark} sample {sample.sample_id}: {e}") from None
        return {"prompt": prompt, "images": None, "video": imgs}, idx
    images = []
    for i, src in enumerate(bench.fetch_media(sample)):
        try:
            images.append(decode_image(src))
        except MediaError as e:
            raise MediaError(f"{sample.benchmark} sample {sample.sample_id} image {i + 1}: {e}") from None
    return {"prompt": prompt, "images": images, "video": None}, None


def _check_resume(out: Path, config: dict) -> None:
    run_path = out / RUN
    if not run_path.exists() or not (out / PREDICTIONS).exists():
        return
    try:
        old = json.loads(run_path.read_text())
    except json.JSONDecodeError:
        return
    diffs = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diffs)
        raise ValueError(f"{out} holds predictions from a run with different settings ({detail}); "
                         f"use a new --out directory or delete {out / PREDICTIONS}")


def score_run(bench: Benchmark, samples: Sequence[Sample], predictions_path: Path, out: Path,
              profile: str = "official", extra: dict | None = None) -> dict:
    """Score a predictions file against samples; write results.json and scored.jsonl atomically.

    The whole file is read and checked before anything is written, so a bad predictions file leaves OUT
    untouched. The identical-repeat counts land in results.json (`duplicate_ids`, `duplicate_lines`).
    """
    raw, dups = read_predictions(predictions_path, tolerate_truncated_tail=True)
    known = {s.sample_id for s in samples}
    if raw and not known & set(raw):  # every id foreign: another benchmark's (or split's) predictions
        shown = ", ".join(repr(k) for k in list(raw)[:3])
        raise PredictionsFileError(f"{predictions_path}: none of its {len(raw)} sample_ids is a {bench.name} sample "
                                   f"(e.g. {shown}; {bench.name} ids look like {sorted(known)[:3]}): predictions "
                                   f"of another benchmark or split?")
    results, preds = score_samples(bench, samples, raw, profile)
    results.update(dups)
    if extra:
        results.update(extra)
    write_jsonl_atomic(out / SCORED, (p.to_json() for p in preds))
    write_json_atomic(out / RESULTS, results)
    return results


def shard_samples(samples: Sequence[Sample], rank: int, world: int) -> list[Sample]:
    """Rank ``rank``'s samples: the samples of one media file (its first path) stay together, files
    dealt round-robin in order of first appearance (text-only samples count as their own file)."""
    if world <= 1:
        return list(samples)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    groups: dict[str, int] = {}
    out = []
    for s in samples:
        paths = s.media.paths if s.media is not None else None
        g = groups.setdefault(paths[0] if paths else f"id:{s.sample_id}", len(groups))
        if g % world == rank:
            out.append(s)
    return out


def _prediction_files(out: Path) -> list[Path]:
    return [p for p in [out / PREDICTIONS, *sorted(out.glob("predictions.rank-*-of-*.jsonl"))] if p.exists()]


def _answers(out: Path) -> dict[str, dict]:
    """sample_id -> record over every prediction file in ``out`` (merged or per rank, any world size;
    the merged file first, so its record wins)."""
    records: dict[str, dict] = {}
    for p in _prediction_files(out):
        for sid, rec in read_predictions(p, tolerate_truncated_tail=True)[0].items():
            records.setdefault(sid, rec)
    return records


def _merge_ranks(out: Path, samples: Sequence[Sample], config: dict, wait_timeout_s: float | None, poll_s: float,
                 progress: bool) -> None:
    """Rank 0: wait until the prediction files cover every sample, then merge them (sample order) into
    predictions.jsonl, sum the ranks' decode counts into run.json and drop the per-rank files."""
    want = [s.sample_id for s in samples]
    t0, last_note = time.time(), 0.0
    while True:
        records = _answers(out)
        missing = set(want) - set(records)
        if not missing:
            break
        waited = time.time() - t0
        if wait_timeout_s is not None and waited > wait_timeout_s:
            raise TimeoutError(f"{out}: {len(missing)} samples still unanswered after {waited:.0f} s; did a rank "
                               f"fail? (its predictions.rank-*.jsonl and log tell); rerun to resume")
        if progress and waited - last_note >= 60:
            print(f"rank 0: waiting for the other ranks ({len(missing)} samples left)", flush=True)
            last_note = waited
        time.sleep(poll_s)
    files = _prediction_files(out)
    write_jsonl_atomic(out / PREDICTIONS, (records[sid] for sid in want))
    for p in out.glob("run.rank-*-of-*.json"):
        try:
            other = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        for k in ("video_decodes", "video_cache_hits", "num_generated"):
            config[k] = config.get(k, 0) + other.get(k, 0)
        p.unlink()
    config["generation_seconds_per_rank"] = config.pop("generation_seconds", None)
    write_json_atomic(out / RUN, config)
    for p in files:
        if p.name != PREDICTIONS:
            p.unlink()


def run_eval(benchmark: str | Benchmark, data_root: str | Path, generator: Generator | Callable[[list[dict]], list[str]],
             out_dir: str | Path, *, model_name: str = "", profile: str = "official", split: str | None = None,
             limit: int | None = None, frames: int | None = None, batch_size: int = 1,
             generation: dict[str, Any] | None = None, pixels: dict[str, int] | None | str = "official",
             model_info: dict[str, Any] | None = None, video_cache_bytes: int = 1 << 30,
             progress: bool = True, rank: int = 0, world: int = 1, wait_timeout_s: float | None = None,
             poll_s: float = 2.0) -> dict:
    """Generate (resumably) and score; return the results dict also written to OUT/results.json.

    Each video is decoded once and shared by its questions while it stays in a ``video_cache_bytes``
    LRU (0: decode per question); run.json records the decodes and cache hits.

    Data parallel (``world`` > 1, e.g. under torchrun / accelerate launch): rank r answers the samples of
    ``shard_samples`` (whole videos per rank, so the cache still serves every question of a video) into
    ``predictions.rank-r-of-W.jsonl`` and returns; rank 0 then waits until the prediction files together
    cover every sample, merges them into predictions.jsonl (sample order) and scores. No collective
    communication is needed, only the shared output folder; each rank resumes from its own file, and a
    rerun with another world size skips whatever any earlier file already answered.

    `generation` is what the generator was configured with (recorded, not applied here); default: the
    benchmark's official decoding settings. `pixels` ("official" = the benchmark's own, None = the model's
    default, or a dict) is added to every request as min_pixels/max_pixels.
    """
    from tqdm import tqdm

    bench = get_benchmark(benchmark) if isinstance(benchmark, str) else benchmark
    bench.check_profile(profile)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = bench.load(data_root, split=split)
    if limit is not None:
        samples = samples[:limit]
    if pixels == "official":
        pixels = bench.pixel_config(profile)
    model_cfg = bench.model_config(profile) or {}  # a harness profile's model-side settings (lmms_eval)
    if bench.media_kind == "video":
        frames = frames or model_cfg.get("max_num_frames") or getattr(bench, "default_frames", 32)
    else:
        frames = None  # image benchmarks feed every view; no sampling
    config = {
        "benchmark": bench.name, "profile": profile, "split": split, "data": str(Path(data_root).resolve()),
        "model": model_name, "frames": frames,
        "frame_sampling": getattr(bench, "frame_sampling", "np.linspace(0, N-1, K, dtype=int) over all decoded "
                                  "frames") if frames else None,
        "generation": dict(generation if generation is not None else bench.generation_config(profile)),
        "pixels": pixels, "model_settings": model_cfg or None,
        "model_info": model_info or describe_generator(generator),
        "batch_size": batch_size, "limit": limit, "num_samples": len(samples), "versions": library_versions(),
    }
    _check_resume(out, config)

    pred_path = out / (PREDICTIONS if world == 1 else f"predictions.rank-{rank}-of-{world}.jsonl")
    repair_truncated_tail(pred_path)  # a crash may have left half a line
    done = set(_answers(out))
    pending = [s for s in shard_samples(samples, rank, world) if s.sample_id not in done]
    check_media_exists(pending)  # fail before any model time is spent

    config["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    config["resumed_with_done"] = len(done & {s.sample_id for s in samples})
    config["data_parallel"] = world
    run_path = out / (RUN if rank == 0 else f"run.rank-{rank}-of-{world}.json")
    write_json_atomic(run_path, config)

    t0 = time.time()
    videos = VideoFrameCache(video_cache_bytes)
    with pred_path.open("a", encoding="utf-8") as f, tqdm(total=len(pending), disable=not progress,
                                                           desc=f"{bench.name}", unit="q") as bar:
        for start in range(0, len(pending), max(1, batch_size)):
            batch = pending[start:start + max(1, batch_size)]
            built = [build_request(bench, s, profile, frames, pixels, videos) for s in batch]
            outputs = generator([req for req, _ in built])
            if len(outputs) != len(batch):
                raise RuntimeError(f"generator returned {len(outputs)} outputs for {len(batch)} requests")
            for s, (req, idx), text in zip(batch, built, outputs):
                rec = {"sample_id": s.sample_id, "raw_output": text, "prompt": req["prompt"],
                       "frame_indices": idx, "category": s.category}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
            bar.update(len(batch))

    config["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    config["generation_seconds"] = round(time.time() - t0, 3)
    config["num_generated"] = len(pending)
    config["video_decodes"], config["video_cache_hits"] = videos.decodes, videos.hits
    write_json_atomic(run_path, config)
    if rank != 0:
        return {"rank": rank, "world": world, "generated": len(pending), "predictions": str(pred_path)}
    if world > 1 or any(out.glob("predictions.rank-*-of-*.jsonl")):  # also an earlier run's leftovers
        _merge_ranks(out, samples, config, wait_timeout_s, poll_s, progress)
        pred_path = out / PREDICTIONS
    return score_run(bench, samples, pred_path, out, profile,
                     extra={"model": model_name, "frames": frames, "generation": config["generation"],
                            "pixels": pixels})
