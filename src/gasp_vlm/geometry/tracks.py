"""Ground-truth correspondences from depth and cameras (pure numpy, convention of cameras.py).

A query point of the anchor frame takes the depth of the pixel that contains it (dropped if 0), is
un-projected, and projected into every target frame. Visibility rule (exact; the one every part of
gasp-vlm uses):

    visible in frame t  <=>  z > 0,  0 <= u < W,  0 <= v < H,  and at least one of the up-to-4 pixels
    whose centres surround (u, v) -- columns floor(u - 0.5) and +1, rows floor(v - 0.5) and +1,
    clipped to the image -- has valid depth d > 0 with |z - d| <= rel_tol * d   (rel_tol = 0.05).

The relative tolerance does not depend on the scene scale (COLMAP-scale depth works as metric depth).
Everything is vectorised over (frames, points); frames of different sizes are allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gasp_vlm.geometry.cameras import invert_extrinsics, transform, unproject

DEFAULT_REL_TOL = 0.05

DepthStack = Sequence[np.ndarray] | np.ndarray  # T depth maps (H_t, W_t), or one (T, H, W) array


def grid_points(height: int, width: int, stride: float) -> np.ndarray:
    """(P, 2) float64 query uv on a regular grid: centres ((i + 0.5) * stride, (j + 0.5) * stride),
    row-major (j rows outer, i columns inner), only centres inside the image."""
    if not stride > 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    xs = (np.arange(int(np.ceil(width / stride))) + 0.5) * stride
    ys = (np.arange(int(np.ceil(height / stride))) + 0.5) * stride
    xs, ys = xs[xs < width], ys[ys < height]
    vv, uu = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([uu.ravel(), vv.ravel()], axis=-1)


def sample_depth_nearest(depth: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Depth (H, W) of the pixel that contains each uv (..., 2) (pixel floor(u), floor(v)); 0 outside."""
    h, w = depth.shape
    u, v = uv[..., 0], uv[..., 1]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)  # NaN compares False
    col = np.floor(np.where(inside, u, 0)).astype(np.int64)  # no int overflow for huge/NaN uv
    row = np.floor(np.where(inside, v, 0)).astype(np.int64)
    return np.where(inside, depth[row, col], 0).astype(depth.dtype, copy=False)


