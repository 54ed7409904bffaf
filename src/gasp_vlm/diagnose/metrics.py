"""Correspondence metrics for the internal-matching diagnostic (issue 5; paper §5.3).

Pure functions, no model code. The runner captures per-layer features, builds a similarity per
(sequence, target frame) pair, and hands it here; everything downstream is computed from a flat
table of per-point records, so every figure can be recomputed offline.

Units and conventions
- Token units: continuous (x, y) on the token grid of one frame, x = column, y = row. Token
  (r, c) covers [c, c+1) x [r, r+1); its centre is (c + 0.5, r + 0.5).
  ``TokenLayout.uv_to_token_units`` produces exactly these coordinates.
- Token index within a frame (slot): ``idx = r * Wm + c`` (raster, as in ``TokenLayout``).
- A point's GT token is ``(floor(y), floor(x))``, clipped into the grid so that a point lying
  exactly on the right/bottom border still belongs to the last row/column.

Per-point errors (``token_errors``)
- ``err``  : Euclidean distance from the matched token's centre to the GT point, in tokens.
- ``cheb`` : Chebyshev distance between the matched token (r, c) and the GT token.
- ``correct0``: the matched token contains the GT point (``cheb == 0``).
- ``correct1``/``correct2``: ``err <= 1`` / ``err <= 2`` tokens. Inclusive ("within k tokens"):
  with GT at token centres, the 4-neighbours (err exactly 1.0) count at PCK@1. Note
  correct0 implies correct1 (err <= sqrt(2)/2 inside the matched token).

Aggregation (``summarize`` / ``build_report``)
- Only records of GT-visible points exist (the record builders drop the others).
- PCK: mean of the per-point flag within each sequence (pooled over its targets and points),
  then the mean over sequences (TAP-Vid / DiffTrack style). A sequence with no visible point
  has no record and does not count.
- Confidence: Spearman correlation and AUROC of confidence vs ``correct1``, pooled over all
  points of a layer (not per sequence: a correlation per sequence would be noisy for small
  sequences). Ties get average ranks in both.
- Far range: the (sequence, target) pairs whose gap is strictly greater than the median gap of
  all pairs. Ties at the median go to the near side, so "far" is at most half of the pairs
  (exactly half when no pair sits on the median). With a single distinct gap there is no far
  pair and far PCK is None.
- Peak layer: the layer with the highest PCK@1; ties -> the lowest layer index.
- Zero-motion baseline: predict, in frame t, the token at the query's (row, col). It does not
  depend on the layer; it is stored on every record and aggregated from one layer's records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

PCK_KEYS = ("0", "1", "2")
DEFAULT_TAU = 0.07  # softmax temperature for conf_softmax; same order as the InfoNCE temperature

# One row per (sequence, layer, target frame, GT-visible query point).
RECORD_DTYPE = np.dtype([
    ("seq", np.int32),          # sequence id (runner's index into its list of sequences)
    ("layer", np.int16),        # LLM layer index the features came from
    ("target", np.int16),       # target frame position t in the sampled clip (anchor = 0)
    ("gap", np.int32),          # Δt: source-video frame index difference target - anchor
    ("angle", np.float32),      # optional pose angle between the two cameras (deg); NaN if unknown
    ("query", np.int32),        # index of the query point within its (sequence, target) pair
    ("query_idx", np.int32),    # token index (r*Wm+c) of the query in the anchor frame
    ("pred_idx", np.int32),     # token index of the argmax match in frame t
    ("gt_x", np.float32),       # GT point in frame t, token units (x = column)
    ("gt_y", np.float32),       # GT point in frame t, token units (y = row)
    ("err", np.float32),
    ("cheb", np.int16),
    ("correct0", np.bool_),
    ("correct1", np.bool_),
    ("correct2", np.bool_),
    ("conf_max", np.float32),   # max similarity over frame-t tokens
    ("conf_softmax", np.float32),  # max of softmax(sim / tau) over frame-t tokens
    ("zm_err", np.float32),     # zero-motion baseline: same fields for pred = query token
    ("zm_cheb", np.int16),
    ("zm_correct0", np.bool_),
    ("zm_correct1", np.bool_),
    ("zm_correct2", np.bool_),
])
RECORD_FIELDS: tuple[str, ...] = tuple(RECORD_DTYPE.names)


# ------------------------------------------------------------------------------------------------
# Similarity and matching
# ------------------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def cosine_sim(a: ArrayLike, b: ArrayLike, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity. a (..., Q, D), b (..., N, D) -> (..., Q, N) (leading dims broadcast).

    Computed in float32 at least (bf16 captures lose too much for argmax ties).
    """
    a, b = _as_tensor(a), _as_tensor(b)
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = torch.nn.functional.normalize(a.to(dt), dim=-1, eps=eps)
    b = torch.nn.functional.normalize(b.to(dt), dim=-1, eps=eps)
    return a @ b.transpose(-1, -2)


