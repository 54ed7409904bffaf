"""Profile one GASP training step against the LM-only step (where the extra time goes).

    python benchmarks/bench_train_step.py --model qwen2.5-vl-7b --layers 8 --frames 16 --frame-size 448

The headline figures come from ``gasp bench train-step`` (same options); this script adds a
torch.profiler table of each variant's steps, sorted by device (or CPU) self time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "qwen2.5-vl-7b"], default="tiny")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--frame-size", type=int, default=224)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25, help="rows of each profiler table")
    args = ap.parse_args()

    import dataclasses
    import tempfile

    from gasp_vlm.cli.bench_cmds import build_bench_config
    from gasp_vlm.train.recipe import GaspRecipe

    cfg = build_bench_config(args.model, args.hidden, args.layers, None, args.frames, args.frame_size, args.lora_r,
                             1024, 256, None, "auto", True, args.steps + args.warmup)
    lm_cfg = dataclasses.replace(cfg, gasp=dataclasses.replace(cfg.gasp, lambda_corr=0.0, lambda_depth=0.0))
    cuda = torch.cuda.is_available()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in (("lm_only", lm_cfg), ("gasp", cfg)):
            r = GaspRecipe(c, f"{tmp}/{name}", progress=False)
            for i in range(args.warmup):
                r.train_step(i)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.profiler.profile(activities=acts) as prof:
                for i in range(args.warmup, args.warmup + args.steps):
                    r.train_step(i)
                if cuda:
                    torch.cuda.synchronize()
            out[name] = (time.perf_counter() - t0) / args.steps
            print(f"==== {name}: {out[name]:.3f} s/step (profiled) ====")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
            del r
            if cuda:
                torch.cuda.empty_cache()
    print(json.dumps({"profiled_step_s": out, "ratio": out["gasp"] / out["lm_only"]}))


if __name__ == "__main__":
    main()
