"""`gasp bench train-step`: the step time (and CUDA peak memory) GASP adds over the LM-only control."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from gasp_vlm.train.config import ConfigError, TrainConfig
from gasp_vlm.train.recipe import GaspRecipe


def benchmark_train_step(cfg: TrainConfig, steps: int = 5, warmup: int = 2, out_dir: str | Path | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """Median optimizer-step time (and CUDA peak memory) of the LM-only control vs GASP, same model/batches.

    ``cfg`` is the GASP variant; the control is the same config with both λ = 0 (no heads). Step i of
    either variant sees the same batch. On CPU the two are built side by side and their steps
    interleaved (A B A B ...) so background load hits both alike; on CUDA they run one after the other
    so each peak-memory figure is its own.
    """
    import dataclasses
    import gc
    import statistics
    import tempfile

    gasp_cfg = cfg
    lm_cfg = dataclasses.replace(cfg, gasp=dataclasses.replace(cfg.gasp, lambda_corr=0.0, lambda_depth=0.0))
    if gasp_cfg.gasp.lm_only:
        raise ConfigError("benchmark_train_step: the GASP variant needs gasp.lambda_corr or gasp.lambda_depth > 0")
    cuda = torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU")  # gasp bench --device cpu sets it
    times: dict[str, list[float]] = {"lm_only": [], "gasp": []}
    peak: dict[str, float | None] = {"lm_only": None, "gasp": None}
    info: dict[str, Any] = {}

    def timed(recipe: GaspRecipe, i: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        recipe.train_step(i)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(out_dir or tmp)
        if cuda:
            for name, c in (("lm_only", lm_cfg), ("gasp", gasp_cfg)):
                recipe = GaspRecipe(c, base / name, progress=progress, geometry_parts=True)
                if name == "gasp":
                    info["batch"] = _batch_info(recipe)
                for i in range(warmup):
                    recipe.train_step(i)
                torch.cuda.reset_peak_memory_stats()
                for i in range(warmup, warmup + steps):
                    times[name].append(timed(recipe, i))
                peak[name] = torch.cuda.max_memory_allocated() / 2 ** 30
                info[f"{name}_trainable_params"] = sum(p.numel() for p in recipe.trainable)
                del recipe
                gc.collect()
                torch.cuda.empty_cache()
        else:
            recipes = {n: GaspRecipe(c, base / n, progress=progress, geometry_parts=True)
                       for n, c in (("lm_only", lm_cfg), ("gasp", gasp_cfg))}
            info["batch"] = _batch_info(recipes["gasp"])
            for i in range(warmup + steps):
                for name, recipe in recipes.items():
                    t = timed(recipe, i)
                    if i >= warmup:
                        times[name].append(t)
            for name, recipe in recipes.items():
                info[f"{name}_trainable_params"] = sum(p.numel() for p in recipe.trainable)
    med = {k: statistics.median(v) for k, v in times.items()}
    # spread of the ratio: per-pair ratios of the interleaved steps (their quartiles)
    pair = sorted(g / l for g, l in zip(times["gasp"], times["lm_only"]))
    q = statistics.quantiles(pair, n=4) if len(pair) >= 2 else [pair[0]] * 3
    tokens = info.get("batch", {}).get("tokens", 0)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
           "steps": steps, "warmup": warmup, **info,
           "lm_only_step_s": med["lm_only"], "gasp_step_s": med["gasp"],
           "step_time_ratio": med["gasp"] / med["lm_only"],
           "step_time_ratio_quartiles": [q[0], q[1], q[2]],
           "lm_only_tokens_per_s": tokens / med["lm_only"], "gasp_tokens_per_s": tokens / med["gasp"],
           "lm_only_step_times_s": times["lm_only"], "gasp_step_times_s": times["gasp"],
           "lm_only_peak_mem_gib": peak["lm_only"], "gasp_peak_mem_gib": peak["gasp"],
           "peak_mem_ratio": (peak["gasp"] / peak["lm_only"]) if peak["lm_only"] else None}
    return out


def _batch_info(recipe: GaspRecipe) -> dict[str, Any]:
    """Shape of micro-batch 0, and the LM logits it would need with full-sequence vs answer-only logits
    (bf16 logits + their fp32 upcast: 6 bytes per logit) -- the memory models/base.py no longer spends."""
    parts, _ = recipe.micro_batch(0)
    (part,) = [p for p in parts if p.kind == "geo"]
    prepared = part.batch
    a = recipe.adapter
    vocab = a.model.get_output_embeddings().weight.shape[0]
    rows_full = sum(p.batch.inputs["input_ids"].numel() for p in parts)
    rows_answer = sum(int((p.batch.labels[:, 1:] != -100).sum()) for p in parts if p.batch.labels is not None)
    rows_answer += sum(p.batch.inputs["input_ids"].shape[0] for p in parts if p.batch.labels is None)  # last position
    return {"parts": "".join(p.kind[0] for p in parts), "tokens": rows_full,
            "lm_logits_gib_full_sequence": rows_full * vocab * 6 / 2 ** 30,
            "lm_logits_gib_answers_only": rows_answer * vocab * 6 / 2 ** 30,
            "kind": part.kind, "seq_len": int(prepared.inputs["input_ids"].shape[1]),
            "visual_tokens": int(prepared.layouts[0].num_visual), "frames": int(prepared.layouts[0].num_frames),
            "hidden_size": a.hidden_size, "num_layers": a.num_layers,
            "supervised_layers": len(recipe.heads.layer_indices) if recipe.heads is not None else 0}
