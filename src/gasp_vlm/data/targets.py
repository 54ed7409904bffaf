"""Per-token GASP targets of one sequence for one model token layout.

The contract every geometry source returns (``source.targets(layout, item) -> TokenTargets``) and
the losses (method/losses.py) and diagnostics (diagnose/run.py) read. Shapes for one sample with
M anchor queries, T target frames, N = layout.num_visual visual tokens:

    anchor_frame       int      frame index of the anchor
    anchor_tokens      (M,)     long   global visual index of the token containing each query
    query_uv           (M, 2)   float  query pixel in the anchor frame (original-frame pixels)
    target_frames      (T,)     long   frame index of each target frame
    target_slots       (T,)     long   slot of each target frame (layout.slot_of_frame)
    target_tokens      (M, T)   long   global visual index of the GT token, -1 where invalid
    valid              (M, T)   bool   usable GT match (visible, inside the crop, pair rule)
    target_uv          (M, T, 2) float projected pixel in target frame t (original pixels; NaN = none)
    target_depth       (M, T)   float  projected camera z in frame t (<= 0: none)
    token_depth        (N,)     float  mean of the valid depth pixels in each token's rectangle
    token_depth_valid  (N,)     bool   at least half of the rectangle's pixels have valid depth

Pixels follow geometry/cameras.py (pixel centres at +0.5); "original pixels" are those of the frame
as the source returned it, before the model's resize/crop (``layout.transform`` maps them).

``build_token_targets(layout, depths, intrinsics, cam_from_worlds, anchor_frame, grid)`` builds them
from depth maps and cameras (coarse grid: one query per anchor token; fine: k x k per token), with
the visibility rule of geometry/tracks.py; see its docstring for the pair-mode rule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from gasp_vlm.geometry.cameras import invert_extrinsics, pixel_centers, transform, unproject
from gasp_vlm.geometry.tracks import project_to_frames, sample_depth_nearest, visible_in_frames

if TYPE_CHECKING:  # models/__init__ pulls in transformers; the layout is only needed for hints
    from gasp_vlm.models.layout import TokenLayout


@dataclass
class TokenTargets:
    anchor_frame: int
    anchor_tokens: torch.Tensor
    query_uv: torch.Tensor
    target_frames: torch.Tensor
    target_slots: torch.Tensor
    target_tokens: torch.Tensor
    valid: torch.Tensor
    target_uv: torch.Tensor
    target_depth: torch.Tensor
    token_depth: torch.Tensor
    token_depth_valid: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> "TokenTargets":
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                 for f in fields(self)}
        return TokenTargets(**moved)


# ---------------------------------------------------------------------------------------------
# Builder: depth + cameras of a sequence, and a model's TokenLayout -> TokenTargets
# ---------------------------------------------------------------------------------------------
GRIDS = ("coarse", "fine")


def query_points(layout: "TokenLayout", grid: str = "coarse", fine_per_token: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Anchor queries of a layout -> (uv (M, 2) float64 original pixels, token index in the slot (M,)).

    coarse: one query per token, at the centre of its input-frame rectangle (M = tokens_per_slot).
    fine:   k x k queries per token (k = ``fine_per_token``) at the centres of a k x k split of the
            rectangle, token-major then raster within the token (M = tokens_per_slot * k^2).
    Queries are placed in input-frame pixels and mapped back with ``layout.transform``, so they follow
    the model's resize/crop.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    k = 1 if grid == "coarse" else int(fine_per_token)
    if k < 1:
        raise ValueError(f"fine_per_token must be >= 1, got {fine_per_token}")
    boxes = layout.token_boxes_input()  # (S, 4) x0 y0 x1 y1
    sub = (np.arange(k) + 0.5) / k
    sy, sx = np.meshgrid(sub, sub, indexing="ij")
    offs = np.stack([sx.ravel(), sy.ravel()], -1) * layout.token_px  # (k*k, 2)
    uv_in = boxes[:, None, :2] + offs[None]  # (S, k*k, 2)
    tok = np.repeat(np.arange(layout.tokens_per_slot), k * k)
    return layout.transform.to_orig(uv_in.reshape(-1, 2)), tok


def pixel_token_map(layout: "TokenLayout", height: int, width: int) -> np.ndarray:
    """(H*W,) token index within a slot of every original-frame pixel (by its centre), -1 outside the crop."""
    idx, _ = layout.pixel_to_token(pixel_centers(height, width).reshape(-1, 2))
    return idx


def _axis_segments(layout: "TokenLayout", n_px: int, axis: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Pixels along one image axis -> token row/column ranges, for separable pooling.

    The model's transform is an axis-aligned resize + crop, so pixel (row, col) belongs to token
    (row_token[row], col_token[col]) and each token row/column is a contiguous run of pixels.
    Returns (lo, hi, starts, tokens): pixels [lo, hi) are inside the crop; the non-empty tokens
    ``tokens`` start at ``lo + starts``.
    """
    n_tok = layout.grid_hw[1 - axis]  # axis 0 = x (columns), 1 = y (rows)
    centres = np.zeros((n_px, 2))
    centres[:, axis] = np.arange(n_px) + 0.5
    tok = np.floor(layout.transform.to_input(centres)[:, axis] / layout.token_px).astype(np.int64)
    inside = np.flatnonzero((tok >= 0) & (tok < n_tok))
    if inside.size == 0:
        return 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(inside[0]), int(inside[-1]) + 1
    run = tok[lo:hi]  # non-decreasing: the transform is monotone
    tokens = np.unique(run)
    return lo, hi, np.searchsorted(run, tokens), tokens


