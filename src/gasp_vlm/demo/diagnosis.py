"""Stage "diagnose": the paper's correspondence diagnostic (§5.3) of every model on held-out rooms.

Clips as in the paper: the anchor is the clip's first frame and the targets follow at growing gaps
(``diag_gap_stride`` frames apart: 3, 6, ..., 21). Both directions are scored -- frame-1 queries vs
frame-t keys (the paper's) and frame-t queries vs frame-1 keys (``reverse``, the attention a causal LM
actually computes) -- in the ``qk`` and ``hidden`` modes (diagnose/run.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gasp_vlm.demo.plan import DemoPlan

DIAG_MODES: tuple[str, ...] = ("qk", "hidden")


def heldout_source(heldout: Path, plan: DemoPlan):
    from gasp_vlm.data.sequences import GeometrySequenceSource

    return GeometrySequenceSource(heldout, frames_window=48, seed=plan.seed + 7, forward_stride=plan.diag_gap_stride)


def heldout_indices(source, count: int) -> list[int]:
    """``count`` sequences spread evenly over the held-out scenes and anchor positions (deterministic)."""
    n = len(source)
    return sorted({int(i) for i in np.linspace(0, n - 1, num=min(count, n)).round()})


def diagnose_models(out: Path, model_paths: dict[str, Any], heldout: Path, plan: DemoPlan,
                    progress: bool = True) -> dict[str, dict]:
    """qk + hidden diagnosis (both directions) of every model on the same held-out clips;
    returns {model: {mode: report}}."""
    from gasp_vlm.diagnose.run import run_diagnosis
    from gasp_vlm.models import load_adapter

    source = heldout_source(heldout, plan)
    idx = heldout_indices(source, plan.diag_sequences)
    reports = {}
    for name, spec in model_paths.items():
        adapter = spec() if callable(spec) else load_adapter(str(spec))
        ddir = out / "diagnose" / name
        run_diagnosis(adapter, source, idx, modes=DIAG_MODES, num_frames=plan.diag_frames, out_dir=ddir,
                      progress=progress, model_name=name, pictures=1, reverse=True)
        reports[name] = {m: json.loads((ddir / m / "report.json").read_text()) for m in DIAG_MODES}
        del adapter
    return reports


def lookalike_pck(diag_dir: Path, layer: int, mode: str = "qk") -> dict[str, Any]:
    """PCK at ``layer`` on camouflage scenes, split by the query's object: the look-alike foreground
    object and the background wall that wears the same texture (and both together)."""
    from gasp_vlm.diagnose import metrics as M
    from gasp_vlm.diagnose.run import join_points

    rec = M.load_records(diag_dir / mode / "records.npz")[0]
    pts_file = np.load(diag_dir / "points.npz")
    pts = pts_file["points"]
    # each sequence's scene.json, as the diagnosis stored it (no need to reopen the scenes)
    seq_meta = {int(i): json.loads(m) for i, m in zip(pts_file["seq_ids"], pts_file["scene_meta"])}
    rec = rec[rec["layer"] == layer]
    obj = join_points(rec, pts, "object_id")
    metas = [seq_meta.get(int(s), {}) for s in rec["seq"]]
    camo = np.array([bool(m.get("camouflage")) for m in metas], dtype=bool)
    fg_id = np.array([m.get("camouflage_object_id", -99) for m in metas])
    bg_id = np.array([m.get("background_object_id", -99) for m in metas])
    groups = {"foreground": camo & (obj == fg_id), "background": camo & (obj == bg_id)}
    groups["lookalike"] = groups["foreground"] | groups["background"]
    res: dict[str, Any] = {"layer": int(layer), "mode": mode}
    for g, m in groups.items():
        n = int(m.sum())
        res[g] = {"points": n, "pck0": float(rec["correct0"][m].mean()) if n else None,
                  "pck1": float(rec["correct1"][m].mean()) if n else None,
                  "error_rate": float(1.0 - rec["correct1"][m].mean()) if n else None}
    return res