def project_to_frames(points_world: np.ndarray, intrinsics: np.ndarray,
                      cam_from_worlds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (P, 3) into T cameras: K (T, 3, 3), cam_from_world (T, 3, 4) -> uv (T, P, 2), z (T, P).

    uv is meaningless where z <= 0 (finite: the division uses a clamped z)."""
    rot = cam_from_worlds[:, :, :3]
    t = cam_from_worlds[:, :, 3]
    cam = np.matmul(points_world[None], rot.transpose(0, 2, 1)) + t[:, None, :]  # (T, P, 3); einsum is 30x slower
    z = cam[..., 2]
    safe_z = np.where(np.abs(z) > 1e-12, z, 1e-12)
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None]
    uv = np.stack([fx * cam[..., 0] / safe_z + cx, fy * cam[..., 1] / safe_z + cy], axis=-1)
    return uv, z


def _surrounding_pixels(uv: np.ndarray, z: np.ndarray, h: np.ndarray, w: np.ndarray):
    """In-image test and the (2, 2, ...) rows/cols of the up-to-4 pixels around uv (clipped)."""
    u, v = uv[..., 0], uv[..., 1]
    ok = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)  # NaN compares False
    # Park rejected points at a safe spot before floor/int so huge values (z ~ 0) cannot overflow.
    u = np.where(ok, u, 0.5)
    v = np.where(ok, v, 0.5)
    c0 = np.floor(u - 0.5).astype(np.int64)
    r0 = np.floor(v - 0.5).astype(np.int64)
    cols = np.clip(np.stack([c0, c0 + 1]), 0, w - 1)  # (2, ...)
    rows = np.clip(np.stack([r0, r0 + 1]), 0, h - 1)  # (2, ...)
    return ok, rows[:, None], cols[None, :]  # broadcast to (2, 2, ...)


def visible_mask(uv: np.ndarray, z: np.ndarray, depth: np.ndarray, rel_tol: float = DEFAULT_REL_TOL) -> np.ndarray:
    """The visibility rule (module docstring) for points uv (..., 2) with projected z (...) in one
    frame's depth (H, W) -> (...) bool."""
    h, w = depth.shape
    ok, rows, cols = _surrounding_pixels(uv, z, np.int64(h), np.int64(w))
    d = np.ascontiguousarray(depth).ravel().take(rows * w + cols)  # (2, 2, ...)
    match = (d > 0) & (np.abs(z - d) <= rel_tol * d)
    return ok & match.any(axis=(0, 1))


def visible_in_frames(uv: np.ndarray, z: np.ndarray, depths: DepthStack,
                      rel_tol: float = DEFAULT_REL_TOL) -> np.ndarray:
    """uv (T, P, 2), z (T, P), T depth maps -> visible (T, P) bool (the rule, vectorised over T and P).

    A (T, H, W) array is gathered in one indexing op; a list of maps (any sizes) is gathered per frame
    without stacking (stacking 24 maps of 518^2 would copy 26 MB for 4 lookups per point).
    """
    n_t = z.shape[0]
    if isinstance(depths, np.ndarray) and depths.ndim == 3:
        hw = np.broadcast_to(np.array(depths.shape[1:], np.int64), (n_t, 2))
    else:
        hw = np.array([np.shape(d) for d in depths], np.int64).reshape(n_t, 2)
    ok, rows, cols = _surrounding_pixels(uv, z, hw[:, 0, None], hw[:, 1, None])  # rows/cols (2, 2, T, P)
    flat = rows * hw[:, 1, None] + cols  # (2, 2, T, P) index into each flattened map
    # ravel().take on flat indices is ~10x faster than 2-D fancy indexing into large maps.
    if isinstance(depths, np.ndarray) and depths.ndim == 3:
        d = np.ascontiguousarray(depths).ravel().take(flat + (np.arange(n_t) * hw[0, 0] * hw[0, 1])[:, None])
    else:
        d = np.stack([np.ascontiguousarray(depths[t]).ravel().take(flat[:, :, t]) for t in range(n_t)], axis=2)
    match = (d > 0) & (np.abs(z - d) <= rel_tol * d)
    return ok & match.any(axis=(0, 1))


@dataclass
class Correspondences:
    """Anchor queries (P) followed into T frames."""

    query_depth: np.ndarray  # (P,) anchor depth of the pixel containing each query (0 = invalid)
    points_world: np.ndarray  # (P, 3) un-projected queries (meaningless where query_depth == 0)
    uv: np.ndarray  # (T, P, 2) projected uv in each frame
    z: np.ndarray  # (T, P) projected camera z
    visible: np.ndarray  # (T, P) bool: the visibility rule and query_depth > 0


def correspond(query_uv: np.ndarray, anchor_depth: np.ndarray, anchor_K: np.ndarray,
               anchor_cam_from_world: np.ndarray, depths: DepthStack, intrinsics: np.ndarray,
               cam_from_worlds: np.ndarray, rel_tol: float = DEFAULT_REL_TOL) -> Correspondences:
    """Follow anchor queries uv (P, 2) into T frames (depths, K (T, 3, 3), cam_from_world (T, 3, 4))."""
    query_uv = np.asarray(query_uv, dtype=np.float64)
    qd = sample_depth_nearest(np.asarray(anchor_depth), query_uv).astype(np.float64)
    pts = transform(unproject(query_uv, qd, np.asarray(anchor_K, np.float64)),
                    invert_extrinsics(np.asarray(anchor_cam_from_world, np.float64)))
    uv, z = project_to_frames(pts, np.asarray(intrinsics, np.float64), np.asarray(cam_from_worlds, np.float64))
    vis = visible_in_frames(uv, z, depths, rel_tol) & (qd > 0)[None, :]
    return Correspondences(qd, pts, uv, z, vis)


@dataclass
class Tracks:
    """Ground-truth tracks of anchor grid queries (the `gasp data tracks` npz)."""

    query_uv: np.ndarray  # (P, 2) float32 anchor uv (queries with invalid anchor depth dropped)
    frames: np.ndarray  # (T,) int64 target frame indices in the scene
    uv: np.ndarray  # (T, P, 2) float32 projected uv
    visible: np.ndarray  # (T, P) bool
    depth: np.ndarray  # (T, P) float32 projected camera z

    def save_npz(self, path: str | os.PathLike) -> None:
        np.savez(path, query_uv=self.query_uv, frames=self.frames, uv=self.uv,
                 visible=self.visible, depth=self.depth)

    @classmethod
    def load_npz(cls, path: str | os.PathLike) -> "Tracks":
        with np.load(path) as f:
            return cls(f["query_uv"], f["frames"], f["uv"], f["visible"], f["depth"])


def build_tracks(anchor_depth: np.ndarray, anchor_K: np.ndarray, anchor_cam_from_world: np.ndarray,
                 depths: DepthStack, intrinsics: np.ndarray, cam_from_worlds: np.ndarray,
                 frames: Sequence[int], stride: float, rel_tol: float = DEFAULT_REL_TOL) -> Tracks:
    """Grid queries (stride px) of the anchor followed into T target frames; queries with 0 depth dropped.

    ``depths``/``intrinsics``/``cam_from_worlds`` are those of the T target frames, ``frames`` their
    indices in the scene (stored in the npz only)."""
    anchor_depth = np.asarray(anchor_depth)
    h, w = anchor_depth.shape
    q = grid_points(h, w, stride)
    q = q[sample_depth_nearest(anchor_depth, q) > 0]
    c = correspond(q, anchor_depth, anchor_K, anchor_cam_from_world, depths, intrinsics, cam_from_worlds, rel_tol)
    return Tracks(q.astype(np.float32), np.asarray(frames, dtype=np.int64).reshape(-1), c.uv.astype(np.float32),
                  c.visible, c.z.astype(np.float32))


def scene_tracks(scene, anchor: int, targets: Sequence[int], stride: float,
                 rel_tol: float = DEFAULT_REL_TOL) -> Tracks:
    """Tracks of a canonical ``Scene`` (data/scene.py): anchor frame index -> target frame indices."""
    n = scene.num_frames
    bad = [i for i in [anchor, *targets] if not 0 <= int(i) < n]
    if bad:
        raise IndexError(f"{scene.path}: frame index {bad[0]} out of range (scene has {n} frames)")
    targets = [int(t) for t in targets]
    return build_tracks(scene.depth(anchor), scene.intrinsics[anchor], scene.cam_from_worlds[anchor],
                        [scene.depth(t) for t in targets], scene.intrinsics[targets],
                        scene.cam_from_worlds[targets], targets, stride, rel_tol)
