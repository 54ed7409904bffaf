"""Cost of one training-stream lookup (train/stream.py `_stream_index`) at the paper's dataset size.

    python benchmarks/bench_stream_index.py [--items 1750000] [--calls 20000]

Prints JSON: microseconds per lookup, and (for comparison) the per-sample cost of drawing a full
numpy permutation, which the stream did before it became an O(1) Feistel permutation.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gasp_vlm.train.stream import _stream_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=1_750_000)
    ap.add_argument("--calls", type=int, default=20_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    for i in range(args.calls):
        _stream_index(i * 7919, args.items, seed=0)
    per_call = (time.perf_counter() - t0) / args.calls
    t0 = time.perf_counter()
    for e in range(5):
        np.random.default_rng([0, e]).permutation(args.items)
    full_perm = (time.perf_counter() - t0) / 5
    print(json.dumps({"items": args.items, "lookup_us": per_call * 1e6, "full_permutation_ms": full_perm * 1e3,
                      "speedup": full_perm / per_call}, indent=2))


if __name__ == "__main__":
    main()
