"""`gasp bench eval`: questions/s and media preparation time per question of a benchmark run, with the
per-video decode cache off and on (issue 14). Not a test: it prints figures.

Default data: the benchmark's generated fixture, its videos rewritten to a chosen length and size (the
fixture's own clips are a few frames; VSI-Bench's are minutes) so decoding costs what it would.
Preparation time = wall time - time inside the generator (decode + resize + prompt building).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any


def write_clip(path: Path, n_frames: int, size: tuple[int, int], fps: int = 30) -> Path:
    """An mpeg4 clip of moving stripes (content changes every frame, so decoding does real work)."""
    import av
    import numpy as np

    w, h = size
    base = ((np.arange(w)[None, :] // 16 + np.arange(h)[:, None] // 16) % 2 * 200).astype(np.uint8)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n_frames):
            arr = np.repeat(np.roll(base, 4 * i, axis=1)[..., None], 3, axis=2)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


class _TimedGenerator:
    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds, self.adapter = inner, 0.0, getattr(inner, "adapter", None)

    def __call__(self, requests: list[dict]) -> list[str]:
        t = time.perf_counter()
        try:
            return self.inner(requests)
        finally:
            self.seconds += time.perf_counter() - t


def benchmark_eval(model: str, benchmark: str = "vsibench", *, data: str | Path | None = None, limit: int | None = None,
                   frames: int = 8, batch_size: int = 1, max_new_tokens: int = 4, video_frames: int = 300,
                   video_size: tuple[int, int] = (640, 360), dtype: str = "float32", device: str = "cpu") -> dict:
    """Run ``benchmark`` twice (cache off, then on) with ``model``; return both runs' figures."""
    from gasp_vlm.bench.fixtures import make_fixture
    from gasp_vlm.bench.registry import get_benchmark
    from gasp_vlm.bench.runner import load_generator, run_eval

    bench = get_benchmark(benchmark)
    generation = {**bench.generation_config("official"), "max_new_tokens": max_new_tokens}
    generator = load_generator(model, generation, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory(prefix="gasp-bench-eval-") as tmp:
        root = Path(data) if data else make_fixture(benchmark, Path(tmp) / "data")
        if not data:
            for mp4 in sorted(root.rglob("*.mp4")):  # fixture clips at a realistic length and size
                write_clip(mp4, video_frames, video_size)
        res: dict[str, Any] = {"model": model, "benchmark": benchmark, "frames": frames, "batch_size": batch_size,
                               "video": None if data else {"frames": video_frames, "size": list(video_size)}}
        for name, cache in (("no_cache", 0), ("cache", 1 << 30)):
            timed = _TimedGenerator(generator)
            out = Path(tmp) / f"run_{name}"
            t0 = time.perf_counter()
            r = run_eval(bench, root, timed, out, model_name=model, limit=limit, frames=frames,
                         batch_size=batch_size, generation=generation, video_cache_bytes=cache, progress=False)
            wall = time.perf_counter() - t0
            run = json.loads((out / "run.json").read_text())
            n = int(r["num_samples"])
            res[name] = {"questions": n, "wall_s": round(wall, 3), "questions_per_s": round(n / wall, 3),
                         "prepare_s_per_question": round((wall - timed.seconds) / n, 4),
                         "generate_s_per_question": round(timed.seconds / n, 4),
                         "video_decodes": run["video_decodes"], "video_cache_hits": run["video_cache_hits"]}
    res["speedup"] = round(res["cache"]["questions_per_s"] / res["no_cache"]["questions_per_s"], 3)
    return res