def _segment_sums(x: np.ndarray, rows, cols, grid_hw: tuple[int, int]) -> np.ndarray:
    """Sum of a (H, W) map over every token rectangle -> (Hm, Wm) float64 (0 for empty tokens)."""
    r_lo, r_hi, r_st, r_tok = rows
    c_lo, c_hi, c_st, c_tok = cols
    out = np.zeros(grid_hw)
    if r_tok.size and c_tok.size:
        part = np.add.reduceat(x[r_lo:r_hi, c_lo:c_hi], c_st, axis=1, dtype=np.float64)
        out[np.ix_(r_tok, c_tok)] = np.add.reduceat(part, r_st, axis=0)
    return out


def pooled_token_depth(layout: "TokenLayout", slot_depths: Sequence[np.ndarray] | np.ndarray,
                       min_valid_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-token depth of G slots: G original-pixel z-depth maps (H, W) (0 = invalid) ->
    (depth (G*S,) float32, valid (G*S,) bool).

    A token's pixels are the original pixels whose centres fall in its rectangle (so resize/crop are
    respected); its depth is the mean of their valid (> 0) values, valid iff at least
    ``min_valid_fraction`` of them are valid. A token holding no pixel centre (upsampling by more than
    the token size) takes the pixel containing its centre. Separable sums (two ``reduceat`` passes),
    ~10 ms per 518^2 map instead of a per-pixel scatter.
    """
    g = len(slot_depths)
    h, w = np.shape(slot_depths[0])
    rows, cols = _axis_segments(layout, h, 1), _axis_segments(layout, w, 0)
    hm, wm = layout.grid_hw
    n_r, n_c = np.zeros(hm), np.zeros(wm)
    n_r[rows[3]] = np.diff(np.append(rows[2], rows[1] - rows[0]))
    n_c[cols[3]] = np.diff(np.append(cols[2], cols[1] - cols[0]))
    total = np.tile((n_r[:, None] * n_c[None, :]).ravel(), g)  # pixels per token
    sums = np.empty(g * hm * wm)
    n_ok = np.empty(g * hm * wm)
    for i in range(g):
        d = np.asarray(slot_depths[i])
        ok = d > 0
        sums[i * hm * wm:(i + 1) * hm * wm] = _segment_sums(np.where(ok, d, 0), rows, cols, (hm, wm)).ravel()
        n_ok[i * hm * wm:(i + 1) * hm * wm] = _segment_sums(ok, rows, cols, (hm, wm)).ravel()
    empty = total == 0
    if empty.any():  # nearest pixel at the token centre
        centres = layout.token_centers_orig()  # (S, 2)
        near = np.stack([sample_depth_nearest(np.asarray(d), centres) for d in slot_depths]).ravel().astype(np.float64)
        total = np.where(empty, 1.0, total)
        n_ok = np.where(empty, (near > 0).astype(np.float64), n_ok)
        sums = np.where(empty, near, sums)
    valid = (n_ok > 0) & (n_ok >= min_valid_fraction * total)
    depth = np.where(valid, sums / np.maximum(n_ok, 1.0), 0.0)
    return depth.astype(np.float32), valid


def snap_to_valid_depth(layout: "TokenLayout", depth: np.ndarray, q_uv: np.ndarray, q_tok: np.ndarray,
                        qd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Queries without anchor depth move to the nearest valid-depth pixel (its centre) when that pixel is
    inside the same token, so holey or sparse depth (SfM points only) still yields matches; the token a
    query belongs to never changes. Returns (uv, depth) with the moved queries updated."""
    bad = qd <= 0
    valid = depth > 0
    if not bad.any() or not valid.any():
        return q_uv, qd
    from scipy.ndimage import distance_transform_edt

    h, w = depth.shape
    _, (iy, ix) = distance_transform_edt(~valid, return_indices=True)
    col = np.clip(np.floor(q_uv[:, 0]).astype(np.int64), 0, w - 1)
    row = np.clip(np.floor(q_uv[:, 1]).astype(np.int64), 0, h - 1)
    ny, nx = iy[row, col], ix[row, col]
    new_uv = np.stack([nx + 0.5, ny + 0.5], axis=-1).astype(np.float64)
    tok, inside = layout.pixel_to_token(new_uv)
    move = bad & inside & (tok == q_tok)
    q_uv, qd = q_uv.copy(), qd.copy()
    q_uv[move], qd[move] = new_uv[move], depth[ny[move], nx[move]]
    return q_uv, qd


