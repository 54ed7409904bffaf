"""DL3DV-10K (nerfstudio ``transforms.json``) -> canonical scene (data/scene.py).

Input: a scene folder holding ``transforms.json`` (shared ``w, h, fl_x, fl_y, cx, cy`` and distortion
``k1, k2, (k3, k4), p1, p2``, optionally overridden per frame; ``frames[].file_path`` and
``frames[].transform_matrix``, a 4x4 camera-to-world in OpenGL camera axes: x right, y up, z back).

- Poses: cam_from_world = inverse(c2w with its y and z camera axes flipped). The world frame is the
  json's (nerfstudio's, i.e. COLMAP's after ``applied_transform``); depth is per camera, so any
  consistent world frame works.
- Intrinsics: rescaled from the json's w/h to the size of the image actually read (the 960P release
  ships ``images_4/`` while ``file_path`` says ``images/``). Aspect changes are refused.
- Distortion: DL3DV uses an OPENCV camera with distortion. Coefficients with |c| > ``distortion_tol``
  are refused unless ``allow_distortion=True`` (then ignored, as depthsplat does; undistort first,
  e.g. with COLMAP's image_undistorter, for exact geometry). Fisheye/equirectangular models are refused.
- Depth: DL3DV ships none; the user supplies a folder (``depth``) with one file per image:
  ``<stem>.npy``, 16-bit ``<stem>.png`` (value / ``depth_scale``) or COLMAP ``<name>.geometric.bin``.
  Depth must be in the scale of the poses. If its size differs from the image's, the image is resized
  to the depth size (K scaled) -- depth is never resampled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gasp_vlm.data.convert.common import (ConvertError, check_rotation, find_depth_file, fit_image_to_depth,
                                          image_hw, read_json, read_user_depth)
from gasp_vlm.data.scene import SceneWriter
from gasp_vlm.geometry.cameras import cam_from_world_from_c2w, opengl_to_opencv_c2w

DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL", "SIMPLE_RADIAL")
IMAGE_DIR_FALLBACKS = ("images_4", "images_8", "images_2", "images")


def _resolve_image(src: Path, file_path: str, images_dir: str | None) -> Path:
    name = Path(file_path).name
    if images_dir is not None:
        p = src / images_dir / name
        if not p.is_file():
            raise ConvertError(f"{p}: missing image (frame {file_path!r} of transforms.json)")
        return p
    if (src / file_path).is_file():
        return src / file_path
    for d in IMAGE_DIR_FALLBACKS:
        if (src / d / name).is_file():
            return src / d / name
    raise ConvertError(f"{src / file_path}: missing image (also looked in {', '.join(IMAGE_DIR_FALLBACKS)})")


def dl3dv_camera(meta: dict, frame: dict, image_hw_: tuple[int, int], where: str,
                 allow_distortion: bool = False, distortion_tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """One transforms.json frame (+ shared ``meta``) -> (K (3, 3) for an image of ``image_hw_``,
    cam_from_world (3, 4) OpenCV)."""
    def get(key: str, default=None):
        v = frame.get(key, meta.get(key, default))
        if v is None:
            raise ConvertError(f"{where}: missing intrinsics key {key!r}")
        return float(v)

    model = str(frame.get("camera_model", meta.get("camera_model", "OPENCV"))).upper()
    if model not in PINHOLE_MODELS:
        raise ConvertError(f"{where}: camera_model {model!r} is not a pinhole model; undistort the images first")
    dist = {k: float(frame.get(k, meta.get(k, 0.0)) or 0.0) for k in DISTORTION_KEYS}
    big = {k: v for k, v in dist.items() if abs(v) > distortion_tol}
    if big and not allow_distortion:
        raise ConvertError(f"{where}: non-zero lens distortion {big} (tolerance {distortion_tol}); undistort the "
                           f"images (and depth) first, or pass allow_distortion=True to ignore it")
    w, h = get("w"), get("h")
    fx, fy, cx, cy = get("fl_x"), get("fl_y", get("fl_x")), get("cx", w / 2), get("cy", h / 2)
    ih, iw = image_hw_
    sx, sy = iw / w, ih / h
    if abs(sx / sy - 1.0) > 0.01:
        raise ConvertError(f"{where}: image is {iw}x{ih} but transforms.json says {w:g}x{h:g} (aspect differs)")
    K = np.array([[fx * sx, 0.0, cx * sx], [0.0, fy * sy, cy * sy], [0.0, 0.0, 1.0]])
    try:
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"{where}: missing or malformed transform_matrix") from None
    if c2w.shape not in ((4, 4), (3, 4)):
        raise ConvertError(f"{where}: transform_matrix has shape {c2w.shape}, expected 4x4")
    check_rotation(c2w[:3, :3], where)
    return K, cam_from_world_from_c2w(opengl_to_opencv_c2w(c2w))


def convert_dl3dv(src: Path, out: Path, depth: Path | None = None, *, depth_scale: float = 1000.0,
                  images_dir: str | None = None, allow_distortion: bool = False, distortion_tol: float = 1e-3,
                  overwrite: bool = False, **_: object) -> Path:
    """DL3DV scene folder (or its transforms.json) -> canonical scene at ``out`` (written atomically)."""
    src = Path(src)
    tf_path = src if src.suffix == ".json" else src / "transforms.json"
    src = tf_path.parent
    if depth is None:
        raise ConvertError(f"{src}: DL3DV ships no depth maps; pass a depth folder (npy, 16-bit png or COLMAP "
                           f".geometric.bin, one per image)")
    depth = Path(depth)
    if not depth.is_dir():
        raise ConvertError(f"{depth}: depth folder not found")
    meta = read_json(tf_path)
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not frames:
        raise ConvertError(f"{tf_path}: no 'frames' list")
    with SceneWriter(out, source="dl3dv", depth_units="scene (poses' scale)", overwrite=overwrite,
                     extra={"converted_from": str(src), "world": "nerfstudio transforms.json"}) as w:
        for i, fr in enumerate(frames):
            fp = fr.get("file_path") if isinstance(fr, dict) else None
            if not fp:
                raise ConvertError(f"{tf_path}: frame {i} has no file_path")
            where = f"{tf_path} (frame {i}, {fp})"
            img = _resolve_image(src, fp, images_dir)
            K, cfw = dl3dv_camera(meta, fr, image_hw(img), where, allow_distortion, distortion_tol)
            dfile = find_depth_file(depth, img.name)
            d = read_user_depth(dfile, depth_scale)
            image, K = fit_image_to_depth(img, K, d.shape)
            w.add_frame(img.name, image, d, K, cfw)
    return Path(out)
