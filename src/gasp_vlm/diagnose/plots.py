"""PNG plots for the correspondence diagnostic (issue 5).

Uses matplotlib's object API with the Agg canvas directly (no pyplot): no global backend switch,
no figure registry to leak, safe to call from a CLI or a test worker. Figures are saved without
``bbox_inches="tight"`` so a PNG is exactly ``figsize * dpi`` pixels.

Inputs are report dicts (``metrics.build_report``) and per-point records (``metrics.RECORD_DTYPE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch
from matplotlib.ticker import MaxNLocator

from gasp_vlm.diagnose import metrics as M

DEFAULT_DPI = 100


def _figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: str | Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=fig.dpi)
    return out_path


def _nan(v: Sequence[float | None]) -> np.ndarray:
    """JSON lists may hold None for undefined values; plot them as gaps."""
    return np.array([np.nan if x is None else x for x in v], dtype=np.float64)


def _colors(n: int) -> list:
    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def report_label(report: dict) -> str:
    return f"{report.get('model', '?')} [{report.get('mode', '?')}]"


# ------------------------------------------------------------------------------------------------
def plot_pck_per_layer(reports: dict | Sequence[dict], out_path: str | Path, labels: Sequence[str] | None = None,
                       show_pck0: bool = True, show_zero_motion: bool = True, show_reverse: bool = False,
                       figsize: tuple[float, float] = (8, 5), dpi: int = DEFAULT_DPI) -> Path:
    """PCK@1 per layer (solid), PCK@0 (dashed), reverse PCK@1 (dash-dot), zero-motion PCK@1 (dotted hline).

    One colour per report. Zero-motion lines that coincide (same data) are drawn once, in grey.
    """
    reports = [reports] if isinstance(reports, dict) else list(reports)
    labels = list(labels) if labels is not None else [report_label(r) for r in reports]
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    zm_vals = [r.get("zero_motion", {}).get("pck", {}).get("1") for r in reports]
    zm_shared = len({v for v in zm_vals if v is not None}) <= 1
    for i, (r, lab, col) in enumerate(zip(reports, labels, _colors(len(reports)))):
        x = [e["layer"] for e in r["layers"]]
        ax.plot(x, _nan([e["pck"]["1"] for e in r["layers"]]), "-o", color=col, ms=4, label=f"{lab} PCK@1")
        if show_pck0:
            ax.plot(x, _nan([e["pck"]["0"] for e in r["layers"]]), "--", color=col, alpha=0.8, label=f"{lab} PCK@0")
        if show_reverse and "reverse" in r:
            xr = [e["layer"] for e in r["reverse"]["layers"]]
            ax.plot(xr, _nan([e["pck"]["1"] for e in r["reverse"]["layers"]]), "-.", color=col, alpha=0.8,
                    label=f"{lab} reverse PCK@1")
        zm = zm_vals[i]
        if show_zero_motion and zm is not None and (not zm_shared or i == 0):
            ax.axhline(zm, ls=":", lw=1.5, color="0.4" if zm_shared else col,
                       label="zero-motion PCK@1" if zm_shared else f"{lab} zero-motion PCK@1")
    ax.set_title("Correspondence PCK per LLM layer")
    ax.set_xlabel("LLM layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("PCK")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_pck_vs_gap(report: dict, out_path: str | Path, figsize: tuple[float, float] = (7, 4.5),
                    dpi: int = DEFAULT_DPI) -> Path:
    """PCK@1 (and PCK@0/@2) vs frame gap at the peak layer, beside the zero-motion baseline."""
    t = report["temporal"]
    gaps = np.asarray(t["gaps"], dtype=np.float64)
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(gaps, _nan(t["pck"]), "-o", color="C0", label=f"model PCK@1 (layer {t['layer']})")
    if "pck0" in t:
        ax.plot(gaps, _nan(t["pck0"]), "--", color="C0", alpha=0.7, label="model PCK@0")
    if "pck2" in t:
        ax.plot(gaps, _nan(t["pck2"]), ":", color="C0", alpha=0.7, label="model PCK@2")
    rev = report.get("reverse")
    if rev and rev.get("temporal", {}).get("gaps") == t["gaps"]:
        ax.plot(gaps, _nan(rev["temporal"]["pck"]), "-^", color="C2",
                label=f"reverse PCK@1 (layer {rev['temporal']['layer']})")
    ax.plot(gaps, _nan(report["zero_motion"]["by_gap"]), "-s", color="0.4", label="zero-motion PCK@1")
    thr = report.get("far", {}).get("threshold")
    if thr is not None:
        ax.axvline(thr, color="0.7", lw=1, ls="--", label=f"far split (gap > {thr:g})")
    ax.set_title(f"PCK vs frame gap — {report_label(report)}")
    ax.set_xlabel(f"frame gap Δt ({t.get('gap_key', 'gap')})")
    ax.set_ylabel("PCK")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_reliability(records: np.ndarray, out_path: str | Path, layers: Sequence[int] | None = None,
                     conf_key: str = "conf_max", correct_key: str = "correct1", n_bins: int = 10,
                     strategy: str = "quantile", figsize: tuple[float, float] = (6.5, 5),
                     dpi: int = DEFAULT_DPI) -> Path:
    """Binned confidence vs accuracy, one line per chosen layer (default: up to 4 spread layers).

    The diagonal is drawn only for ``conf_softmax`` (a probability); a cosine is not one.
    """
    all_layers = np.unique(records["layer"])
    if layers is None:
        layers = all_layers[np.unique(np.linspace(0, len(all_layers) - 1, min(4, len(all_layers))).round().astype(int))]
    fig = _figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    for lay, col in zip(layers, _colors(len(layers))):
        r = records[records["layer"] == lay]
        b = M.reliability_bins(r[conf_key], r[correct_key], n_bins=n_bins, strategy=strategy)
        ax.plot(b["conf"], b["acc"], "-o", color=col, ms=4, label=f"layer {int(lay)} (n={len(r)})")
    if conf_key == "conf_softmax":
        ax.plot([0, 1], [0, 1], ls=":", color="0.5", label="perfect calibration")
    ax.set_title(f"Reliability: {conf_key} vs {correct_key.replace('correct', 'PCK@')}")
    ax.set_xlabel(f"confidence ({conf_key}, bin mean, {strategy} bins)")
    ax.set_ylabel("accuracy in bin")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_correspondences(frame1: np.ndarray, frame_t: np.ndarray, grid_hw: tuple[int, int],
                         query_xy: np.ndarray, pred_xy: np.ndarray, correct: np.ndarray, out_path: str | Path,
                         gt_xy: np.ndarray | None = None, heat: np.ndarray | None = None, heat_query: int = 0,
                         title: str = "", max_lines: int = 64, figsize: tuple[float, float] = (15, 5),
                         dpi: int = DEFAULT_DPI) -> Path:
    """Frame 1 | frame t with matches drawn (green correct, red wrong) | heat map for one query.

    frame1, frame_t: (H, W, 3) images covering the token grid exactly (the model's input frames).
    query_xy, pred_xy, gt_xy: (Q, 2) points in token units (x, y); pred is typically the matched
    token's centre (``metrics.token_centres``). correct (Q,) bool. heat: similarities of query
    ``heat_query`` over frame-t tokens, (Hm*Wm,) or (Hm, Wm); the third panel is omitted without it.
    """
    hm, wm = grid_hw
    h, w = frame_t.shape[:2]
    sx, sy = w / wm, h / hm  # token units -> pixels of the frame shown

    def px(xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, dtype=np.float64) * np.array([sx, sy])

    q, p = px(query_xy), px(pred_xy)
    correct = np.asarray(correct, dtype=bool)
    sel = np.arange(len(q))
    if len(sel) > max_lines:  # keep the picture readable: an even subsample of the queries
        sel = np.unique(np.linspace(0, len(q) - 1, max_lines).round().astype(int))
    n_panels = 3 if heat is not None else 2
    fig = _figure(figsize if n_panels == 3 else (figsize[0] * 2 / 3, figsize[1]), dpi)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    axes[0].imshow(frame1)
    axes[0].set_title("frame 1 (queries)")
    axes[1].imshow(frame_t)
    acc = float(correct.mean()) if len(correct) else float("nan")
    axes[1].set_title(f"frame t (matches; {correct.sum()}/{len(correct)} correct = {acc:.2f})")
    for i in sel:
        col = "lime" if correct[i] else "red"
        axes[0].plot(*q[i], "o", ms=4, color=col, mec="k", mew=0.5)
        axes[1].plot(*p[i], "x", ms=5, color=col)
        fig.add_artist(ConnectionPatch(xyA=tuple(q[i]), coordsA=axes[0].transData, xyB=tuple(p[i]),
                                       coordsB=axes[1].transData, color=col, lw=0.7, alpha=0.7))
    if gt_xy is not None:
        g = px(gt_xy)[sel]
        axes[1].plot(g[:, 0], g[:, 1], "+", ms=5, color="cyan", label="GT")
        axes[1].legend(fontsize=7, loc="lower right")
    if heat is not None:
        hmap = np.asarray(heat, dtype=np.float64).reshape(hm, wm)
        axes[2].imshow(frame_t)
        im = axes[2].imshow(hmap, cmap="inferno", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
        fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04, label="similarity")
        axes[2].plot(*p[heat_query], "x", ms=8, color="lime" if correct[heat_query] else "red", mew=2,
                     label="match")
        if gt_xy is not None:
            axes[2].plot(*px(gt_xy)[heat_query], "+", ms=9, color="cyan", mew=2, label="GT")
        axes[0].plot(*q[heat_query], "s", ms=8, mfc="none", mec="yellow", mew=2)
        axes[2].legend(fontsize=7, loc="lower right")
        axes[2].set_title(f"similarity of query {heat_query} over frame t")
    for ax in axes:
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_path)


# ------------------------------------------------------------------------------------------------
def write_standard_plots(report: dict, out_dir: str | Path, records: np.ndarray | None = None) -> list[Path]:
    """The report's plots: pck_per_layer.png, pck_vs_gap.png and (with records) reliability.png."""
    out_dir = Path(out_dir)
    paths = [plot_pck_per_layer(report, out_dir / "pck_per_layer.png", show_reverse="reverse" in report),
             plot_pck_vs_gap(report, out_dir / "pck_vs_gap.png")]
    if records is not None and len(records):
        peak = report["peak"]["layer"]
        lays = sorted({int(records["layer"].min()), peak, int(records["layer"].max())})
        paths.append(plot_reliability(records, out_dir / "reliability.png", layers=lays))
    return paths


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def compare_reports(report_paths: Sequence[str | Path], out_dir: str | Path,
                    labels: Sequence[str] | None = None) -> dict[str, Path]:
    """PCK per layer of several report.json files on one plot + a markdown summary table.

    Writes OUT/compare_pck_per_layer.png and OUT/compare.md; returns their paths.
    """
    out_dir = Path(out_dir)
    reports = [M.read_report(p) for p in report_paths]
    if labels is None:
        labels = [report_label(r) for r in reports]
        if len(set(labels)) < len(labels):  # same model twice (before/after): add the run folder
            labels = [f"{lab} ({Path(p).parent.name})" for lab, p in zip(labels, report_paths)]
    png = plot_pck_per_layer(reports, out_dir / "compare_pck_per_layer.png", labels=labels,
                             show_pck0=len(reports) <= 3)
    rows = ["| run | model | mode | seqs | peak layer | PCK@0 | PCK@1 | PCK@2 | far PCK@1 | zero-motion PCK@1 | zero-motion far |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lab, r in zip(labels, reports):
        pk, zm = r["peak"], r["zero_motion"]
        far = next((e["far_pck"] for e in r["layers"] if e["layer"] == pk["layer"]), None)
        rows.append(f"| {lab} | {r['model']} | {r['mode']} | {r['num_sequences']} | {pk['layer']} | "
                    f"{_fmt(pk['pck']['0'])} | {_fmt(pk['pck']['1'])} | {_fmt(pk['pck']['2'])} | {_fmt(far)} | "
                    f"{_fmt(zm['pck']['1'])} | {_fmt(zm['far_pck'])} |")
    md = out_dir / "compare.md"
    md.write_text("# Correspondence diagnostic: comparison\n\n" + "\n".join(rows) + "\n\n"
                  "PCK at each run's peak layer (argmax PCK@1). Read every figure against the zero-motion "
                  "baseline (same token position in frame t).\n\n![PCK per layer](compare_pck_per_layer.png)\n")
    return {"png": png, "md": md}