def build_token_targets(layout: "TokenLayout", depths: Sequence[np.ndarray] | np.ndarray, intrinsics: np.ndarray,
                        cam_from_worlds: np.ndarray, anchor_frame: int = 0, grid: str = "coarse",
                        fine_per_token: int = 2, rel_tol: float = 0.05,
                        min_valid_fraction: float = 0.5,
                        token_depth: tuple[np.ndarray, np.ndarray] | None = None,
                        snap_queries: bool = False) -> TokenTargets:
    """GASP targets of one sequence for a model ``layout`` (all inputs in original-frame pixels).

    depths: F maps (H, W) of the frames as given to the model (F = layout.num_frames, all the size
    ``layout.transform.orig_hw``); intrinsics (F, 3, 3); cam_from_worlds (F, 3, 4); cameras.py
    conventions.

    - Queries: ``query_points(layout, grid, fine_per_token)`` in the anchor frame; each takes the depth
      of the anchor pixel containing it (tracks.py rule). Queries are never dropped, so in the coarse
      grid query m is token m of the anchor slot; a query with no anchor depth has valid = False.
    - Target columns: one per slot other than the anchor's slot (target_slots), in slot order. The
      slot's *defining frame* is its first frame (slot_frames[g][0]); its projection gives target_uv,
      target_depth (camera z) and the target token (the token whose rectangle contains the projected
      point, ``layout.pixel_to_token``).
    - valid[m, t]: anchor depth > 0, the point is inside the model's crop in the defining frame, and it
      is visible (tracks.py rule, ``rel_tol``) in *every* frame of the slot -- for Qwen's pair mode
      (two frames merged per token) a match must be visible in both frames.
    - token_depth: ``pooled_token_depth`` of each slot's defining frame (the anchor frame for the
      anchor slot).
    - target_uv is NaN where there is no projection (anchor depth 0 or z <= 0); target_depth is 0
      where the anchor depth is 0 (z may be <= 0 behind the camera: "none" for the losses).

    ``token_depth``: a ``pooled_token_depth`` result (depth, valid) to reuse instead of pooling again
    (it depends only on the depth maps of the slots' defining frames, not on the queries).
    ``snap_queries``: ``snap_to_valid_depth`` before projecting (sparse / holey depth); ``query_uv``
    then holds the moved positions.
    """
    n_f = layout.num_frames
    intrinsics = np.asarray(intrinsics, dtype=np.float64).reshape(-1, 3, 3)
    cam_from_worlds = np.asarray(cam_from_worlds, dtype=np.float64).reshape(-1, 3, 4)
    if len(depths) != n_f or len(intrinsics) != n_f or len(cam_from_worlds) != n_f:
        raise ValueError(f"build_token_targets: layout has {n_f} frames but got {len(depths)} depths, "
                         f"{len(intrinsics)} intrinsics, {len(cam_from_worlds)} cameras")
    hw = tuple(layout.transform.orig_hw)
    for f in range(n_f):
        if tuple(np.shape(depths[f])) != hw:
            raise ValueError(f"build_token_targets: depth of frame {f} is {np.shape(depths[f])}, the model saw "
                             f"frames of {hw} (H, W)")
    if not 0 <= anchor_frame < n_f:
        raise ValueError(f"anchor_frame {anchor_frame} not in 0..{n_f - 1}")
    s = layout.tokens_per_slot
    a_slot = layout.slot_of_frame(anchor_frame)

    # Queries, their anchor depth, and their projection into every frame.
    q_uv, q_tok = query_points(layout, grid, fine_per_token)
    qd = sample_depth_nearest(np.asarray(depths[anchor_frame]), q_uv).astype(np.float64)
    if snap_queries:
        q_uv, qd = snap_to_valid_depth(layout, np.asarray(depths[anchor_frame]), q_uv, q_tok, qd)
    pts = transform(unproject(q_uv, qd, intrinsics[anchor_frame]), invert_extrinsics(cam_from_worlds[anchor_frame]))
    uv, z = project_to_frames(pts, intrinsics, cam_from_worlds)  # (F, M, 2), (F, M)
    vis = visible_in_frames(uv, z, depths, rel_tol) & (qd > 0)[None, :]  # (F, M)

    # One target column per non-anchor slot, defined by the slot's first frame.
    slots = [g for g in range(layout.num_slots) if g != a_slot]
    def_frames = [layout.slot_frames[g][0] for g in slots]
    m, n_t = len(q_uv), len(slots)
    if n_t:
        uv_t = uv[def_frames].transpose(1, 0, 2)  # (M, T, 2)
        z_t = z[def_frames].T  # (M, T)
        idx, inside = layout.pixel_to_token(uv_t)
        vis_all = np.stack([vis[list(set(layout.slot_frames[g]))].all(0) for g in slots], axis=1)  # (M, T)
        valid = inside & vis_all
        tt = np.where(valid, np.asarray(slots)[None, :] * s + idx, -1)
        has_proj = (qd > 0)[:, None] & (z_t > 0)
        target_uv = np.where(has_proj[..., None], uv_t, np.nan)
        target_depth = np.where((qd > 0)[:, None], z_t, 0.0)
    else:  # a single-slot layout has nothing to match
        valid = np.zeros((m, 0), bool)
        tt = np.zeros((m, 0), np.int64)
        target_uv = np.zeros((m, 0, 2))
        target_depth = np.zeros((m, 0))

    if token_depth is None:
        slot_def = [anchor_frame if g == a_slot else layout.slot_frames[g][0] for g in range(layout.num_slots)]
        token_depth = pooled_token_depth(layout, [depths[f] for f in slot_def], min_valid_fraction)
    tok_depth, tok_valid = token_depth

    return TokenTargets(
        anchor_frame=int(anchor_frame),
        anchor_tokens=torch.from_numpy(a_slot * s + q_tok).long(),
        query_uv=torch.from_numpy(q_uv.astype(np.float32)),
        target_frames=torch.tensor(def_frames, dtype=torch.long),
        target_slots=torch.tensor(slots, dtype=torch.long),
        target_tokens=torch.from_numpy(tt.astype(np.int64)),
        valid=torch.from_numpy(valid.astype(bool)),
        target_uv=torch.from_numpy(target_uv.astype(np.float32)),
        target_depth=torch.from_numpy(target_depth.astype(np.float32)),
        token_depth=torch.from_numpy(tok_depth),
        token_depth_valid=torch.from_numpy(tok_valid))


