"""Diagnose overhead: time per sequence of `run_diagnosis` vs a plain forward of the same inputs (issue 5).

Issue target: <= 1.5x on CPU for a preset. Both sides include sampling the frames and preparing the
model inputs; "diagnose" adds the capture hooks, the GT targets, the per-layer similarity/argmax/records
of every mode and the per-sequence file write (not the one-off report/plots at the end, printed apart).

    .venv/bin/python benchmarks/bench_diagnose.py                       # tiny preset + hidden-1024 config
    .venv/bin/python benchmarks/bench_diagnose.py --configs tiny --sequences 8 --frames 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gasp_vlm.diagnose.run import OrthoToySource, run_diagnosis
from gasp_vlm.models import load_adapter

CONFIGS = {
    # the preset: LLM hidden 256, 8 layers, 4 q / 2 kv heads
    "tiny": ("tiny-qwen2.5-vl", None),
    # a bigger random-init Qwen2.5-VL LLM: hidden 1024, 8 layers, 16 q / 4 kv heads (head_dim 64)
    "big": ("tiny-qwen2.5-vl", {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
                                "num_key_value_heads": 4}),
}


@torch.no_grad()
def plain_forward_seconds(adapter, source, index: int, num_frames: int, prompt: str) -> float:
    """Seconds of sample + prepare + model forward of one sequence (no hooks, no analysis)."""
    t0 = time.perf_counter()
    item = source.sample(index, num_frames)
    batch = adapter.prepare_frames([item["frames"]], prompt=prompt)
    adapter.model(**batch.inputs, use_cache=False)
    return time.perf_counter() - t0


def bench(name: str, sequences: int, frames: int, size: int, mode_sets: list[tuple[str, ...]],
          repeats: int) -> list[dict]:
    """Per sequence, the diagnosis step and a plain forward of the same sequence run back to back
    (through run_diagnosis' per-sequence callback), so load from other processes hits both alike;
    each figure is the min over ``repeats`` runs, then the mean over sequences."""
    preset, overrides = CONFIGS[name]
    adapter = load_adapter(preset, overrides=overrides)
    source = OrthoToySource(sequences + 1, frame_hw=(size, size), seed=0)
    prompt = "Describe the scene."
    idx = list(range(1, sequences + 1))
    plain_forward_seconds(adapter, source, 0, frames, prompt)  # warm-up (allocator, lazy inits)
    rows = []
    for modes in mode_sets:
        reverse = len(modes) > 1
        diag: dict[int, list[float]] = {i: [] for i in idx}
        plain: dict[int, list[float]] = {i: [] for i in idx}
        stages: list[dict] = []
        report_s = []
        for _ in range(repeats):
            clock = {"t": 0.0}

            def on_sequence(i: int) -> None:
                diag[i].append(time.perf_counter() - clock["t"])
                plain[i].append(plain_forward_seconds(adapter, source, i, frames, prompt))
                clock["t"] = time.perf_counter()

            with tempfile.TemporaryDirectory() as tmp:
                clock["t"] = time.perf_counter()
                run_diagnosis(adapter, source, idx, modes=modes, num_frames=frames, reverse=reverse, out_dir=tmp,
                              progress=False, pictures=0, prompt=prompt, on_sequence=on_sequence)
                report_s.append(time.perf_counter() - clock["t"])
                run = json.loads((Path(tmp) / "run.json").read_text())
            stages.append(run["timing_s_per_sequence"])
        d = float(np.mean([min(v) for v in diag.values()]))
        p = float(np.mean([min(v) for v in plain.values()]))
        st = {k: min(s[k] for s in stages) for k in stages[0]}
        rows.append({"config": name, "hidden": adapter.hidden_size, "layers": adapter.num_layers,
                     "modes": "+".join(modes) + (" (+reverse)" if reverse else ""), "plain_s": p, "diag_s": d,
                     "ratio": d / p, "forward_s": st["prepare_forward"], "match_s": st["match"],
                     "write_s": st["write"], "report_s": min(report_s)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,big", help="comma list of " + ", ".join(CONFIGS))
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="frame size (224 -> 8 x 8 tokens per frame)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; per-sequence minimum is kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mode_sets = [("qk",), ("qk", "qk-rope", "hidden")]
    print(f"# diagnose overhead, CPU, {args.threads} thread(s), {args.frames} frames of {args.size}px, "
          f"{args.sequences} sequences, torch {torch.__version__}")
    print("| config | hidden | layers | modes | plain fwd s/seq | diagnose s/seq | ratio | prepare+capture fwd | "
          "targets+match | write | report+plots (once) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        for r in bench(name.strip(), args.sequences, args.frames, args.size, mode_sets, args.repeats):
            print(f"| {r['config']} | {r['hidden']} | {r['layers']} | {r['modes']} | {r['plain_s']:.3f} | "
                  f"{r['diag_s']:.3f} | **{r['ratio']:.2f}x** | {r['forward_s']:.3f} | {r['match_s']:.3f} | "
                  f"{r['write_s']:.3f} | {r['report_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
