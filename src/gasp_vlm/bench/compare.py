"""Compare two results.json files (e.g. base vs GASP): markdown table with deltas + PNG bar chart.

A comparison is only meaningful under the same settings: two runs whose prompt profile, frames,
decoding, pixel budget, frame mode or dtype differ (results.json + the run.json beside it) are refused
unless the caller allows it, and then the differences are stated at the top of compare.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gasp_vlm.io import write_json_atomic

EXTRA_ROWS = ("multi_view_reasoning",)  # reported beside the overall (BLINK's headline)
# settings that must agree between the two runs (model_info.* come from run.json when it is there)
SETTINGS = ("profile", "frames", "generation", "pixels", "frame_mode", "dtype")


def run_settings(results_path: str | Path, res: dict) -> dict[str, Any]:
    """The scoring settings of one run: results.json's own, completed by the run.json beside it."""
    run_file = Path(results_path).with_name("run.json")
    run: dict = {}
    if run_file.is_file():
        try:
            run = json.loads(run_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_file}: not valid JSON ({e.msg})") from None
    info = run.get("model_info") or {}
    merged = {"profile": res.get("profile", run.get("profile")), "frames": res.get("frames", run.get("frames")),
              "generation": res.get("generation", run.get("generation")), "pixels": res.get("pixels", run.get("pixels")),
              "frame_mode": info.get("frame_mode"), "dtype": info.get("dtype")}
    return {k: merged[k] for k in SETTINGS}


def settings_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list]:
    """{key: [a, b]} where both runs state a setting and the two differ (unknown on one side: not counted)."""
    return {k: [a[k], b[k]] for k in SETTINGS if a.get(k) is not None and b.get(k) is not None and a[k] != b[k]}


def _load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    for k in ("benchmark", "overall", "categories"):
        if k not in res:
            raise ValueError(f"{path}: not a gasp results.json (no {k!r})")
    return res


def comparison_rows(base: dict, new: dict) -> list[dict[str, Any]]:
    """Rows (name, base, new, delta) for overall, extras and the union of categories (base order first)."""
    rows = [("overall", base.get("overall"), new.get("overall"))]
    for k in EXTRA_ROWS:
        if k in base or k in new:
            rows.append((k, base.get(k), new.get(k)))
    cats = list(base["categories"]) + [c for c in new["categories"] if c not in base["categories"]]
    rows += [(c, base["categories"].get(c), new["categories"].get(c)) for c in cats]
    return [{"name": n, "base": b, "new": g, "delta": (g - b) if b is not None and g is not None else None}
            for n, b, g in rows]


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def markdown_table(base: dict, new: dict, labels: tuple[str, str] = ("base", "gasp")) -> str:
    rows = comparison_rows(base, new)
    head = f"| {base['benchmark']} ({base.get('profile', 'official')}) | {labels[0]} | {labels[1]} | delta |"
    lines = [head, "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r['base'])} | {_fmt(r['new'])} | {_fmt(r['delta'], True)} |")
    lines.append("")
    lines.append(f"Scores in percent; delta = {labels[1]} - {labels[0]} (points). "
                 f"Samples: {base.get('num_samples')} / {new.get('num_samples')}; "
                 f"missing: {base.get('num_missing')} / {new.get('num_missing')}.")
    return "\n".join(lines) + "\n"


def bar_chart(base: dict, new: dict, path: str | Path, labels: tuple[str, str] = ("base", "gasp")) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    import numpy as np

    rows = comparison_rows(base, new)
    names = [r["name"] for r in rows]
    b = np.array([r["base"] if r["base"] is not None else np.nan for r in rows], dtype=float)
    g = np.array([r["new"] if r["new"] is not None else np.nan for r in rows], dtype=float)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.2))
    ax.bar(x - 0.2, b, 0.4, label=labels[0], color="#8c8c8c")
    ax.bar(x + 0.2, g, 0.4, label=labels[1], color="#2a7ab9")
    for xi, r in zip(x, rows):
        if r["delta"] is not None:
            top = np.nanmax([r["base"], r["new"]])
            ax.text(xi, top + 1, f"{r['delta']:+.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, max(100.0, float(np.nanmax(np.r_[b, g, 0.0])) + 8))
    ax.set_title(f"{base['benchmark']}: {labels[1]} vs {labels[0]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_results(base_path: str | Path, new_path: str | Path, out_dir: str | Path,
                    labels: tuple[str, str] = ("base", "gasp"), allow_mismatch: bool = False) -> dict:
    """Write OUT/compare.md, OUT/compare.png and OUT/compare.json; return the comparison dict.

    Refuses (ValueError, nothing written) two runs scored under different settings unless
    ``allow_mismatch``; then the differences go into the summary's ``warning`` and atop compare.md."""
    base, new = _load(base_path), _load(new_path)
    if base["benchmark"] != new["benchmark"]:
        raise ValueError(f"cannot compare {base['benchmark']} ({base_path}) with {new['benchmark']} ({new_path})")
    settings = {labels[0]: run_settings(base_path, base), labels[1]: run_settings(new_path, new)}
    diffs = settings_differences(*settings.values())
    stated = "; ".join(f"{k} {json.dumps(a)} vs {json.dumps(b)}" for k, (a, b) in diffs.items())
    if diffs and not allow_mismatch:
        raise ValueError(f"{base_path} and {new_path} were scored under different settings ({stated}): rerun one "
                         "with the other's settings, or pass --allow-mismatch to compare them anyway")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_table(base, new, labels)
    if diffs:
        md = f"**Warning: the two runs were scored under different settings** ({stated}).\n\n{md}"
    (out / "compare.md").write_text(md)
    bar_chart(base, new, out / "compare.png", labels)
    summary = {"benchmark": base["benchmark"], "labels": list(labels), "base": str(base_path), "new": str(new_path),
               "settings": settings, "rows": comparison_rows(base, new)}
    if diffs:
        summary["settings_differ"] = diffs
        summary["warning"] = f"settings differ: {stated}"
    write_json_atomic(out / "compare.json", summary)
    return summary