class Match(NamedTuple):
    idx: np.ndarray           # (..., Q) int64, argmax token index in frame t
    conf_max: np.ndarray      # (..., Q) float32, max similarity
    conf_softmax: np.ndarray  # (..., Q) float32, max of softmax(sim / tau)


@torch.no_grad()
def match_tokens(sim: ArrayLike, tau: float = DEFAULT_TAU) -> Match:
    """Argmax matching over the last axis. sim (..., Q, Nt) -> Match of (..., Q) numpy arrays.

    conf_softmax = max_j softmax(sim/tau)_j = exp(max/tau - logsumexp(sim/tau)), computed stably.
    Ties in the argmax resolve to the lowest index (torch semantics).
    """
    s = _as_tensor(sim)
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    smax, idx = s.max(dim=-1)
    conf_sm = torch.exp(smax / tau - torch.logsumexp(s / tau, dim=-1))
    return Match(idx.cpu().numpy().astype(np.int64),
                 smax.cpu().numpy().astype(np.float32),
                 conf_sm.cpu().numpy().astype(np.float32))


# ------------------------------------------------------------------------------------------------
# Errors in token units
# ------------------------------------------------------------------------------------------------
def token_centres(idx: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Token index (...,) -> centre (..., 2) as (x, y) = (c + 0.5, r + 0.5) in token units."""
    r, c = np.divmod(np.asarray(idx, dtype=np.int64), grid_hw[1])
    return np.stack([c + 0.5, r + 0.5], axis=-1).astype(np.float64)


def point_tokens(xy: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Points (..., 2) in token units -> index (...,) of the token containing them (clipped to grid).

    Use it for the query token of a frame-1 point and for the GT token of a frame-t point.
    """
    xy = np.asarray(xy, dtype=np.float64)
    hm, wm = grid_hw
    c = np.clip(np.floor(xy[..., 0]).astype(np.int64), 0, wm - 1)
    r = np.clip(np.floor(xy[..., 1]).astype(np.int64), 0, hm - 1)
    return r * wm + c


def token_errors(pred_idx: np.ndarray, gt_xy: np.ndarray, grid_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """pred_idx (...,) token index, gt_xy (..., 2) token units -> err, cheb, correct0/1/2 (...,).

    Flags are decided in float64 before any down-cast, so a distance of exactly 1.0 counts at PCK@1.
    """
    pred_idx = np.asarray(pred_idx, dtype=np.int64)
    gt_xy = np.asarray(gt_xy, dtype=np.float64)
    err = np.linalg.norm(token_centres(pred_idx, grid_hw) - gt_xy, axis=-1)
    pr, pc = np.divmod(pred_idx, grid_hw[1])
    gr, gc = np.divmod(point_tokens(gt_xy, grid_hw), grid_hw[1])
    cheb = np.maximum(np.abs(pr - gr), np.abs(pc - gc))
    return {"err": err, "cheb": cheb, "correct0": cheb == 0, "correct1": err <= 1.0, "correct2": err <= 2.0}


# ------------------------------------------------------------------------------------------------
# Per-point records
# ------------------------------------------------------------------------------------------------
def empty_records(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=RECORD_DTYPE)


def concat_records(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p is not None and len(p)]
    return np.concatenate(parts).astype(RECORD_DTYPE, copy=False) if parts else empty_records()


def pair_records(*, seq: int, target: int, gap: int, query_idx: np.ndarray, gt_xy: np.ndarray,
                 visible: np.ndarray, grid_hw: tuple[int, int], pred_idx: np.ndarray,
                 conf_max: np.ndarray, conf_softmax: np.ndarray, layers: Sequence[int],
                 angle: float = float("nan")) -> np.ndarray:
    """Records of one (sequence, target) pair for all layers, GT-visible points only.

    query_idx (Q,) anchor-frame token index of each query point; gt_xy (Q, 2) token units in
    frame t; visible (Q,) bool (visible in both frames and inside the crop);
    pred_idx / conf_max / conf_softmax (L, Q); layers (L,). Returns L * Q_visible rows.
    """
    vis = np.asarray(visible, dtype=bool)
    q = np.flatnonzero(vis)
    layers = np.asarray(layers, dtype=np.int64)
    pred_idx = np.asarray(pred_idx).reshape(len(layers), -1)[:, q]
    n_l, n_q = pred_idx.shape
    gt = np.asarray(gt_xy, dtype=np.float64)[q]
    qidx = np.asarray(query_idx, dtype=np.int64)[q]
    rec = empty_records(n_l * n_q)
    rec["seq"], rec["target"], rec["gap"], rec["angle"] = seq, target, gap, angle
    rec["layer"] = np.repeat(layers, n_q)
    rec["query"] = np.tile(q, n_l)
    rec["query_idx"] = np.tile(qidx, n_l)
    rec["pred_idx"] = pred_idx.reshape(-1)
    rec["gt_x"] = np.tile(gt[:, 0], n_l)
    rec["gt_y"] = np.tile(gt[:, 1], n_l)
    e = token_errors(pred_idx, np.broadcast_to(gt, (n_l, n_q, 2)), grid_hw)
    for k, v in e.items():
        rec[k] = v.reshape(-1)
    # Zero-motion: the query's own (row, col) in frame t; layer-independent, so tiled.
    z = token_errors(qidx, gt, grid_hw)
    for k, v in z.items():
        rec["zm_" + k] = np.tile(v, n_l)
    rec["conf_max"] = np.asarray(conf_max).reshape(n_l, -1)[:, q].reshape(-1)
    rec["conf_softmax"] = np.asarray(conf_softmax).reshape(n_l, -1)[:, q].reshape(-1)
    return rec


def evaluate_pair(sim: ArrayLike, *, seq: int, target: int, gap: int, query_idx: np.ndarray,
                  gt_xy: np.ndarray, visible: np.ndarray, grid_hw: tuple[int, int],
                  layers: Sequence[int] | None = None, angle: float = float("nan"),
                  tau: float = DEFAULT_TAU) -> np.ndarray:
    """Match and record one (sequence, target) pair. sim (L, Q, Nt) or (Q, Nt), row q = query point q.

    Rows of invisible points are dropped before matching (no wasted argmax on the device).
    ``layers`` defaults to 0..L-1.
    """
    s = _as_tensor(sim)
    if s.dim() == 2:
        s = s.unsqueeze(0)
    if s.shape[-1] != grid_hw[0] * grid_hw[1]:
        raise ValueError(f"sim has {s.shape[-1]} target tokens, grid {grid_hw} has {grid_hw[0] * grid_hw[1]}")
    vis = np.asarray(visible, dtype=bool)
    layers = list(range(s.shape[0])) if layers is None else list(layers)
    m = match_tokens(s[:, torch.from_numpy(np.flatnonzero(vis)).to(s.device)], tau=tau)
    q = np.flatnonzero(vis)
    n_l = s.shape[0]

    def full(a: np.ndarray) -> np.ndarray:  # scatter back to (L, Q) so pair_records can index by q
        out = np.zeros((n_l, len(vis)), dtype=a.dtype)
        out[:, q] = a
        return out

    return pair_records(seq=seq, target=target, gap=gap, query_idx=query_idx, gt_xy=gt_xy, visible=vis,
                        grid_hw=grid_hw, pred_idx=full(m.idx), conf_max=full(m.conf_max),
                        conf_softmax=full(m.conf_softmax), layers=layers, angle=angle)


def save_records(path: str | Path, records: np.ndarray, meta: dict | None = None) -> Path:
    """Write records column-wise: ``.npz`` (numpy, compressed) or ``.parquet`` (pyarrow).

    ``meta`` (JSON-serialisable: model, mode, grid, sequence names ...) goes along.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_s = json.dumps(meta or {})
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.table({f: records[f] for f in RECORD_FIELDS})
        table = table.replace_schema_metadata({b"gasp_meta": meta_s.encode()})
        pq.write_table(table, path, compression="zstd")
    elif path.suffix == ".npz":
        np.savez_compressed(path, __meta__=np.array(meta_s), **{f: records[f] for f in RECORD_FIELDS})
    else:
        raise ValueError(f"records file must end in .npz or .parquet: {path}")
    return path


def load_records(path: str | Path) -> tuple[np.ndarray, dict]:
    """Inverse of ``save_records`` -> (records, meta). Missing columns are left at zero."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        cols = {n: table.column(n).to_numpy() for n in table.column_names}
        md = table.schema.metadata or {}
        meta = json.loads(md.get(b"gasp_meta", b"{}").decode())
    else:
        with np.load(path, allow_pickle=False) as z:
            cols = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(str(z["__meta__"])) if "__meta__" in z.files else {}
    n = len(next(iter(cols.values()))) if cols else 0
    rec = empty_records(n)
    for f in RECORD_FIELDS:
        if f in cols:
            rec[f] = cols[f]
    return rec, meta


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x (N,), ties get the mean of the ranks they span."""
    x = np.asarray(x)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    counts = np.diff(np.r_[starts, n])
    avg = starts + (counts + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho (Pearson on average ranks); NaN if fewer than 2 points or either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie), via Mann-Whitney U on average ranks. NaN if one class."""
    score = np.asarray(score, dtype=np.float64)
    label = np.asarray(label, dtype=bool)
    ok = np.isfinite(score)
    score, label = score[ok], label[ok]
    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = average_ranks(score)
    u = r[label].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def per_sequence_means(values: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values (N,), seq (N,) -> (sequence ids (S,), mean of values within each sequence (S,))."""
    ids, inv = np.unique(np.asarray(seq), return_inverse=True)
    sums = np.bincount(inv, weights=np.asarray(values, dtype=np.float64), minlength=len(ids))
    cnt = np.bincount(inv, minlength=len(ids))
    return ids, sums / cnt


def seq_mean(values: np.ndarray, seq: np.ndarray) -> float:
    """Mean within each sequence, then over sequences; NaN when empty."""
    if len(values) == 0:
        return float("nan")
    return float(per_sequence_means(values, seq)[1].mean())


def pck(records: np.ndarray, prefix: str = "") -> dict[str, float]:
    """{"0","1","2"} -> sequence-averaged PCK. prefix "zm_" gives the zero-motion baseline."""
    return {k: seq_mean(records[f"{prefix}correct{k}"], records["seq"]) for k in PCK_KEYS}


def pairs_table(records: np.ndarray, gap_key: str = "gap") -> np.ndarray:
    """Unique (seq, target) pairs -> structured array (seq, target, gap) with gap from ``gap_key``."""
    key = records["seq"].astype(np.int64) * 65536 + (records["target"].astype(np.int64) + 32768)
    _, first = np.unique(key, return_index=True)  # each pair has one gap: take its first record's
    out = np.zeros(len(first), dtype=[("seq", np.int32), ("target", np.int16), ("gap", np.float64)])
    out["seq"], out["target"] = records["seq"][first], records["target"][first]
    out["gap"] = records[gap_key][first]
    return out


def far_split(records: np.ndarray, gap_key: str = "gap") -> dict[str, Any]:
    """The largest-gap half of the (seq, target) pairs: gap > median pair gap (ties -> near).

    Returns {"mask": (N,) bool over records, "threshold": median, "num_far_pairs", "num_pairs"}.
    """
    pairs = pairs_table(records, gap_key)
    g = pairs["gap"][np.isfinite(pairs["gap"])]
    if len(g) == 0:
        return {"mask": np.zeros(len(records), bool), "threshold": float("nan"), "num_far_pairs": 0, "num_pairs": 0}
    thr = float(np.median(g))
    gaps = records[gap_key].astype(np.float64)
    return {"mask": gaps > thr, "threshold": thr,
            "num_far_pairs": int((g > thr).sum()), "num_pairs": int(len(g))}


def gap_groups(records: np.ndarray, gap_key: str = "gap",
               gap_bins: Sequence[float] | None = None) -> tuple[list[float], list[np.ndarray]]:
    """Group records by gap -> (gap labels, list of (N,) masks).

    No bins: one group per distinct gap value (label = the value). With ``gap_bins`` (edges,
    increasing): group i = [edge_i, edge_{i+1}), the last bin closed; label = mean gap of its
    records (bins with no record are dropped).
    """
    g = records[gap_key].astype(np.float64)
    fin = np.isfinite(g)
    if gap_bins is None:
        vals = np.unique(g[fin])
        return [float(v) for v in vals], [g == v for v in vals]
    edges = np.asarray(gap_bins, dtype=np.float64)
    b = np.digitize(g, edges[1:-1], right=False)  # 0..len(edges)-2
    inside = fin & (g >= edges[0]) & (g <= edges[-1])
    labels, masks = [], []
    for i in range(len(edges) - 1):
        m = inside & (b == i)
        if m.any():
            labels.append(float(g[m].mean()))
            masks.append(m)
    return labels, masks


def reliability_bins(conf: np.ndarray, correct: np.ndarray, n_bins: int = 10,
                     strategy: str = "quantile") -> dict[str, np.ndarray]:
    """Binned confidence vs accuracy for a reliability plot.

    strategy "quantile" (equal-count bins; cosine confidences crowd in a narrow range) or
    "uniform" (equal-width over [min, max]). Returns conf (B,) mean confidence, acc (B,), count (B,);
    empty bins are dropped.
    """
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    ok = np.isfinite(conf)
    conf, correct = conf[ok], correct[ok]
    if len(conf) == 0:
        z = np.zeros(0)
        return {"conf": z, "acc": z, "count": z.astype(np.int64)}
    if strategy == "quantile":
        edges = np.quantile(conf, np.linspace(0, 1, n_bins + 1))
    elif strategy == "uniform":
        edges = np.linspace(conf.min(), conf.max(), n_bins + 1)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    b = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    cnt = np.bincount(b, minlength=n_bins)
    keep = cnt > 0
    mc = np.bincount(b, weights=conf, minlength=n_bins)[keep] / cnt[keep]
    acc = np.bincount(b, weights=correct, minlength=n_bins)[keep] / cnt[keep]
    return {"conf": mc, "acc": acc, "count": cnt[keep]}


def peak_layer(layers: Sequence[int], pck1: Sequence[float]) -> int:
    """Layer with the highest PCK@1 (NaN ignored); ties -> the lowest layer index."""
    layers = np.asarray(layers)
    v = np.nan_to_num(np.asarray(pck1, dtype=np.float64), nan=-np.inf)
    order = np.argsort(layers, kind="stable")
    return int(layers[order][int(np.argmax(v[order]))])


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _jf(x: Any) -> float | None:
    """float for JSON: NaN/inf -> None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _jd(d: dict[str, float]) -> dict[str, float | None]:
    return {k: _jf(v) for k, v in d.items()}


def summarize(records: np.ndarray, *, gap_key: str = "gap", gap_bins: Sequence[float] | None = None,
              correct_key: str = "correct1") -> dict[str, Any]:
    """Per-layer PCK, confidence, far PCK, peak, PCK vs gap and zero-motion for one direction."""
    if len(records) == 0:
        raise ValueError("summarize: no records (no GT-visible points?)")
    layer_ids = np.unique(records["layer"])
    split = far_split(records, gap_key)
    far = split["mask"]
    gaps, gmasks = gap_groups(records, gap_key, gap_bins)
    k = correct_key[-1]  # "correct1" -> "1": the threshold reported in far/temporal/peak ranking

    layers, by_layer = [], []
    for lay in layer_ids:
        m = records["layer"] == lay
        r = records[m]
        fm = far[m]
        correct = r[correct_key]
        layers.append({
            "layer": int(lay),
            "pck": _jd(pck(r)),
            "confidence": {
                "spearman": _jf(spearman(r["conf_max"], correct)),
                "auroc": _jf(auroc(r["conf_max"], correct)),
                "spearman_softmax": _jf(spearman(r["conf_softmax"], correct)),
                "auroc_softmax": _jf(auroc(r["conf_softmax"], correct)),
            },
            "far_pck": _jf(seq_mean(correct[fm], r["seq"][fm])),
            "num_points": int(m.sum()),
        })
        by_layer.append([_jf(seq_mean(correct[gm[m]], r["seq"][gm[m]])) for gm in gmasks])

    pk = peak_layer([e["layer"] for e in layers], [np.nan if e["pck"][k] is None else e["pck"][k] for e in layers])
    pk_i = [e["layer"] for e in layers].index(pk)
    pk_rec_mask = records["layer"] == pk

    def by_gap(flag: str, mask: np.ndarray) -> list[float | None]:
        r = records[mask]
        return [_jf(seq_mean(r[flag][gm[mask]], r["seq"][gm[mask]])) for gm in gmasks]

    # Zero-motion is layer-independent: aggregate it from the lowest layer's records only.
    zm_mask = records["layer"] == layer_ids[0]
    zr = records[zm_mask]
    zf = far[zm_mask]
    return {
        "num_sequences": int(len(np.unique(records["seq"]))),
        "num_pairs": split["num_pairs"],
        "layers": layers,
        "peak": {"layer": pk, "pck": layers[pk_i]["pck"], "far_pck": layers[pk_i]["far_pck"]},
        "temporal": {
            "layer": pk, "gap_key": gap_key, "gaps": gaps,
            "pck": by_layer[pk_i],
            "pck0": by_gap("correct0", pk_rec_mask), "pck2": by_gap("correct2", pk_rec_mask),
            "count": [int(gm[pk_rec_mask].sum()) for gm in gmasks],
            "by_layer": by_layer,
        },
        "far": {"rule": f"{gap_key} > median pair {gap_key}", "threshold": _jf(split["threshold"]),
                "num_far_pairs": split["num_far_pairs"], "num_pairs": split["num_pairs"]},
        "zero_motion": {
            "pck": _jd(pck(zr, prefix="zm_")),
            "far_pck": _jf(seq_mean(zr["zm_" + correct_key][zf], zr["seq"][zf])),
            "by_gap": by_gap("zm_" + correct_key, zm_mask),
        },
    }


def build_report(records: np.ndarray, *, model: str, mode: str, reverse_records: np.ndarray | None = None,
                 gap_key: str = "gap", gap_bins: Sequence[float] | None = None,
                 correct_key: str = "correct1", extra: dict | None = None) -> dict[str, Any]:
    """The ``report.json`` dict (issue 5 schema + extras). All floats are JSON-safe (NaN -> None).

    records: forward direction (frame-1 queries vs frame-t keys). reverse_records: optional
    qk-rev records (frame-t queries vs frame-1 keys; GT = the frame-1 points, gap = same Δt),
    summarised into ``report["reverse"]`` with the same structure.
    """
    s = summarize(records, gap_key=gap_key, gap_bins=gap_bins, correct_key=correct_key)
    report: dict[str, Any] = {
        "model": model, "mode": mode, "num_sequences": s.pop("num_sequences"),
        **s,
        "definitions": {
            "pck0": "matched token contains the GT point",
            "pck1": "err <= 1 token (centre of matched token to GT point)",
            "pck2": "err <= 2 tokens",
            "averaging": "per sequence (pooled over its targets and points), then over sequences",
            "confidence": f"conf_max = max cosine; *_softmax = max softmax(sim/tau); vs {correct_key}, pooled points",
            "far": s["far"]["rule"] + "; ties at the median are near",
            "peak": "argmax PCK@1 over layers, ties -> lowest layer",
            "zero_motion": "predict the query's own (row, col) in frame t",
        },
    }
    if reverse_records is not None and len(reverse_records):
        report["reverse"] = summarize(reverse_records, gap_key=gap_key, gap_bins=gap_bins, correct_key=correct_key)
    if extra:
        report.update(extra)
    return report


def write_report(report: dict, path: str | Path) -> Path:
    """Strict JSON (allow_nan=False: a NaN that slipped through is a bug, not a silent 'NaN')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, allow_nan=False))
    return path


def read_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
