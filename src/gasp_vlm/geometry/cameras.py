"""Pinhole cameras: the one convention every part of gasp-vlm uses.

Convention (as VGGT / DUSt3R):
- OpenCV camera axes: x right, y down, z forward.
- Extrinsics are ``cam_from_world`` (3, 4): X_cam = R @ X_world + t.
- Intrinsics K (3, 3) in pixels, zero skew. Pixel (col, row) covers [col, col+1) x [row, row+1)
  and has its centre at (col + 0.5, row + 0.5); ``uv`` = (u, v) = (x, y) continuous pixel coords.
- Depth is z-depth along the optical axis (not ray length); 0 marks invalid.

Pure numpy functions; arrays may carry leading batch dimensions where stated.
"""

from __future__ import annotations

import numpy as np


def pixel_centers(height: int, width: int) -> np.ndarray:
    """(H, W, 2) float64 uv of every pixel centre."""
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return np.stack([u, v], axis=-1)


def invert_extrinsics(cam_from_world: np.ndarray) -> np.ndarray:
    """(..., 3, 4) cam_from_world -> (..., 3, 4) world_from_cam (closed form for rigid transforms)."""
    rot = cam_from_world[..., :3, :3]
    t = cam_from_world[..., :3, 3:]
    rot_t = np.swapaxes(rot, -1, -2)
    return np.concatenate([rot_t, -rot_t @ t], axis=-1)


def unproject(uv: np.ndarray, depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels (..., 2) with z-depth (...) -> camera-frame points (..., 3)."""
    x = (uv[..., 0] - K[0, 2]) / K[0, 0] * depth
    y = (uv[..., 1] - K[1, 2]) / K[1, 1] * depth
    return np.stack([x, y, depth], axis=-1)


def project(points_cam: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (..., 3) -> (uv (..., 2), z (...)). uv is meaningless where z <= 0."""
    z = points_cam[..., 2]
    safe_z = np.where(np.abs(z) > 1e-12, z, 1e-12)
    u = K[0, 0] * points_cam[..., 0] / safe_z + K[0, 2]
    v = K[1, 1] * points_cam[..., 1] / safe_z + K[1, 2]
    return np.stack([u, v], axis=-1), z


def transform(points: np.ndarray, rigid_3x4: np.ndarray) -> np.ndarray:
    """Apply a (3, 4) rigid transform to points (..., 3)."""
    return points @ rigid_3x4[:3, :3].T + rigid_3x4[:3, 3]


def cam_to_world(points_cam: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    return transform(points_cam, invert_extrinsics(cam_from_world))


def world_to_cam(points_world: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    return transform(points_world, cam_from_world)


def depth_to_world(depth: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray) -> np.ndarray:
    """(H, W) z-depth -> (H, W, 3) world points of every pixel centre (invalid depth gives the camera centre)."""
    h, w = depth.shape
    return cam_to_world(unproject(pixel_centers(h, w), depth, K), cam_from_world)


def is_rotation(mat: np.ndarray, atol: float = 1e-4) -> bool:
    """True iff ``mat`` (3, 3) is a proper rotation (orthonormal, det +1)."""
    mat = np.asarray(mat, dtype=np.float64)
    return bool(np.allclose(mat @ mat.T, np.eye(3), atol=atol) and abs(np.linalg.det(mat) - 1.0) < atol)


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, -1.0, 0.0])) -> np.ndarray:
    """cam_from_world (3, 4) of a camera at ``eye`` looking at ``target``; ``up`` is world up
    (default -y, so that with OpenCV axes image rows grow downwards along world +y)."""
    eye = np.asarray(eye, dtype=np.float64)
    z = np.asarray(target, dtype=np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(-np.asarray(up, dtype=np.float64), z)  # right = down x forward
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    rot = np.stack([x, y, z], axis=0)  # rows: camera axes in world coordinates
    return np.concatenate([rot, (-rot @ eye)[:, None]], axis=1)


def project_world(points_world: np.ndarray, K: np.ndarray, cam_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> (uv (..., 2), z (...)) in the camera ``cam_from_world`` (3, 4) with K (3, 3)."""
    return project(world_to_cam(points_world, cam_from_world), K)


def to_homogeneous(rigid_3x4: np.ndarray) -> np.ndarray:
    """(..., 3, 4) -> (..., 4, 4) with the last row [0, 0, 0, 1]."""
    rigid_3x4 = np.asarray(rigid_3x4, dtype=np.float64)
    bottom = np.zeros(rigid_3x4.shape[:-2] + (1, 4))
    bottom[..., 0, 3] = 1.0
    return np.concatenate([rigid_3x4, bottom], axis=-2)


def cam_from_world_from_c2w(cam_to_world: np.ndarray) -> np.ndarray:
    """(..., 3|4, 4) camera-to-world (OpenCV axes) -> (..., 3, 4) cam_from_world."""
    return invert_extrinsics(np.asarray(cam_to_world, dtype=np.float64)[..., :3, :4])


def opengl_to_opencv_c2w(c2w_gl: np.ndarray) -> np.ndarray:
    """(..., 3|4, 4) camera-to-world with OpenGL camera axes (x right, y up, z back) -> OpenCV axes.

    Only the camera axes change (flip y and z columns of the rotation); the world frame is kept.
    """
    c2w = np.array(c2w_gl, dtype=np.float64)
    c2w[..., :3, 1:3] *= -1.0
    return c2w


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """K (..., 3, 3) of an image resized by (sx, sy). Exact with pixel centres at +0.5 (edges scale)."""
    K = np.array(K, dtype=np.float64)
    K[..., 0, :] *= sx
    K[..., 1, :] *= sy
    return K


def rotation_angle(rot_a: np.ndarray, rot_b: np.ndarray) -> float:
    """Geodesic angle (radians) between two rotations (3, 3)."""
    rel = np.asarray(rot_a, dtype=np.float64) @ np.asarray(rot_b, dtype=np.float64).T
    return float(np.arccos(np.clip((np.trace(rel) - 1.0) / 2.0, -1.0, 1.0)))


def camera_center(cam_from_world: np.ndarray) -> np.ndarray:
    """(..., 3, 4) -> (..., 3) camera centre in world coordinates."""
    return invert_extrinsics(cam_from_world)[..., :3, 3]
