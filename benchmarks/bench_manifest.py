"""Building and reading a sequence manifest at the paper's size (data/manifest.py).

    python benchmarks/bench_manifest.py [--sequences 1750000] [--scenes 10000,20000] [--world 32]

Two sources of synthetic scene lists (frame counts 100-400 and 50-200, like DL3DV and CO3D clips)
stand in for the scan of real dataset folders, which only reads image_names.json; the manifest itself
is built and read by the real code. Prints JSON: build seconds, shards, MiB on disk, one rank's load
seconds and rows, and the per-lookup cost of the later epochs' stream index.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import gasp_vlm.data.manifest as M


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=1_750_000)
    ap.add_argument("--scenes", default="10000,20000", help="scenes per source (two sources)")
    ap.add_argument("--world", type=int, default=32)
    a = ap.parse_args()
    n_a, n_b = (int(x) for x in a.scenes.split(","))
    rng = np.random.default_rng(0)
    fake = {"dl3dv": [(f"{i:064x}", int(n)) for i, n in enumerate(rng.integers(100, 400, n_a))],
            "co3d": [(f"seq_{i}", int(n)) for i, n in enumerate(rng.integers(50, 200, n_b))]}
    M.scan_source = lambda root: fake[Path(root).name]  # the only part that would touch the datasets
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name in fake:
            (d / name).mkdir()
        t0 = time.perf_counter()
        out = M.build_manifest({n: d / n for n in fake}, d / "manifest",
                               M.ManifestSpec(sequences=a.sequences, weights={"dl3dv": 2, "co3d": 1}), progress=False)
        build_s = time.perf_counter() - t0
        meta = json.loads((out / "manifest.json").read_text())
        size = sum(p.stat().st_size for p in out.iterdir())
        t0 = time.perf_counter()
        src = M.ManifestGeometrySource(out, rank=0, world=a.world)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in range(10_000):
            src.stream_index(len(src) + p, 0)  # epoch >= 1: a permuted lookup
        lookup_us = (time.perf_counter() - t0) / 10_000 * 1e6
    print(json.dumps({"sequences": meta["rows"], "build_s": round(build_s, 2), "shards": len(meta["shards"]),
                      "mib": round(size / 2 ** 20, 1), "world": a.world, "rank0_load_s": round(load_s, 3),
                      "rank0_rows": len(src), "stream_index_us": round(lookup_us, 2)}, indent=2))


if __name__ == "__main__":
    main()
