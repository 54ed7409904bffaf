"""DDP vs FSDP2 on 2 processes: per-rank parameter memory, peak RSS and step time of the same GASP run.

    python benchmarks/bench_fsdp.py [--hidden 1024 --layers 8 --steps 4 --full]

Launches ``torchrun --nproc-per-node 2`` twice (gloo on CPU, NCCL-free) over the tiny Qwen2.5-VL preset
widened to ``--hidden`` with ``--layers`` decoder layers; ``--full`` trains the whole LLM (where
sharding matters most: AdamW state of every weight), else LoRA. Each rank reports the bytes of
parameters it holds locally (sharded: its slices) and of AdamW state, its peak RSS and the median step
time after the first step. Prints one JSON line per engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r'''
import json, os, resource, statistics, sys, time, torch
torch.set_num_threads(1)
from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.recipe import GaspRecipe
cfg = config_from_dict(json.loads(sys.argv[1]))
r = GaspRecipe(cfg, sys.argv[2], progress=False)
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
times = []
for s in range(cfg.optim.max_steps):
    t = time.perf_counter()
    r.train_step(s)
    times.append(time.perf_counter() - t)
param_b = sum(local(p).numel() * p.element_size() for p in r.gasp_model.parameters())
opt_b = sum(local(v).numel() * v.element_size() for st in r.optimizer.state_dict()["state"].values()
            for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
rank = r.accelerator.process_index
with open(os.path.join(sys.argv[2], f"result_rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "param_MiB": param_b / 2**20, "adamw_MiB": opt_b / 2**20,
               "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "step_s_median": statistics.median(times[1:] or times)}, f)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--full", action="store_true", help="full fine-tuning of the LLM instead of LoRA")
    args = ap.parse_args()
    heads = max(4, args.hidden // 64)
    raw = {"model": {"name": "tiny-qwen2.5-vl", "overrides": {
               "num_hidden_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
               "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4)}},
           "lora": {"enabled": not args.full, "r": 16, "alpha": 32},
           "gasp": {"d_hidden": 256, "d_out": 64, "calib_tokens": 64},
           "optim": {"lr": 1e-4, "max_steps": args.steps},
           "data": {"geometry": ["toy"], "toy_sequences": 8, "frames_min": 4, "frames_max": 4, "instruction_ratio": 1.0,
                    "instructions": "generated", "generated_instructions": 8, "instruction_frames": 4},
           "save_every": 10 ** 6, "report_to": []}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for engine, fsdp2 in (("ddp", False), ("fsdp2", True)):
            env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                "--master-addr", "127.0.0.1", "--master-port", str(29600 + fsdp2), str(script),
                                json.dumps({**raw, "fsdp2": fsdp2}), str(Path(tmp) / engine)],
                               env=env, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{engine} failed:\n{p.stderr[-3000:]}")
            ranks = [json.loads((Path(tmp) / engine / f"result_rank{k}.json").read_text()) for k in (0, 1)]
            print(json.dumps({"engine": engine, "finetune": "full" if args.full else "lora", "hidden": args.hidden,
                              "layers": args.layers, "ranks": sorted(ranks, key=lambda r: r["rank"])}))


if __name__ == "__main__":
    main()
