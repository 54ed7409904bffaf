"""`gasp bench loader`: can the CPU side of training keep the GPUs fed?

One geometry sample = read (images + depth from disk, decode) -> pixels (the model's resize,
normalisation, patches and tokens: ``prepare_frames``) -> targets (GT correspondences and token
depth). Two measurements, both over samples in the training stream's order:

- split: each stage timed in this process, per sample (median and mean ms), plus the bytes of the
  image and depth files read and the sample's visual tokens;
- throughput: samples/s with ``workers`` DataLoader worker processes doing all three stages and
  handing the prepared batch back (as the trainer's PreparedSteps does), after one warm-up sample
  per worker.

With no data given it renders a synthetic dataset (jpg frames as real datasets ship, ``frame_size``
square) in a temporary folder. Token counts follow the model's processor: the tiny preset with
``max_pixels = frame_size^2`` has Qwen2.5-VL-7B's processor (patch 14, merge 2, temporal 2), so its
token counts are the 7B's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _scene_files(source, index: int, item: dict) -> int:
    sc = source.scene_of(index) if hasattr(source, "scene_of") else source.scenes[source.locate(index)[0]]
    return sum(sc.image_path(i).stat().st_size + sc.depth_path(i).stat().st_size for i in item["frame_ids"])


def _index(source, pos: int, seed: int) -> int:
    from gasp_vlm.train.stream import _stream_index

    return source.stream_index(pos, seed) if getattr(source, "per_rank", False) else _stream_index(pos, len(source), seed)


class _Samples(torch.utils.data.Dataset):
    """Stream position -> (prepared batch, targets, timings): the work of one worker per sample."""

    def __init__(self, source, adapter, frames: int, prompt: str, seed: int) -> None:
        self.source, self.adapter, self.frames, self.prompt, self.seed = source, adapter, frames, prompt, seed

    def __len__(self) -> int:
        return 2 ** 31

    def __getitem__(self, pos: int) -> dict[str, Any]:
        idx = _index(self.source, pos, self.seed)
        t0 = time.perf_counter()
        item = self.source.sample(idx, self.frames)
        t1 = time.perf_counter()
        prepared = self.adapter.prepare_frames([item["frames"]], prompt=self.prompt)
        t2 = time.perf_counter()
        targets = self.source.targets(prepared.layouts[0], item)
        t3 = time.perf_counter()
        return {"batch": prepared, "targets": targets, "read_s": t1 - t0, "pixels_s": t2 - t1, "targets_s": t3 - t2,
                "bytes": _scene_files(self.source, idx, item), "tokens": prepared.layouts[0].num_visual,
                "pairs": int(targets.valid.sum())}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": round(1e3 * statistics.median(xs), 2), "mean": round(1e3 * statistics.fmean(xs), 2)}


def make_bench_dataset(root: Path, scenes: int, frames: int, size: int, depth_format: str) -> Path:
    """Synthetic scenes with jpg frames (the format real datasets ship) under ``root``."""
    from gasp_vlm.data.scene import write_scene
    from gasp_vlm.data.synth import render_scene

    for i in range(scenes):
        r = render_scene((7, i), frames, size)
        write_scene(root / f"scene_{i:04d}", r["images"], r["depths"], r["K"], r["cam_from_world"],
                    names=[f"{j:06d}.jpg" for j in range(frames)], source="synth", depth_units="m",
                    depth_format=depth_format)
    return root


def benchmark_loader(source, adapter, *, frames: int, samples: int, workers: int, prompt: str = "Describe the scene.",
                     seed: int = 0) -> dict[str, Any]:
    """The JSON figures of the module doc for ``source`` (a geometry source) and ``adapter``."""
    ds = _Samples(source, adapter.preparer() if getattr(adapter, "model", None) is not None else adapter,
                  frames, prompt, seed)
    split = [ds[p] for p in range(samples)]
    out: dict[str, Any] = {
        "frames": frames, "samples": samples,
        "visual_tokens_per_sample": int(statistics.median(s["tokens"] for s in split)),
        "pixel_bytes_per_sample": int(sum(v.numel() * v.element_size() for k, v in split[0]["batch"].inputs.items()
                                          if torch.is_tensor(v) and k.startswith("pixel"))),
        "file_bytes_read_per_sample": int(statistics.fmean(s["bytes"] for s in split)),
        "gt_pairs_per_sample": round(statistics.fmean(s["pairs"] for s in split), 1),
        "ms_per_sample": {k: _stats([s[f"{k}_s"] for s in split]) for k in ("read", "pixels", "targets")},
    }
    total = [s["read_s"] + s["pixels_s"] + s["targets_s"] for s in split]
    out["ms_per_sample"]["total"] = _stats(total)
    out["one_process_samples_per_s"] = round(1.0 / statistics.fmean(total), 3)
    if workers > 0:
        n = samples + workers  # one warm-up sample per worker
        loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=range(samples, samples + n),
                                             num_workers=workers, collate_fn=lambda x: x, prefetch_factor=2)
        it = iter(loader)
        for _ in range(workers):
            next(it)
        t0 = time.perf_counter()
        got = sum(1 for _ in it)
        dt = time.perf_counter() - t0
        out.update({"workers": workers, "samples_per_s": round(got / dt, 3),
                    "samples_per_s_per_worker": round(got / dt / workers, 3)})
    return out


def run_loader_benchmark(data: str | None, manifest: str | None, model: str, frames: int, workers: int,
                         samples: int, frame_size: int, depth_format: str, max_pixels: int | None,
                         threads: int) -> dict[str, Any]:
    """CLI body: build the source and the adapter, generate data when none is given, measure."""
    from gasp_vlm.data.manifest import ManifestGeometrySource
    from gasp_vlm.data.sequences import GeometrySequenceSource
    from gasp_vlm.models import PRESETS, load_adapter

    torch.set_num_threads(threads)
    kw = {"overrides": {"num_hidden_layers": 1}} if model in PRESETS else {}
    if max_pixels or (model in PRESETS and data is None and manifest is None):
        kw["max_pixels"] = max_pixels or frame_size * frame_size
    adapter = load_adapter(model, **kw)
    tmp = None
    try:
        if manifest:
            source = ManifestGeometrySource(manifest)
            where = {"manifest": str(manifest)}
        else:
            if data is None:
                tmp = tempfile.TemporaryDirectory(prefix="gasp-bench-loader-")
                t0 = time.perf_counter()
                data = make_bench_dataset(Path(tmp.name), scenes=2, frames=max(2 * frames, 32), size=frame_size,
                                          depth_format=depth_format)
                where = {"data": f"generated: 2 scenes, {frame_size}x{frame_size} jpg, depth {depth_format} "
                                 f"({time.perf_counter() - t0:.0f} s to render)"}
            else:
                where = {"data": str(data)}
            source = GeometrySequenceSource(data)
        res = benchmark_loader(source, adapter, frames=frames, samples=samples, workers=workers)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {**where, "model": model, "max_pixels": kw.get("max_pixels"), "threads_per_process": threads, **res}
