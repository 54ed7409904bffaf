"""Time `build_tracks`: 24 target frames at 518x518, stride 14, one CPU thread.

Usage: python benchmarks/bench_tracks.py [--frames 24] [--size 518] [--stride 14] [--repeats 20]
Prints the median wall time per call (depth maps already in memory; file loading not included).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # single-thread numpy
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from gasp_vlm.geometry.cameras import look_at, pixel_centers  # noqa: E402
from gasp_vlm.geometry.tracks import build_tracks  # noqa: E402


def make_inputs(n_frames: int, size: int, seed: int = 0):
    """Anchor + n_frames cameras on an arc looking at a bumpy surface; depth maps of a plane-ish field."""
    rng = np.random.default_rng(seed)
    f = 0.8 * size
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    angles = np.linspace(-0.4, 0.4, n_frames + 1)
    cams = np.stack([look_at(np.array([4 * np.sin(a), 0.3, -4 * np.cos(a)]), np.zeros(3)) for a in angles])
    pc = pixel_centers(size, size)
    depths = 4.0 + 0.3 * np.sin(pc[..., 0] / 37.0)[None] + 0.1 * rng.random((n_frames + 1, size, size))
    depths[:, :20] = 0.0  # some invalid depth
    return K, cams, depths.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--stride", type=float, default=14)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    K, cams, depths = make_inputs(a.frames, a.size)
    targets = list(depths[1:])  # a list of maps, as loaded from a scene
    Ks = np.stack([K] * a.frames)
    times = []
    for _ in range(a.repeats + 2):
        t0 = time.perf_counter()
        tr = build_tracks(depths[0], K, cams[0], targets, Ks, cams[1:], range(1, a.frames + 1), a.stride)
        times.append(time.perf_counter() - t0)
    times = np.array(times[2:]) * 1e3
    print(f"build_tracks: {a.frames} target frames at {a.size}x{a.size}, stride {a.stride:g} "
          f"({tr.query_uv.shape[0]} queries, {tr.visible.mean() * 100:.0f}% visible): "
          f"median {np.median(times):.2f} ms, min {times.min():.2f} ms over {a.repeats} runs (1 thread)")


if __name__ == "__main__":
    main()
