"""What a training run reports about itself: tokens/s (visual and text), an MFU estimate, peak memory,
the share of the step spent waiting for data, and the per-layer loss plot written at the end of a run.

MFU counts the LLM decoder only (the frozen vision tower runs forward-only under no_grad and is left
out): per token, forward 2·N_dec + 4·L·d·S (projections, then QKᵀ and AV over a context of S tokens);
backward twice the forward for the activation gradients, plus 2·N_train for the weight gradients of
the trainable parameters (LoRA: small). Activation-checkpointing recompute is not counted (model FLOPs,
not hardware FLOPs). Peak throughput is the dense bf16 figure of known GPUs; elsewhere MFU is None.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any, Sequence

import torch

# dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12}


def flops_per_token(adapter) -> dict[str, float]:
    """Coefficients of the per-token model FLOPs: a + b·S for a sample of S tokens (see module doc)."""
    dec = sum(p.numel() for p in adapter.decoder_layers().parameters())
    train = sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)
    fwd_a, fwd_b = 2.0 * dec, 4.0 * adapter.num_layers * adapter.hidden_size
    return {"a": 3 * fwd_a + 2.0 * train, "b": 3 * fwd_b}


def token_counts(parts: Sequence[Any]) -> dict[str, int]:
    """Real (unpadded) tokens of a micro-batch's parts, and how many of them are visual tokens."""
    tokens = visual = 0
    seq_sq = 0.0  # Σ S² over samples, for the attention FLOPs
    for p in parts:
        ids = p.batch.inputs["input_ids"]
        mask = p.batch.inputs.get("attention_mask")
        lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        tokens += int(lengths.sum())
        seq_sq += float((lengths.double() ** 2).sum())
        visual += sum(lay.num_visual for lay in p.batch.layouts)
    return {"tokens": tokens, "visual_tokens": visual, "seq_sq": seq_sq}


def peak_memory_gib() -> float:
    """CUDA: peak allocated memory of this process; CPU: its peak resident set size (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _peak_flops(accelerator) -> float | None:
    if not torch.cuda.is_available() or accelerator.mixed_precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def throughput(micro: Sequence[dict], step_s: float, data_s: float, accelerator, fpt: dict[str, float]) -> dict:
    """Step figures from the micro-batch records (each rank counted as this one: ranks see equal shapes)."""
    world = accelerator.num_processes
    tokens = sum(m["tokens"] for m in micro) * world
    visual = sum(m["visual_tokens"] for m in micro) * world
    flops = (fpt["a"] * sum(m["tokens"] for m in micro) + fpt["b"] * sum(m["seq_sq"] for m in micro)) * world
    peak = _peak_flops(accelerator)
    return {"step_time_s": step_s, "samples_per_s": sum(m["samples"] for m in micro) * world / step_s,
            "tokens_per_s": tokens / step_s, "visual_tokens_per_s": visual / step_s,
            "text_tokens_per_s": (tokens - visual) / step_s, "data_wait_s": data_s,
            "data_wait_frac": min(1.0, data_s / step_s), "model_tflops_per_s": flops / step_s / 1e12,
            "mfu": flops / step_s / (peak * world) if peak else None, "peak_mem_gib": peak_memory_gib()}


class JsonlLog:
    """Append-only jsonl (main process); on resume, records past the checkpoint's step are dropped."""

    def __init__(self, path: Path, keep_until: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)
        elif keep_until is None and path.is_file():
            path.unlink()  # a fresh run starts a fresh log

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def step_scalars(rec: dict, layers: Sequence[int], lm_always: bool = False) -> dict[str, float]:
    """TensorBoard / W&B scalars of a step record: each loss term only on steps that carry it (no
    zig-zag through 0; ``lm_always`` when no step has instructions), per-layer terms as
    train_layers/corr_NN, throughput and memory figures."""
    keys = ["loss", "lr", "head_lr", "grad_norm", "samples_per_s", "tokens_per_s", "visual_tokens_per_s",
            "text_tokens_per_s", "data_wait_frac", "mfu", "peak_mem_gib"]
    keys += ["lm"] * ("i" in rec["kinds"] or lm_always)
    has_geo = "g" in rec["kinds"]
    keys += ["corr", "depth"] * has_geo
    out = {f"train/{k}": float(rec[k]) for k in keys if rec.get(k) is not None}
    if has_geo and layers:
        for l, c, d in zip(layers, rec["corr_per_layer"], rec["depth_per_layer"]):
            out[f"train_layers/corr_{l:02d}"], out[f"train_layers/depth_{l:02d}"] = c, d
    return out


def console_line(window: list[dict]) -> str:
    """Means over the window: LM loss over steps with instruction data, corr/depth over geometry steps
    (with interleaving, any single step shows only one kind's terms)."""
    def mean(key: str, kind: str | None = None) -> float:
        recs = [r for r in window if kind is None or kind in r["kinds"]] or window
        return sum(r[key] for r in recs) / len(recs)

    last = window[-1]
    mfu = f"  MFU {100 * last['mfu']:.1f}%" if last.get("mfu") is not None else ""
    return (f"step {last['step']:>6}  loss {mean('loss'):.4f}  lm {mean('lm', 'i'):.4f}  corr {mean('corr', 'g'):.4f}  "
            f"depth {mean('depth', 'g'):.4f}  lr {last['lr']:.2e}  gnorm {mean('grad_norm'):.3f}  "
            f"{mean('samples_per_s'):.2f} samples/s  {mean('tokens_per_s'):.0f} tok/s  "
            f"data {100 * mean('data_wait_frac'):.0f}%  {1 / mean('step_time_s'):.2f} steps/s  "
            f"peak {last['peak_mem_gib']:.2f} GiB{mfu}")


def plot_per_layer_losses(log: str | Path, layers: Sequence[int], png: str | Path, smooth: int = 20) -> Path | None:
    """Per-layer InfoNCE and depth loss over the steps of ``logs/train.jsonl`` (moving mean over
    ``smooth`` geometry steps), one line per supervised layer coloured from first to last."""
    recs = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if "g" in r.get("kinds", "") and r.get("corr_per_layer")]
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array([r["step"] for r in recs])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for ax, key, title in ((axes[0], "corr_per_layer", "InfoNCE (corr) per layer"),
                           (axes[1], "depth_per_layer", "depth loss per layer")):
        vals = np.array([r[key] for r in recs], dtype=float)  # (T, L)
        w = max(1, min(smooth, len(vals)))
        kernel = np.ones(w) / w
        for j, l in enumerate(layers):
            y = np.convolve(vals[:, j], kernel, mode="valid")
            ax.plot(steps[w - 1:], y, color=cmap(j / max(1, len(layers) - 1)), lw=1.2,
                    label=f"layer {l}" if len(layers) <= 12 or j in (0, len(layers) - 1) else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png
