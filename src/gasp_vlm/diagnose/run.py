"""The correspondence diagnostic runner (issue 5; paper §5.3): model + geometry source -> report.

For each held-out sequence: sample F frames, build the model inputs, run ONE forward pass (no grad)
capturing every needed layer and kind at once, then match every anchor query point against the
tokens of every target frame by argmax of a cosine similarity, per layer and per mode:

- ``qk``      pre-RoPE query of the anchor token vs pre-RoPE keys of frame t (all heads
              concatenated, GQA keys repeated): the paper's definition. Row "layer l" = the q/k of
              decoder layer l (whose input is the output of layer l-1).
- ``qk-rope`` the same after the model's own rotary (M-RoPE for Qwen, 1-D for LLaVA).
- ``hidden``  the output of decoder layer l (before the final norm for the last layer).
- ``head``    the embeddings of a trained correspondence head on the output of layer l.

``reverse=True`` also scores frame-t queries (the token containing the GT point) against the anchor
frame's keys, the direction a causal LM's attention can actually use (``report["reverse"]``).

Output folder (every file is written atomically: a temp file renamed into place)::

    run.json                  settings fingerprint (resume refuses different settings) + timing
    sequences/<idx>.npz       per-sequence records of every mode/direction, points, heat maps
                              (a rerun skips the sequences that already have one)
    points.npz                one row per GT-visible (sequence, target, query): frames, pixels,
                              token coordinates, object ids -- joins records on (seq, target, query)
    report.json / report.md   the first mode's report (issue schema) + an index of all modes
    pck_per_layer.png         every mode on one plot; pck_vs_gap.png, reliability.png (first mode)
    correspondences_<idx>.png frame 1 | frame t with matches | heat map of one query (peak layer)
    <mode>/report.json, report.md, records.npz[, records_reverse.npz], plots of that mode

Records follow ``metrics.RECORD_DTYPE`` with ``seq`` = the source index of the sequence, ``target``
= the target's frame position in the clip, ``gap`` = |target - anchor| in source frame ids (frame
positions when the source gives no frame ids; absolute because a source may place the anchor
mid-clip -- points.npz keeps the signed value) and ``angle`` = the rotation angle (deg) between the
two cameras when the item carries poses (``cam_from_world``), else NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gasp_vlm.diagnose import metrics as M

MODES: tuple[str, ...] = ("qk", "qk-rope", "hidden", "head")
# capture kinds each mode needs; q/k-side and key-side kind
_MODE_KINDS: dict[str, tuple[str, str]] = {
    "qk": ("q", "k"), "qk-rope": ("q_rope", "k_rope"), "hidden": ("hidden", "hidden"), "head": ("hidden", "hidden")}
MODE_DESCRIPTIONS: dict[str, str] = {
    "qk": "pre-RoPE q_proj of frame-1 tokens vs k_proj of frame-t tokens (heads concatenated, GQA repeated), cosine",
    "qk-rope": "post-RoPE q vs k (the model's own rotary), heads concatenated, cosine",
    "hidden": "cosine of decoder-layer outputs",
    "head": "cosine of correspondence-head embeddings of decoder-layer outputs",
}
FORMAT = "gasp-diagnose/1"

POINTS_DTYPE = np.dtype([
    ("seq", np.int32),             # source index of the sequence (= records' seq)
    ("target", np.int16),          # target frame position in the clip (= records' target)
    ("query", np.int32),           # query point index (= records' query)
    ("anchor_frame", np.int16),    # anchor frame position in the clip
    ("anchor_frame_id", np.int64),  # source frame ids (frame positions when the source has none)
    ("target_frame_id", np.int64),
    ("gap", np.int32),             # signed: target frame id - anchor frame id (records hold |gap|)
    ("query_u", np.float32),       # query pixel in the anchor frame (original-frame pixels)
    ("query_v", np.float32),
    ("query_x", np.float32),       # the same in token units of the anchor frame
    ("query_y", np.float32),
    ("gt_u", np.float32),          # GT pixel in the target frame (original-frame pixels)
    ("gt_v", np.float32),
    ("gt_x", np.float32),          # the same in token units
    ("gt_y", np.float32),
    ("object_id", np.int32),       # object id under the query pixel (item["objects"]); -1 = none/unknown
    ("target_object_id", np.int32),  # object id under the GT pixel in frame t; -1 = none/unknown
])


class DiagnoseError(ValueError):
    """A user-facing problem with a diagnosis run (settings, data, output folder)."""


# ------------------------------------------------------------------------------------------------
# Built-in toy source (exact GT): OrthoShiftSequences + ortho_targets behind the source protocol
# ------------------------------------------------------------------------------------------------
class OrthoToySource:
    """``gasp diagnose --data toy``: orthographic shifted crops of a random texture, exact GT."""

    def __init__(self, num_sequences: int = 200, frame_hw: tuple[int, int] = (224, 224), seed: int = 0,
                 max_step_tokens: int = 1) -> None:
        from gasp_vlm.train.toy_geometry import OrthoShiftSequences

        self.seqs = OrthoShiftSequences(num_sequences, frame_hw=frame_hw, max_step_tokens=max_step_tokens,
                                        seed=seed)
        self.frame_hw, self.seed = tuple(frame_hw), seed

    def __len__(self) -> int:
        return len(self.seqs)

    def __repr__(self) -> str:
        return f"OrthoToySource(n={len(self)}, frame_hw={self.frame_hw}, seed={self.seed})"

    def describe(self) -> str:
        # no sequence count: items depend on (seed, index) only, so a longer run may resume a shorter one
        return f"OrthoToySource(frame_hw={self.frame_hw}, seed={self.seed})"

    def sample(self, index: int, num_frames: int) -> dict:
        item = self.seqs.sample(index, num_frames)
        item["scene"] = f"toy-{self.seed}-{index}"
        return item

    def targets(self, layout, item: dict):
        from gasp_vlm.train.toy_geometry import ortho_targets

        return ortho_targets(layout, item)


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _atomic_savez(path: Path, **arrays: np.ndarray) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.npz")  # savez appends .npz to names without it
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _atomic_save_records(path: Path, records: np.ndarray, meta: dict) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    M.save_records(tmp, records, meta)
    os.replace(tmp, path)
    return path


def resolve_layers(num_layers: int, layers: Sequence[int] | None) -> list[int]:
    """None -> all layers; negative indices count from the end; sorted, unique, range-checked."""
    if layers is None:
        return list(range(num_layers))
    out = set()
    for l in layers:
        li = int(l) + (num_layers if int(l) < 0 else 0)
        if not 0 <= li < num_layers:
            raise DiagnoseError(f"layer {l} out of range: the model has {num_layers} decoder layers "
                                f"(0..{num_layers - 1})")
        out.add(li)
    if not out:
        raise DiagnoseError("no layers selected")
    return sorted(out)


def mode_layers(modes: Sequence[str], num_layers: int, layers: Sequence[int] | None,
                heads: Any = None) -> dict[str, list[int]]:
    """The decoder layers each mode is evaluated at (``head``: the heads' layers within ``layers``)."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise DiagnoseError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    if len(set(modes)) != len(modes):
        raise DiagnoseError(f"duplicate modes in {list(modes)}")
    if not modes:
        raise DiagnoseError("no mode given")
    chosen = resolve_layers(num_layers, layers)
    out = {}
    for m in modes:
        if m == "head":
            if heads is None:
                raise DiagnoseError("mode 'head' needs correspondence heads (a gasp training checkpoint with heads)")
            hl = [int(l) for l in heads.layer_indices if layers is None or int(l) in chosen]
            if not hl:
                raise DiagnoseError(f"mode 'head': the heads serve layers {list(heads.layer_indices)}, none of "
                                    f"the selected layers {chosen}")
            out[m] = sorted(hl)
        else:
            out[m] = chosen
    return out


def _rotation_angles(item: dict, anchor: int, targets: Sequence[int]) -> np.ndarray:
    """Rotation angle (deg) between the anchor camera and each target camera, NaN without poses.

    Works for world->camera or camera->world rotations alike (the relative angle is the same).
    """
    for key in ("cam_from_worlds", "cam_from_world", "extrinsics", "world_from_cams", "poses"):
        poses = item.get(key)
        if poses is None:
            continue
        p = np.asarray(poses, dtype=np.float64)
        if p.ndim != 3 or p.shape[1] < 3 or p.shape[2] < 3:
            continue
        ra = p[anchor, :3, :3]
        out = []
        for t in targets:
            c = (np.trace(ra @ p[t, :3, :3].T) - 1.0) / 2.0
            out.append(math.degrees(math.acos(min(1.0, max(-1.0, c)))))
        return np.asarray(out, dtype=np.float64)
    return np.full(len(targets), np.nan)


def _object_ids(objects: Any, frame: int, uv: np.ndarray) -> np.ndarray:
    """Object id under each pixel uv (K, 2) of ``frame``; -1 where unknown (no map, NaN, outside)."""
    out = np.full(len(uv), -1, dtype=np.int32)
    if objects is None or frame >= len(objects) or objects[frame] is None:
        return out
    obj = np.asarray(objects[frame])
    h, w = obj.shape[:2]
    ok = np.isfinite(uv).all(-1)
    x = np.floor(np.where(ok, uv[:, 0], -1)).astype(np.int64)
    y = np.floor(np.where(ok, uv[:, 1], -1)).astype(np.int64)
    ok &= (x >= 0) & (x < w) & (y >= 0) & (y < h)
    out[ok] = obj[y[ok], x[ok]]
    return out


def source_description(source: Any) -> str:
    """What identifies a source's items (part of the resume fingerprint)."""
    if hasattr(source, "describe"):
        return str(source.describe())
    attrs = [f"{a}={getattr(source, a)}" for a in ("root", "seed", "radius", "grid", "anchor_stride", "anchor_first")
             if hasattr(source, a)]
    return f"{type(source).__name__}({', '.join(attrs)})" if attrs else type(source).__name__


def _fingerprint(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Per-sequence analysis
# ------------------------------------------------------------------------------------------------
def _features(mode: str, cap, b: int, layer: int, heads: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normalised (N, C) fp32 query-side and key-side features of sample b at one layer."""
    qk, kk = _MODE_KINDS[mode]
    q = getattr(cap, qk)[layer][b]
    k = getattr(cap, kk)[layer][b]
    if mode == "head":
        head = heads.for_layer(layer)
        p = next(head.parameters())
        x = q.to(device=p.device, dtype=p.dtype)
        if getattr(heads, "input_norm", "none") == "rms":  # gasp.head_norm: the stream they were trained on
            from gasp_vlm.method.gasp import rms_normalize

            x = rms_normalize(x)
        q = k = head(x)
    q = torch.nn.functional.normalize(q.float(), dim=-1, eps=1e-8)
    k = q if kk == qk else torch.nn.functional.normalize(k.float(), dim=-1, eps=1e-8)  # hidden/head: one feature
    return q, k


def analyse_sample(cap, b: int, layout, tgt, item: dict, *, seq: int, modes: dict[str, list[int]],
                   heads: Any = None, reverse: bool = False, tau: float = M.DEFAULT_TAU) -> dict[str, Any]:
    """Records, points and heat maps of one captured sample (see module docstring).

    Returns {"records": {(mode, "fwd"|"rev"): records}, "points": POINTS_DTYPE array,
    "heat": {mode: (L, Nt) float32}, "heat_target", "heat_query", "meta": {...}}.
    """
    tps = layout.tokens_per_slot
    grid = tuple(layout.grid_hw)
    a_frame = int(tgt.anchor_frame)
    a_slot = layout.slot_of_frame(a_frame)
    a_lo = a_slot * tps
    anchor_rows = tgt.anchor_tokens.cpu().long()  # (M,) global visual index of each query's token
    n_q = len(anchor_rows)
    query_idx = (anchor_rows - a_lo).numpy()
    query_uv = tgt.query_uv.cpu().double().numpy()  # (M, 2)
    query_xy = layout.uv_to_token_units(query_uv)

    # Targets that are usable: a slot of their own (Qwen 'pair' mode shares slot 0 with frame 1).
    t_frames = [int(f) for f in tgt.target_frames]
    t_slots = [int(s) for s in tgt.target_slots]
    keep = [k for k, s in enumerate(t_slots) if s != a_slot]
    valid = tgt.valid.cpu().numpy().astype(bool)
    target_uv = tgt.target_uv.cpu().double().numpy()  # (M, T, 2)
    vis = valid & np.isfinite(target_uv).all(-1)
    gt_xy = layout.uv_to_token_units(np.nan_to_num(target_uv, nan=0.0))  # (M, T, 2)
    gt_tok = M.point_tokens(gt_xy, grid)  # (M, T) token index of the GT point in frame t

    n_frames = len(item["frames"])
    frame_ids = [int(x) for x in item.get("frame_ids", range(n_frames))]
    # Signed frame-id difference (a source may put the anchor mid-clip); records keep |gap|, the
    # temporal distance the robustness curves are about, the points table keeps the sign.
    signed_gaps = [frame_ids[t_frames[k]] - frame_ids[a_frame] for k in range(len(t_frames))]
    gaps = [abs(g) for g in signed_gaps]
    angles = _rotation_angles(item, a_frame, t_frames)

    # Heat map: one central visible query against the farthest usable target frame.
    heat_k = max(keep, key=lambda k: (gaps[k], k)) if keep else -1
    heat_q = -1
    if heat_k >= 0 and vis[:, heat_k].any():
        centre = np.array([grid[1] / 2.0, grid[0] / 2.0])
        d = np.linalg.norm(query_xy - centre, axis=-1)
        d[~vis[:, heat_k]] = np.inf
        heat_q = int(np.argmin(d))

    slots = torch.tensor([t_slots[k] for k in keep], dtype=torch.long)
    records: dict[tuple[str, str], np.ndarray] = {}
    heat: dict[str, np.ndarray] = {}
    for mode, lays in modes.items():
        fwd_sims, rev_sims = [], []
        for lay in lays:
            qf, kf = _features(mode, cap, b, lay, heads)
            keys = kf.view(-1, tps, kf.shape[-1])  # (S, Nt, C) keys per slot
            # frame-1 queries vs the keys of every kept target slot at once: (M, T', Nt)
            fwd_sims.append(torch.einsum("mc,tnc->mtn", qf[anchor_rows], keys[slots]))
            if reverse and keep:
                # frame-t queries = the token holding the GT point; keys = the anchor slot
                rows = torch.from_numpy(np.where(vis[:, keep], gt_tok[:, keep], 0)).long()  # (M, T')
                rows = rows + slots[None, :] * tps
                rev_sims.append(qf[rows] @ keys[a_slot].T)  # (M, T', Na)
        if not keep:
            continue
        sim = torch.stack(fwd_sims)  # (L, M, T', Nt)
        m = M.match_tokens(sim, tau=tau)
        parts = [M.pair_records(seq=seq, target=t_frames[k], gap=gaps[k], query_idx=query_idx, gt_xy=gt_xy[:, k],
                                visible=vis[:, k], grid_hw=grid, pred_idx=m.idx[:, :, j], conf_max=m.conf_max[:, :, j],
                                conf_softmax=m.conf_softmax[:, :, j], layers=lays, angle=float(angles[k]))
                 for j, k in enumerate(keep)]
        records[(mode, "fwd")] = M.concat_records(parts)
        if heat_q >= 0:
            heat[mode] = sim[:, heat_q, keep.index(heat_k)].numpy().astype(np.float32)
        if reverse:
            rs = torch.stack(rev_sims)
            mr = M.match_tokens(rs, tau=tau)
            parts = [M.pair_records(seq=seq, target=t_frames[k], gap=gaps[k], query_idx=gt_tok[:, k],
                                    gt_xy=query_xy, visible=vis[:, k], grid_hw=grid, pred_idx=mr.idx[:, :, j],
                                    conf_max=mr.conf_max[:, :, j], conf_softmax=mr.conf_softmax[:, :, j],
                                    layers=lays, angle=float(angles[k]))
                     for j, k in enumerate(keep)]
            records[(mode, "rev")] = M.concat_records(parts)

    # Points table: one row per GT-visible (target, query), joinable with the records.
    objects = item.get("objects")
    q_obj = _object_ids(objects, a_frame, query_uv)
    rows = []
    for k in keep:
        q = np.flatnonzero(vis[:, k])
        p = np.zeros(len(q), dtype=POINTS_DTYPE)
        p["seq"], p["target"], p["query"] = seq, t_frames[k], q
        p["anchor_frame"], p["anchor_frame_id"] = a_frame, frame_ids[a_frame]
        p["target_frame_id"], p["gap"] = frame_ids[t_frames[k]], signed_gaps[k]
        p["query_u"], p["query_v"] = query_uv[q, 0], query_uv[q, 1]
        p["query_x"], p["query_y"] = query_xy[q, 0], query_xy[q, 1]
        p["gt_u"], p["gt_v"] = target_uv[q, k, 0], target_uv[q, k, 1]
        p["gt_x"], p["gt_y"] = gt_xy[q, k, 0], gt_xy[q, k, 1]
        p["object_id"] = q_obj[q]
        p["target_object_id"] = _object_ids(objects, t_frames[k], target_uv[q, k])
        rows.append(p)
    points = np.concatenate(rows) if rows else np.zeros(0, dtype=POINTS_DTYPE)
    tr = layout.transform
    meta = {
        "seq": seq, "scene": str(item.get("scene", f"seq-{seq}")), "frame_ids": frame_ids,
        "scene_meta": json.loads(json.dumps(item.get("meta") or {}, default=str)),
        "anchor_frame": a_frame, "target_frames": t_frames,
        "skipped_targets": [t_frames[k] for k in range(len(t_frames)) if k not in keep],
        "grid_hw": list(grid), "num_queries": n_q, "num_visible": int(vis[:, keep].sum()) if keep else 0,
        "heat_target": t_frames[heat_k] if heat_q >= 0 else None, "heat_query": heat_q if heat_q >= 0 else None,
        "transform": {"orig_hw": list(tr.orig_hw), "input_hw": list(tr.input_hw), "scale": list(tr.scale),
                      "offset": list(tr.offset)},
        "layers": {m: lays for m, lays in modes.items()},
    }
    return {"records": records, "points": points, "heat": heat, "meta": meta}


def _seq_path(out_dir: Path, idx: int) -> Path:
    return out_dir / "sequences" / f"{int(idx):08d}.npz"


def _save_sequence(path: Path, res: dict, fingerprint: str) -> None:
    arrays: dict[str, np.ndarray] = {"__meta__": np.array(json.dumps({**res["meta"], "fingerprint": fingerprint})),
                                     "points": res["points"]}
    for (mode, d), rec in res["records"].items():
        arrays[f"rec__{mode}__{d}"] = rec
    for mode, h in res["heat"].items():
        arrays[f"heat__{mode}"] = h
    _atomic_savez(path, **arrays)


def load_sequence(path: str | Path) -> dict[str, Any]:
    """A per-sequence file -> {"meta", "points", "records": {(mode, dir): rec}, "heat": {mode: arr}}."""
    out: dict[str, Any] = {"records": {}, "heat": {}}
    with np.load(path, allow_pickle=False) as z:
        out["meta"] = json.loads(str(z["__meta__"]))
        out["points"] = z["points"]
        for name in z.files:
            if name.startswith("rec__"):
                _, mode, d = name.split("__")
                out["records"][(mode, d)] = z[name].astype(M.RECORD_DTYPE, copy=False)
            elif name.startswith("heat__"):
                out["heat"][name.split("__", 1)[1]] = z[name]
    return out


def _sequence_done(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["__meta__"])).get("fingerprint") == fingerprint
    except Exception:  # noqa: BLE001 - an unreadable leftover is recomputed, not trusted
        return False


# ------------------------------------------------------------------------------------------------
# Report writing
# ------------------------------------------------------------------------------------------------
def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def report_markdown(reports: dict[str, dict], title: str = "") -> str:
    """Markdown summary of one or several mode reports ({mode: report})."""
    first = next(iter(reports.values()))
    lines = [f"# Correspondence diagnostic — {title or first['model']}", "",
             f"{first['num_sequences']} sequences, {first.get('frames', '?')} frames, frame mode "
             f"{first.get('frame_mode', '?')}, token grid {first.get('grid_hw', '?')}; {first['num_pairs']} "
             "(sequence, target) pairs. PCK: matched token contains the GT point (@0), or its centre lies "
             "within 1 / 2 tokens (@1, @2); per sequence, then over sequences. Read every figure against "
             "the zero-motion baseline (the query's own (row, col) in frame t).", ""]
    for mode, r in reports.items():
        pk, zm = r["peak"], r["zero_motion"]
        rev = {e["layer"]: e for e in r["reverse"]["layers"]} if "reverse" in r else {}
        lines += [f"## Mode `{mode}`", "", MODE_DESCRIPTIONS.get(mode, ""), "",
                  f"Peak layer {pk['layer']}: PCK@0 {_f(pk['pck']['0'])}, PCK@1 {_f(pk['pck']['1'])}, "
                  f"PCK@2 {_f(pk['pck']['2'])}, far PCK@1 {_f(pk['far_pck'])}. Zero-motion: PCK@1 "
                  f"{_f(zm['pck']['1'])}, far {_f(zm['far_pck'])}.", ""]
        head = "| layer | PCK@0 | PCK@1 | PCK@2 | far PCK@1 | Spearman | AUROC | AUROC (softmax) |"
        sep = "|---|---|---|---|---|---|---|---|"
        if rev:
            head += " reverse PCK@1 |"
            sep += "---|"
        lines += [head, sep]
        for e in r["layers"]:
            c = e["confidence"]
            row = (f"| {e['layer']} | {_f(e['pck']['0'])} | {_f(e['pck']['1'])} | {_f(e['pck']['2'])} | "
                   f"{_f(e['far_pck'])} | {_f(c['spearman'])} | {_f(c['auroc'])} | {_f(c['auroc_softmax'])} |")
            if rev:
                row += f" {_f(rev[e['layer']]['pck']['1']) if e['layer'] in rev else '–'} |"
            lines.append(row)
        t = r["temporal"]
        lines += ["", f"PCK@1 vs frame gap at layer {t['layer']}:", "", "| gap | model | zero-motion | points |",
                  "|---|---|---|---|"]
        for g, p, z, n in zip(t["gaps"], t["pck"], zm["by_gap"], t["count"]):
            lines.append(f"| {g:g} | {_f(p)} | {_f(z)} | {n} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _input_view(frame: np.ndarray, tr: dict) -> np.ndarray:
    """An original frame as the model sees it (resize, then crop): covers the token grid exactly."""
    from PIL import Image

    h, w = frame.shape[:2]
    sx, sy = tr["scale"]
    ox, oy = tr["offset"]
    ih, iw = tr["input_hw"]
    img = Image.fromarray(frame).resize((max(1, round(w * sx)), max(1, round(h * sy))), Image.BILINEAR)
    return np.asarray(img.crop((int(ox), int(oy), int(ox) + iw, int(oy) + ih)))


def _write_pictures(out_dir: Path, source: Any, seq_files: list[Path], mode: str, layer: int, num_frames: int,
                    limit: int) -> list[Path]:
    """Correspondence pictures of the first ``limit`` sequences at ``layer`` of ``mode``."""
    from gasp_vlm.diagnose.plots import plot_correspondences

    paths = []
    for f in seq_files[:limit]:
        s = load_sequence(f)
        meta = s["meta"]
        rec = s["records"].get((mode, "fwd"))
        if rec is None or meta["heat_target"] is None or mode not in s["heat"]:
            continue
        t = meta["heat_target"]
        r = rec[(rec["layer"] == layer) & (rec["target"] == t)]
        if not len(r):
            continue
        item = source.sample(meta["seq"], num_frames)  # map-style sources are deterministic per index
        ids = [int(x) for x in item.get("frame_ids", range(len(item["frames"])))]
        if ids != meta["frame_ids"]:
            print(f"warning: {source_description(source)} gave other frames for sequence {meta['seq']} on "
                  f"re-sampling; its picture is skipped", file=sys.stderr)
            continue
        pts = s["points"]
        pts = pts[pts["target"] == t]
        qxy = {int(p["query"]): (float(p["query_x"]), float(p["query_y"])) for p in pts}
        grid = tuple(meta["grid_hw"])
        hq = list(r["query"]).index(meta["heat_query"]) if meta["heat_query"] in set(r["query"].tolist()) else 0
        lay_pos = meta["layers"][mode].index(layer)
        tr = meta["transform"]
        paths.append(plot_correspondences(
            _input_view(item["frames"][meta["anchor_frame"]], tr), _input_view(item["frames"][t], tr), grid,
            np.array([qxy[int(q)] for q in r["query"]]), M.token_centres(r["pred_idx"], grid), r["correct1"],
            out_dir / f"correspondences_{int(meta['seq']):08d}.png",
            gt_xy=np.stack([r["gt_x"], r["gt_y"]], -1), heat=s["heat"][mode][lay_pos], heat_query=hq,
            title=f"{meta['scene']}: frame {meta['anchor_frame']} -> {t} (gap {int(r['gap'][0])}), "
                  f"{mode} layer {layer}"))
    return paths


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="seq", dynamic_ncols=True)


def _forward(adapter, frames_list: list[list[np.ndarray]], prompt: str | None, frame_mode: str | None,
             kinds: list[str], layers: list[int]):
    """Prepare + ONE capture forward for a batch; splits it when token counts differ across samples."""
    batch = adapter.prepare_frames(frames_list, prompt=prompt, frame_mode=frame_mode)
    if len({lay.num_visual for lay in batch.layouts}) > 1:  # capture needs one N per batch
        out = []
        for fr in frames_list:
            out += _forward(adapter, [fr], prompt, frame_mode, kinds, layers)
        return out
    cap = adapter.forward_capture(batch.to(adapter.device), what=kinds, layers=layers, grad=False)
    return [(cap, b, lay) for b, lay in enumerate(batch.layouts)]


@torch.no_grad()
def run_diagnosis(adapter, source, indices: Sequence[int], *, modes: Sequence[str] = ("qk",),
                  layers: Sequence[int] | None = None, num_frames: int = 8, heads: Any = None,
                  reverse: bool = False, out_dir: str | Path, progress: bool = True, resume: bool = True,
                  batch_size: int = 1, model_name: str | None = None, frame_mode: str | None = None,
                  prompt: str | None = "Describe the scene.", tau: float = M.DEFAULT_TAU,
                  pictures: int = 2, on_sequence: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Diagnose ``adapter`` on the sequences ``indices`` of ``source``; returns the first mode's report.

    The report also carries ``report["modes"]``: {mode: path of that mode's report.json, relative to
    ``out_dir``}. ``model_name`` labels the report (default: the preset or the family). ``frame_mode``
    overrides the adapter's frame mode. ``pictures``: how many correspondence pictures to draw.
    ``on_sequence`` is called with the source index after each newly computed sequence.
    """
    out_dir = Path(out_dir)
    indices = [int(i) for i in indices]
    if not indices:
        raise DiagnoseError("no sequences to diagnose (empty index list)")
    if len(set(indices)) != len(indices):
        raise DiagnoseError("duplicate sequence indices")
    if num_frames < 2:
        raise DiagnoseError(f"num_frames must be >= 2 (an anchor and at least one target), got {num_frames}")
    if batch_size < 1:
        raise DiagnoseError(f"batch_size must be >= 1, got {batch_size}")
    if frame_mode is not None and frame_mode not in adapter.frame_modes:
        raise DiagnoseError(f"{adapter.family}: unknown frame mode {frame_mode!r}; choose from {adapter.frame_modes}")
    modes = list(modes)
    per_mode = mode_layers(modes, adapter.num_layers, layers, heads)
    kinds = sorted({k for m in modes for k in _MODE_KINDS[m]})
    cap_layers = sorted({l for lays in per_mode.values() for l in lays})
    model_name = model_name or adapter.preset or adapter.family
    fmode = frame_mode or adapter.frame_mode

    cfg = {"format": FORMAT, "model": model_name, "family": adapter.family, "frame_mode": fmode,
           "modes": modes, "layers": per_mode, "frames": int(num_frames), "reverse": bool(reverse),
           "prompt": prompt, "tau": float(tau), "source": source_description(source)}
    fp = _fingerprint(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sequences").mkdir(exist_ok=True)
    run_json = out_dir / "run.json"
    if run_json.is_file():
        old = json.loads(run_json.read_text())
        if resume and old.get("fingerprint") != fp:
            diff = sorted(k for k in cfg if old.get("config", {}).get(k) != cfg[k])
            raise DiagnoseError(f"{out_dir} holds a diagnosis with other settings ({', '.join(diff) or 'format'} "
                                f"differ); use another --out, or --no-resume to overwrite it")
    if not resume:  # overwrite: drop the earlier run's sequences and the folders of modes not run now
        for f in (out_dir / "sequences").glob("*.npz"):
            f.unlink()
        for m in MODES:
            if m not in modes and (out_dir / m / "report.json").is_file():
                shutil.rmtree(out_dir / m)
    atomic_write_text(run_json, json.dumps({"config": cfg, "fingerprint": fp, "status": "running"}, indent=2))

    pending = [i for i in indices if not _sequence_done(_seq_path(out_dir, i), fp)]
    timing = {"sample": 0.0, "prepare_forward": 0.0, "match": 0.0, "write": 0.0}
    bar = _progress(len(indices), progress, f"diagnose {model_name}")
    bar.update(len(indices) - len(pending))
    try:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            t0 = time.perf_counter()
            items = [source.sample(i, num_frames) for i in chunk]
            t1 = time.perf_counter()
            caps = _forward(adapter, [it["frames"] for it in items], prompt, frame_mode, kinds, cap_layers)
            t2 = time.perf_counter()
            results = []
            for idx, item, (cap, b, layout) in zip(chunk, items, caps):
                tgt = source.targets(layout, item)
                results.append(analyse_sample(cap, b, layout, tgt, item, seq=idx, modes=per_mode, heads=heads,
                                              reverse=reverse, tau=tau))
            t3 = time.perf_counter()
            for idx, res in zip(chunk, results):
                _save_sequence(_seq_path(out_dir, idx), res, fp)
            t4 = time.perf_counter()
            for k, dt in zip(timing, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                timing[k] += dt
            bar.update(len(chunk))
            if on_sequence is not None:  # outside the timed stages
                for idx in chunk:
                    on_sequence(idx)
    finally:
        bar.close()

    report = aggregate(out_dir, source, indices, modes=modes, model_name=model_name, num_frames=num_frames,
                       frame_mode=fmode, pictures=pictures, extra_cfg=cfg)
    n_new = len(pending)
    atomic_write_text(run_json, json.dumps({
        "config": cfg, "fingerprint": fp, "status": "done", "num_sequences": len(indices),
        "computed_now": n_new, "resumed": len(indices) - n_new,
        "timing_s_per_sequence": {k: (v / n_new if n_new else None) for k, v in timing.items()},
        "timing_total_s": timing}, indent=2))
    return report


def aggregate(out_dir: str | Path, source: Any, indices: Sequence[int], *, modes: Sequence[str], model_name: str,
              num_frames: int, frame_mode: str, pictures: int = 2, extra_cfg: dict | None = None) -> dict[str, Any]:
    """Per-sequence files of ``indices`` -> reports, records, points, plots (all modes)."""
    from gasp_vlm.diagnose import plots as P

    out_dir = Path(out_dir)
    files = [_seq_path(out_dir, i) for i in indices]
    seqs = [load_sequence(f) for f in files]
    grid = seqs[0]["meta"]["grid_hw"]
    points = np.concatenate([s["points"] for s in seqs]).astype(POINTS_DTYPE, copy=False)
    max_f = max(len(s["meta"]["frame_ids"]) for s in seqs)
    frame_ids = np.full((len(seqs), max_f), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        frame_ids[i, :len(s["meta"]["frame_ids"])] = s["meta"]["frame_ids"]
    _atomic_savez(out_dir / "points.npz", points=points,
                  seq_ids=np.array([s["meta"]["seq"] for s in seqs], dtype=np.int64),
                  scenes=np.array([s["meta"]["scene"] for s in seqs], dtype=str), frame_ids=frame_ids,
                  anchor_frames=np.array([s["meta"]["anchor_frame"] for s in seqs], dtype=np.int64),
                  scene_meta=np.array([json.dumps(s["meta"].get("scene_meta", {})) for s in seqs], dtype=str))

    extra = {"frames": int(num_frames), "frame_mode": frame_mode, "grid_hw": grid,
             "source": (extra_cfg or {}).get("source"), "sequences": [int(i) for i in indices],
             "tau": (extra_cfg or {}).get("tau", M.DEFAULT_TAU)}
    reports: dict[str, dict] = {}
    all_records: dict[str, np.ndarray] = {}
    for mode in modes:
        fwd = M.concat_records([s["records"].get((mode, "fwd")) for s in seqs])
        if not len(fwd):
            raise DiagnoseError(f"mode {mode}: no GT-visible correspondences in {len(seqs)} sequences; "
                                "nothing to score")
        revs = [s["records"][(mode, "rev")] for s in seqs if (mode, "rev") in s["records"]]
        rev = M.concat_records(revs) if revs else None
        rep = M.build_report(fwd, model=model_name, mode=mode, reverse_records=rev, extra={
            **extra, "description": MODE_DESCRIPTIONS[mode],
            "layer_semantics": ("decoder layer l's own q/k (its input is the output of layer l-1)"
                                if mode.startswith("qk") else "output of decoder layer l")})
        mdir = out_dir / mode
        mdir.mkdir(exist_ok=True)
        meta = {"model": model_name, "mode": mode, "grid_hw": grid, "frames": num_frames}
        _atomic_save_records(mdir / "records.npz", fwd, {**meta, "direction": "forward"})
        if rev is not None:
            _atomic_save_records(mdir / "records_reverse.npz", rev, {**meta, "direction": "reverse"})
        atomic_write_text(mdir / "report.json", json.dumps(rep, indent=2, allow_nan=False))
        atomic_write_text(mdir / "report.md", report_markdown({mode: rep}))
        P.write_standard_plots(rep, mdir, fwd)
        reports[mode], all_records[mode] = rep, fwd

    primary = modes[0]
    top = dict(reports[primary])
    top["modes"] = {m: f"{m}/report.json" for m in modes}
    atomic_write_text(out_dir / "report.json", json.dumps(top, indent=2, allow_nan=False))
    atomic_write_text(out_dir / "report.md", report_markdown(reports) + "\n![PCK per layer](pck_per_layer.png)\n"
                       "![PCK vs gap](pck_vs_gap.png)\n![Reliability](reliability.png)\n")
    P.plot_pck_per_layer(list(reports.values()), out_dir / "pck_per_layer.png", labels=list(reports),
                         show_pck0=len(reports) <= 2, show_reverse=len(reports) == 1 and "reverse" in top)
    P.plot_pck_vs_gap(reports[primary], out_dir / "pck_vs_gap.png")
    rec = all_records[primary]
    peak = reports[primary]["peak"]["layer"]
    P.plot_reliability(rec, out_dir / "reliability.png",
                       layers=sorted({int(rec["layer"].min()), peak, int(rec["layer"].max())}))
    if pictures > 0:
        for old in out_dir.glob("correspondences_*.png"):  # pictures of an earlier run's sequences
            old.unlink()
        _write_pictures(out_dir, source, files, primary, peak, num_frames, pictures)
    return top


def join_points(records: np.ndarray, points: np.ndarray, key: str = "object_id") -> np.ndarray:
    """The points-table field ``key`` for every record (joined on seq, target, query).

    E.g. split PCK on camouflage scenes by the query's object:
    ``obj = join_points(rec, pts, "object_id"); metrics.pck(rec[obj == camo_id])``.
    Records without a point row get -1 (integer fields) or NaN (float fields).
    """
    def key_of(a: np.ndarray) -> np.ndarray:
        return ((a["seq"].astype(np.int64) << 40) | ((a["target"].astype(np.int64) & 0xFFFF) << 24)
                | (a["query"].astype(np.int64) & 0xFFFFFF))

    col = points[key]
    out = np.full(len(records), np.nan if col.dtype.kind == "f" else -1, dtype=col.dtype)
    if not len(points):
        return out
    pk = key_of(points)
    order = np.argsort(pk, kind="stable")
    spk = pk[order]
    rk = key_of(records)
    pos = np.clip(np.searchsorted(spk, rk), 0, len(spk) - 1)
    hit = spk[pos] == rk
    out[hit] = col[order][pos[hit]]
    return out
