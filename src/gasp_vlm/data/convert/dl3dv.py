"""DL3DV-10K -> canonical scenes, from its COLMAP model (preferred) or nerfstudio ``transforms.json``.

Input: a scene folder ``<batch>/<hash>/`` or a root of such folders (``--workers`` / ``--shard``).

**COLMAP path** (used when a model is found: ``colmap`` option, ``colmap/sparse/0``, ``sparse/0`` or
``nerfstudio/colmap/sparse/0``; cameras/images/points3D in .bin or .txt, read with pycolmap).
The model's camera is rescaled to the images actually shipped (``images_4/`` in the 960P release) and
the images are undistorted to a pinhole camera exactly as COLMAP's image_undistorter does. Depth, in
order of preference (``depth_source="auto"``; or name one):
  1. ``dense``: a COLMAP dense workspace (``dense`` option, or ``<scene>/dense``, ``<scene>/colmap/dense``)
     = ``images/`` + ``sparse/`` (undistorted PINHOLE model) + ``stereo/depth_maps/<name>.geometric.bin``;
     its images, cameras and depth are used as they are (they belong together).
  2. ``user``: a ``depth`` folder with one file per image (npy / 16-bit png / .geometric.bin), made for
     the **undistorted** images (a different size with the same aspect resizes the image, K scaled).
  3. ``sparse``: depth only at the pixels where the image observes a triangulated 3D point (nearest
     point per pixel), 0 = invalid elsewhere -- so the public download trains without MVS. Typically
     0.1-1% of pixels are valid; patch-level depth targets use only valid pixels.
All depth is in COLMAP's (arbitrary) scale, the scale of the poses.

**transforms.json path** (no COLMAP model): a scene folder holding ``transforms.json`` (shared ``w, h, fl_x, fl_y, cx, cy`` and distortion
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

from gasp_vlm.data.convert.colmap import (cam_from_world, camera_at_size, find_model, images_by_name, pinhole_K,
                                          read_model, sparse_depth, undistort_rgb)
from gasp_vlm.data.convert.common import (ConvertError, check_rotation, find_depth_file, fit_image_to_depth,
                                          image_hw, read_json, read_rgb, read_user_depth, subsample)
from gasp_vlm.data.convert.runner import SceneJob
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


DEPTH_SOURCES = ("auto", "dense", "user", "sparse")


def _model_candidates(src: Path) -> list[Path]:
    return [src / "colmap" / "sparse" / "0", src / "sparse" / "0", src / "nerfstudio" / "colmap" / "sparse" / "0",
            src / "colmap" / "sparse", src / "sparse"]


def _dense_workspace(src: Path, dense: Path | None) -> Path | None:
    if dense is not None:
        if not (Path(dense) / "stereo" / "depth_maps").is_dir():
            raise ConvertError(f"{dense}: not a COLMAP dense workspace (no stereo/depth_maps/)")
        return Path(dense)
    for cand in (src / "dense", src / "colmap" / "dense", src / "dense" / "0"):
        if (cand / "stereo" / "depth_maps").is_dir() and find_model([cand / "sparse"]) is not None:
            return cand
    return None


def dl3dv_scenes(src: Path) -> list[SceneJob]:
    src = Path(src)
    if src.suffix == ".json":
        return [SceneJob(None, src.parent)]

    def is_scene(p: Path) -> bool:
        return (p / "transforms.json").is_file() or find_model(_model_candidates(p)) is not None

    if is_scene(src):
        return [SceneJob(None, src)]
    found = [p for pat in ("*", "*/*") for p in src.glob(pat) if p.is_dir() and is_scene(p)]
    return [SceneJob(p.name, p) for p in sorted(set(found))]


def _convert_dense(ws: Path, w: SceneWriter, frame_step: int, max_frames: int | None) -> None:
    rec = read_model(ws / "sparse")
    by_name = images_by_name(rec)
    for name in subsample(sorted(by_name), frame_step, max_frames):
        img = by_name[name]
        where = f"{ws / 'sparse'} (image {name})"
        ipath = ws / "images" / img.name
        dfile = ws / "stereo" / "depth_maps" / f"{img.name}.geometric.bin"
        d = read_user_depth(dfile)
        cam = camera_at_size(rec.cameras[img.camera_id], image_hw(ipath), where)
        image, K = fit_image_to_depth(ipath, pinhole_K(cam), d.shape)
        cfw = cam_from_world(img, where)
        w.add_frame(Path(img.name).name, image, d, K, cfw)


def _convert_colmap(src: Path, model_dir: Path, w: SceneWriter, source: str, depth: Path | None, depth_scale: float,
                    images_dir: str | None, frame_step: int, max_frames: int | None) -> None:
    rec = read_model(model_dir)
    by_name = images_by_name(rec)
    valid = []
    for name in subsample(sorted(by_name), frame_step, max_frames):
        img = by_name[name]
        where = f"{model_dir} (image {img.name})"
        ipath = _resolve_image(src, img.name, images_dir)
        cam = camera_at_size(rec.cameras[img.camera_id], image_hw(ipath), where)
        rgb, ud = undistort_rgb(read_rgb(ipath), cam, where)
        K = pinhole_K(ud)
        if source == "user":
            d = read_user_depth(find_depth_file(Path(depth), ipath.name), depth_scale)
            rgb, K = fit_image_to_depth(rgb, K, d.shape)
        else:
            d = sparse_depth(rec, img, K, rgb.shape[:2])
            valid.append(float((d > 0).mean()))
        cfw = cam_from_world(img, where)
        w.add_frame(ipath.name, rgb, d, K, cfw)
    if valid:
        w.meta["sparse_valid_fraction"] = round(float(np.mean(valid)), 6)


def _convert_transforms(src: Path, tf_path: Path, w: SceneWriter, depth: Path, depth_scale: float,
                        images_dir: str | None, allow_distortion: bool, distortion_tol: float, frame_step: int,
                        max_frames: int | None) -> None:
    meta = read_json(tf_path)
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not frames:
        raise ConvertError(f"{tf_path}: no 'frames' list")
    for i, fr in subsample(list(enumerate(frames)), frame_step, max_frames):
        fp = fr.get("file_path") if isinstance(fr, dict) else None
        if not fp:
            raise ConvertError(f"{tf_path}: frame {i} has no file_path")
        where = f"{tf_path} (frame {i}, {fp})"
        img = _resolve_image(src, fp, images_dir)
        K, cfw = dl3dv_camera(meta, fr, image_hw(img), where, allow_distortion, distortion_tol)
        d = read_user_depth(find_depth_file(depth, img.name), depth_scale)
        image, K = fit_image_to_depth(img, K, d.shape)
        w.add_frame(img.name, image, d, K, cfw)


def convert_dl3dv(src: Path, out: Path, *, depth: Path | None = None, depth_source: str = "auto",
                  colmap: Path | None = None, dense: Path | None = None, depth_scale: float = 1000.0,
                  images_dir: str | None = None, allow_distortion: bool = False, distortion_tol: float = 1e-3,
                  frame_step: int = 1, max_frames: int | None = None, overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One DL3DV scene folder (or its transforms.json) -> canonical scene at ``out`` (written atomically)."""
    src = Path(src)
    src = src.parent if src.suffix == ".json" else src
    if depth_source not in DEPTH_SOURCES:
        raise ConvertError(f"depth_source must be one of {DEPTH_SOURCES}, got {depth_source!r}")
    if depth is not None and not Path(depth).is_dir():
        raise ConvertError(f"{depth}: depth folder not found")
    model_dir = Path(colmap) if colmap is not None else find_model(_model_candidates(src))
    ws = _dense_workspace(src, dense) if depth_source in ("auto", "dense") else None
    source = depth_source
    if source == "auto":
        source = "dense" if ws is not None else "user" if depth is not None else "sparse"
    if source == "dense" and ws is None:
        raise ConvertError(f"{src}: no COLMAP dense workspace (dense/ with stereo/depth_maps/ and sparse/)")
    if source == "user" and depth is None:
        raise ConvertError(f"{src}: depth_source=user needs a depth folder")
    if source == "sparse" and model_dir is None:
        raise ConvertError(f"{src}: DL3DV ships no depth maps and no COLMAP model was found here "
                           f"(looked in colmap/sparse/0, sparse/0, nerfstudio/colmap/sparse/0); pass a depth "
                           f"folder (npy, 16-bit png or COLMAP .geometric.bin, one per image) or a COLMAP model")
    extra = {"converted_from": str(src), "depth_source": source}
    with SceneWriter(out, source="dl3dv", depth_units="scene (poses' scale)", overwrite=overwrite, depth_format=depth_format, extra=extra) as w:
        if source == "dense":
            w.meta["world"] = "COLMAP"
            _convert_dense(ws, w, frame_step, max_frames)
        elif model_dir is not None:
            w.meta["world"] = "COLMAP"
            _convert_colmap(src, model_dir, w, source, depth, depth_scale, images_dir, frame_step, max_frames)
        else:
            w.meta["world"] = "nerfstudio transforms.json"
            _convert_transforms(src, src / "transforms.json", w, Path(depth), depth_scale, images_dir,
                                allow_distortion, distortion_tol, frame_step, max_frames)
    return Path(out)
