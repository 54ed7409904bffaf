"""COLMAP models through pycolmap: reading, undistortion to a pinhole camera, sparse-point depth.

Conventions (COLMAP's, which are the project's): ``cam_from_world`` maps world to an OpenCV camera
(x right, y down, z forward); pixel centres at +0.5. Undistortion follows COLMAP's own
``image_undistorter`` (``pycolmap.undistort_camera`` / ``undistort_image``), so a camera undistorted
here is the camera COLMAP's dense workspace (``dense/sparse``, ``stereo/depth_maps``) was made for.

pycolmap is an optional dependency (``pip install gasp-vlm[data]``); it is imported on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gasp_vlm.data.convert.common import ConvertError, check_rotation

# Spherical projections have no pinhole equivalent; everything else COLMAP can undistort.
NOT_UNDISTORTABLE = ("EQUIRECTANGULAR",)
PINHOLE = ("PINHOLE", "SIMPLE_PINHOLE")


def pycolmap_module() -> Any:
    try:
        import pycolmap
    except ImportError:
        raise ConvertError("reading COLMAP models needs pycolmap: pip install 'gasp-vlm[data]' "
                           "(or pip install pycolmap)") from None
    return pycolmap


def read_model(path: Path) -> Any:
    """A COLMAP sparse model folder (cameras/images/points3D as .bin or .txt) -> pycolmap.Reconstruction."""
    pycolmap = pycolmap_module()
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path}: COLMAP model folder not found")
    have = {p.name for p in path.iterdir()}
    for stem in ("cameras", "images"):
        if f"{stem}.bin" not in have and f"{stem}.txt" not in have:
            raise ConvertError(f"{path}: not a COLMAP model (no {stem}.bin or {stem}.txt)")
    try:
        rec = pycolmap.Reconstruction(str(path))
    except (ValueError, RuntimeError) as e:
        raise ConvertError(f"{path}: unreadable COLMAP model ({e})") from None
    if rec.num_images() == 0:
        raise ConvertError(f"{path}: COLMAP model has no images")
    return rec


def find_model(candidates: list[Path]) -> Path | None:
    """First folder in ``candidates`` that holds a COLMAP model (cameras.bin or cameras.txt)."""
    for c in candidates:
        if (c / "cameras.bin").is_file() or (c / "cameras.txt").is_file():
            return c
    return None


def cam_from_world(image: Any, where: str | None = None) -> np.ndarray:
    """(3, 4) float64 cam_from_world of a registered pycolmap image, checked to be a finite rotation."""
    pose = image.cam_from_world
    pose = pose() if callable(pose) else pose  # a method since pycolmap 3.12
    cfw = np.asarray(pose.matrix(), dtype=np.float64)
    check_rotation(cfw[:, :3], where or f"COLMAP image {image.name}")
    return cfw


def images_by_name(rec: Any) -> dict[str, Any]:
    """Registered images keyed by their file name (COLMAP names may carry sub-folders)."""
    out: dict[str, Any] = {}
    for img in rec.images.values():
        if img.has_pose:
            out[Path(img.name).name] = img
    return out


def camera_at_size(camera: Any, hw: tuple[int, int], where: str, aspect_tol: float = 0.01) -> Any:
    """A copy of ``camera`` rescaled to an image of (H, W) (releases ship downsampled images)."""
    pycolmap = pycolmap_module()
    h, w = hw
    cam = pycolmap.Camera(camera.todict()) if hasattr(camera, "todict") else camera
    if (cam.height, cam.width) == (h, w):
        return cam
    sx, sy = w / cam.width, h / cam.height
    if abs(sx / sy - 1.0) > aspect_tol:
        raise ConvertError(f"{where}: image is {w}x{h} but the COLMAP camera is {cam.width}x{cam.height} "
                           f"(aspect differs: a crop, not a resize?)")
    cam.rescale(w, h)
    return cam


def is_distorted(camera: Any, tol: float = 1e-6) -> bool:
    if camera.model.name in PINHOLE:
        return False
    extra = np.asarray(camera.params)[list(camera.extra_params_idxs())] if camera.extra_params_idxs() else []
    return bool(np.any(np.abs(extra) > tol))


def pinhole_K(camera: Any) -> np.ndarray:
    return np.asarray(camera.calibration_matrix(), dtype=np.float64)


def _check_undistortable(camera: Any, where: str) -> None:
    if camera.model.name in NOT_UNDISTORTABLE:
        raise ConvertError(f"{where}: COLMAP camera model {camera.model.name} cannot be undistorted to a pinhole "
                           "camera")


def undistorted_camera(camera: Any, where: str) -> Any:
    """The pinhole camera COLMAP's undistorter makes of ``camera`` (itself if already undistorted)."""
    pycolmap = pycolmap_module()
    _check_undistortable(camera, where)
    if not is_distorted(camera):
        return camera
    return pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), camera)


def undistort_rgb(rgb: np.ndarray, camera: Any, where: str) -> tuple[np.ndarray, Any]:
    """(H, W, 3) uint8 in ``camera`` -> (undistorted image, its pinhole camera), as COLMAP warps it."""
    pycolmap = pycolmap_module()
    _check_undistortable(camera, where)
    if not is_distorted(camera):
        return rgb, camera
    bitmap = pycolmap.Bitmap.from_array(np.ascontiguousarray(rgb, dtype=np.uint8))
    out, cam = pycolmap.undistort_image(pycolmap.UndistortCameraOptions(), bitmap, camera)
    return np.ascontiguousarray(out.to_array(), dtype=np.uint8), cam


def sparse_depth(rec: Any, image: Any, K: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Depth only where the image observes a triangulated 3D point (the nearest one per pixel), 0
    elsewhere: the fallback when no dense depth exists. Points are projected with the pinhole ``K``
    of the (undistorted) image of size ``hw``, so they land where the undistorted image shows them."""
    h, w = hw
    ids = [p.point3D_id for p in image.points2D if p.has_point3D()]
    depth = np.zeros((h, w), dtype=np.float32)
    if not ids:
        return depth
    X = np.stack([rec.points3D[i].xyz for i in ids])                       # (P, 3) world
    P = cam_from_world(image)
    Xc = X @ P[:, :3].T + P[:, 3]                                          # (P, 3) camera
    z = Xc[:, 2]
    ok = z > 1e-9
    uv = (Xc[ok] @ np.asarray(K).T)[:, :2] / z[ok, None]
    col, row, z = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int), z[ok]
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    col, row, z = col[inside], row[inside], z[inside]
    order = np.argsort(-z)  # write far first so the nearest point of a pixel wins
    depth[row[order], col[order]] = z[order]
    return depth
