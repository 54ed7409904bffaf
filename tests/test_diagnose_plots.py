"""Plots of the correspondence diagnostic (issue 5): each writes a PNG of the expected size."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from gasp_vlm.diagnose import metrics as M
from gasp_vlm.diagnose import plots as P

GRID = (4, 6)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _records(n_seq: int = 4, n_layers: int = 3, seed: int = 0) -> np.ndarray:
    """Synthetic records: later layers match better; GT drifts with the gap (zero-motion decays)."""
    g = np.random.default_rng(seed)
    nt = GRID[0] * GRID[1]
    parts = []
    for s in range(n_seq):
        for t in range(1, 4):
            q = np.arange(nt)
            gt = M.token_centres(q, GRID) + g.uniform(-0.5, 0.5, (nt, 2)) * t
            gt = np.clip(gt, 0, np.array([GRID[1], GRID[0]]) - 1e-3)
            true_idx = M.point_tokens(gt, GRID)
            pred = np.stack([np.where(g.random(nt) < 0.3 * (lay + 1), true_idx, g.integers(0, nt, nt))
                             for lay in range(n_layers)])
            conf = g.uniform(0, 1, (n_layers, nt)) + 0.5 * (pred == true_idx)
            parts.append(M.pair_records(seq=s, target=t, gap=2 * t, query_idx=q, gt_xy=gt, visible=np.ones(nt, bool),
                                        grid_hw=GRID, pred_idx=pred, conf_max=conf, conf_softmax=conf / 1.5,
                                        layers=range(n_layers)))
    return M.concat_records(parts)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, dict]:
    rec = _records()
    rev = _records(seed=1)
    return rec, M.build_report(rec, model="synthetic", mode="qk", reverse_records=rev)


def test_pck_per_layer_and_vs_gap(data, tmp_path):
    rec, rep = data
    rep2 = M.build_report(_records(seed=2), model="other", mode="qk")
    p = P.plot_pck_per_layer([rep, rep2], tmp_path / "layers.png", show_reverse=True)
    assert png_size(p) == (800, 500) and p.stat().st_size > 5000
    p = P.plot_pck_vs_gap(rep, tmp_path / "gap.png", figsize=(6, 4), dpi=80)
    assert png_size(p) == (480, 320) and p.stat().st_size > 3000


def test_reliability(data, tmp_path):
    rec, _ = data
    p = P.plot_reliability(rec, tmp_path / "rel.png")
    assert png_size(p) == (650, 500) and p.stat().st_size > 3000
    p = P.plot_reliability(rec, tmp_path / "rel_sm.png", layers=[2], conf_key="conf_softmax", strategy="uniform")
    assert png_size(p) == (650, 500)


def test_correspondence_picture(data, tmp_path):
    rec, _ = data
    g = np.random.default_rng(0)
    frame1 = g.integers(0, 255, (GRID[0] * 28, GRID[1] * 28, 3), dtype=np.uint8)
    frame_t = np.roll(frame1, 28, axis=1)
    r = rec[(rec["layer"] == 2) & (rec["seq"] == 0) & (rec["target"] == 1)]
    query = M.token_centres(r["query_idx"], GRID)
    pred = M.token_centres(r["pred_idx"], GRID)
    gt = np.stack([r["gt_x"], r["gt_y"]], axis=1)
    heat = g.standard_normal(GRID[0] * GRID[1])
    p = P.plot_correspondences(frame1, frame_t, GRID, query, pred, r["correct1"], tmp_path / "corr.png",
                               gt_xy=gt, heat=heat, heat_query=3, title="seq 0, t = 1, layer 2")
    assert png_size(p) == (1500, 500) and p.stat().st_size > 20000
    p = P.plot_correspondences(frame1, frame_t, GRID, query, pred, r["correct1"], tmp_path / "corr2.png")
    assert png_size(p) == (1000, 500)


def test_standard_plots_and_compare_reports(data, tmp_path):
    rec, rep = data
    paths = P.write_standard_plots(rep, tmp_path / "run_a", records=rec)
    assert [q.name for q in paths] == ["pck_per_layer.png", "pck_vs_gap.png", "reliability.png"]
    assert all(q.stat().st_size > 0 for q in paths)
    a = M.write_report(rep, tmp_path / "run_a" / "report.json")
    b = M.write_report(M.build_report(_records(seed=3), model="synthetic", mode="qk"),
                       tmp_path / "run_b" / "report.json")
    out = P.compare_reports([a, b], tmp_path / "cmp")
    assert png_size(out["png"]) == (800, 500)
    md = out["md"].read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| synthetic")]
    assert len(rows) == 2 and "(run_a)" in rows[0] and "(run_b)" in rows[1]  # same model: run folder added