def merge_anchor_targets(per_anchor: Sequence[TokenTargets], num_slots: int) -> TokenTargets:
    """Stack the targets of several anchor frames of one sequence into one ``TokenTargets``.

    Every row keeps its own anchor token; the target columns become *all* slots (in slot order), and a
    row's columns for its own anchor slot are invalid. The losses only read anchor_tokens, target_*,
    valid, target_slots and token_depth, so the merged object trains exactly like the separate ones
    summed per anchor row (InfoNCE and depth are means over valid pairs). ``anchor_frame`` is the first
    one's, ``query_uv`` stays per row (each in its own anchor frame): for training, not diagnostics.
    """
    if not per_anchor:
        raise ValueError("merge_anchor_targets: nothing to merge")
    rows = {k: [] for k in ("anchor_tokens", "query_uv", "target_tokens", "valid", "target_uv", "target_depth")}
    frames = torch.full((num_slots,), -1, dtype=torch.long)
    for t in per_anchor:
        m = t.anchor_tokens.shape[0]
        cols = t.target_slots.long()  # (T,) slot of each of this anchor's columns
        tt = torch.full((m, num_slots), -1, dtype=torch.long)
        valid = torch.zeros((m, num_slots), dtype=torch.bool)
        uv = torch.full((m, num_slots, 2), float("nan"))
        depth = torch.zeros((m, num_slots))
        tt[:, cols], valid[:, cols] = t.target_tokens, t.valid
        uv[:, cols], depth[:, cols] = t.target_uv, t.target_depth
        frames[cols] = t.target_frames.long()
        for k, v in (("anchor_tokens", t.anchor_tokens), ("query_uv", t.query_uv), ("target_tokens", tt),
                     ("valid", valid), ("target_uv", uv), ("target_depth", depth)):
            rows[k].append(v)
    first = per_anchor[0]
    # Token depth: the first part's (its slots' defining frames; see build_multi_anchor_targets).
    return TokenTargets(anchor_frame=first.anchor_frame, target_frames=frames,
                        target_slots=torch.arange(num_slots, dtype=torch.long),
                        token_depth=first.token_depth, token_depth_valid=first.token_depth_valid,
                        **{k: torch.cat(v) for k, v in rows.items()})


def build_multi_anchor_targets(layout: "TokenLayout", depths: Sequence[np.ndarray] | np.ndarray,
                               intrinsics: np.ndarray, cam_from_worlds: np.ndarray,
                               anchor_frames: Sequence[int], **kw) -> TokenTargets:
    """``build_token_targets`` for each of ``anchor_frames`` (one per slot at most), merged.

    The per-token depth is pooled once, by the first anchor's call, and reused by the others' (the merge
    keeps the first's): it depends only on the depth maps of the slots' defining frames.
    """
    slots_seen: set[int] = set()
    parts: list[TokenTargets] = []
    for a in anchor_frames:
        slot = layout.slot_of_frame(int(a))
        if slot in slots_seen:  # Qwen pair mode: the slot partner would only repeat the same tokens
            continue
        slots_seen.add(slot)
        pooled = (parts[0].token_depth.numpy(), parts[0].token_depth_valid.numpy()) if parts else None
        parts.append(build_token_targets(layout, depths, intrinsics, cam_from_worlds, anchor_frame=int(a),
                                         token_depth=pooled, **kw))
    return merge_anchor_targets(parts, layout.num_slots)
