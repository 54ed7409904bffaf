"""The demo's figures (PNG, next to report.md): PCK per layer, PCK vs gap, temporal robustness,
downstream QA, training curves and one before/after correspondence picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gasp_vlm.demo.plan import COLORS, LABELS
from gasp_vlm.demo.training import log_records


def _nan(xs) -> list[float]:
    return [np.nan if x is None else x for x in xs]


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_plots(out: Path, diag: dict[str, dict], downstream: dict[str, dict], runs: dict[str, Path]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    # PCK per layer: the paper's qk, the causal direction, hidden states -- every model on each panel
    panels = [("qk", False, "qk: frame-1 queries vs frame-t keys"), ("qk", True, "causal qk: frame-t queries vs frame-1 keys"),
              ("hidden", False, "hidden states")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, (mode, rev, title) in zip(axes, panels):
        for name, reps in diag.items():
            rep = reps[mode].get("reverse") if rev else reps[mode]
            if rep:
                ax.plot([e["layer"] for e in rep["layers"]], _nan(e["pck"]["1"] for e in rep["layers"]), "o-",
                        color=COLORS.get(name), label=LABELS.get(name, name))
        zm = next(iter(diag.values()))[mode]["zero_motion"]["pck"]["1"]
        ax.axhline(zm, ls=":", color="k", lw=1, label="zero-motion baseline")
        ax.set_title(f"held-out PCK@1 per layer, {title}", fontsize=9)
        ax.set_xlabel("decoder layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PCK@1")
    axes[0].set_ylim(0, 1)
    axes[-1].legend(fontsize=8)
    files.append(_save(fig, out / "pck_per_layer.png"))

    # PCK vs frame gap at each model's qk peak layer, with the zero-motion baseline
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, reps in diag.items():
        t = reps["qk"]["temporal"]
        ax.plot(t["gaps"], _nan(t["pck"]), "o-", color=COLORS.get(name), label=f"{LABELS.get(name, name)} (layer {t['layer']})")
    zm = next(iter(diag.values()))["qk"]
    ax.plot(zm["temporal"]["gaps"], _nan(zm["zero_motion"]["by_gap"]), "k:", label="zero-motion baseline")
    ax.set_xlabel("frame gap after the anchor")
    ax.set_ylabel("PCK@1 (qk, peak layer)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "pck_vs_gap.png"))

    # Temporal robustness (the paper's near/far figure): near vs far PCK@1 per model
    from gasp_vlm.demo.report import _near_pck

    names = list(diag)
    near = [(_near_pck(diag[n]["qk"]) or 0.0) for n in names]
    far = [(diag[n]["qk"]["peak"]["far_pck"] or 0.0) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, near, 0.4, label="near pairs", color="0.6")
    ax.bar(x + 0.2, far, 0.4, label="far pairs", color=[COLORS.get(n) for n in names])
    ax.axhline(diag[names[0]]["qk"]["zero_motion"]["far_pck"] or 0.0, ls=":", color="k", lw=1,
               label="zero-motion baseline, far")
    ax.set_xticks(x, [LABELS.get(n, n) for n in names], fontsize=8)
    ax.set_ylabel("qk PCK@1 (peak layer)")
    ax.set_ylim(0, 1)
    ax.set_title("temporal robustness: near vs far frame gaps")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "temporal_robustness.png"))

    # Downstream: held-out spatial QA accuracy per task and model
    models = [n for n in downstream if n != "answer prior"]
    tasks = sorted({t for s in downstream.values() for t in s["tasks"]})
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / max(1, len(models))
    for i, n in enumerate(models):
        acc = [downstream[n]["tasks"].get(t, {}).get("accuracy", np.nan) for t in tasks]
        err = [downstream[n]["tasks"].get(t, {}).get("stderr", 0.0) for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * w, acc, w, yerr=err, capsize=2,
               color=COLORS.get(n), label=LABELS.get(n, n))
    prior = [downstream["answer prior"]["tasks"].get(t, {}).get("accuracy", np.nan) for t in tasks]
    ax.scatter(np.arange(len(tasks)), prior, marker="_", s=900, color="k", label="answer prior", zorder=3)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("held-out spatial QA (no spatial QA in GASP's fine-tuning)")
    ax.legend(fontsize=8, ncol=3)
    files.append(_save(fig, out / "downstream_qa.png"))

    # Training curves: LM loss from instruction parts, correspondence terms from geometry parts
    keys = [("lm", "i", "LM loss (instruction parts)"), ("corr", "g", "InfoNCE (mean over layers)"),
            ("depth", "g", "depth rel. error (mean over layers)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, kind, title) in zip(axes, keys):
        for name, rd in runs.items():
            recs = [r for r in log_records(rd) if kind in r.get("kinds", "") and r.get(key)]
            if recs:
                x, y = np.array([r["step"] for r in recs]), np.array([r[key] for r in recs], dtype=float)
                ax.plot(x, y, color=COLORS.get(name), lw=0.6, alpha=0.25)  # raw: one sample per step
                w_ = max(1, min(25, len(y) // 10))  # running mean, so the trend is readable
                ax.plot(x[w_ - 1:], np.convolve(y, np.ones(w_) / w_, mode="valid"), color=COLORS.get(name),
                        label=LABELS.get(name, name), lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    files.append(_save(fig, out / "loss_curves.png"))

    # Before / after: the same held-out pair, pretrained base vs GASP full
    pics = {n: sorted((out / "diagnose" / n).glob("correspondences_*.png")) for n in ("base", "full")}
    if all(pics.values()):
        from PIL import Image

        fig, axes = plt.subplots(2, 1, figsize=(12, 8))
        for ax, n in zip(axes, ("base", "full")):
            with Image.open(pics[n][0]) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            ax.set_title(f"{LABELS[n]}: {pics[n][0].name}")
            ax.axis("off")
        files.append(_save(fig, out / "correspondences_before_after.png"))
    return files
