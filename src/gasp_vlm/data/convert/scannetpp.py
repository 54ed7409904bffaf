"""ScanNet++ (v1/v2) -> canonical scenes, from the iPhone stream (default) or the DSLR.

Input: the dataset's ``data/`` folder, one scene ``data/<scene_id>/``, or its ``iphone/`` / ``dslr/``.

- ``stream="iphone"``: ``iphone/rgb/frame_%06d.jpg`` (extracted from ``rgb.mkv`` by the ScanNet++
  toolkit), ``iphone/depth/frame_%06d.png`` (uint16 mm, 256x192, from ``depth.bin``) and the COLMAP
  model ``iphone/colmap/`` (cameras/images/points3D .txt, read with pycolmap; cam_from_world, metres).
  Colour is resized to the depth size with K scaled; depth is never resampled. ``depth`` overrides the
  depth folder (e.g. depth rendered from the laser scan). The iPhone camera is treated as pinhole:
  distortion beyond ``distortion_tol`` is refused unless ``allow_distortion``.
- ``stream="dslr"``: ``dslr/nerfstudio/transforms_undistorted.json`` (PINHOLE, written by the
  toolkit's undistortion step) + ``dslr/undistorted_images/`` and depth rendered from the mesh
  (``depth`` folder, default ``dslr/render_depth/``; npy, 16-bit png in mm, or COLMAP .bin), since the
  DSLR has no depth sensor; the raw fisheye images are not used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gasp_vlm.data.convert.colmap import cam_from_world, camera_at_size, images_by_name, is_distorted, pinhole_K, read_model
from gasp_vlm.data.convert.common import (ConvertError, clean_depth, find_depth_file, fit_image_to_depth,
                                          image_hw, read_json, read_png16, read_user_depth, subsample)
from gasp_vlm.data.convert.dl3dv import dl3dv_camera
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter

LAYOUT = "data/<scene_id>/iphone/{rgb/, depth/, colmap/} or data/<scene_id>/dslr/{nerfstudio/, undistorted_images/}"


def _scene_root(p: Path) -> Path:
    return p.parent if p.name in ("iphone", "dslr") else p


def scannetpp_scenes(src: Path) -> list[SceneJob]:
    src = _scene_root(Path(src))
    if (src / "iphone").is_dir() or (src / "dslr").is_dir():
        return [SceneJob(None, src)]
    root = src / "data" if (src / "data").is_dir() else src
    return [SceneJob(p.name, p) for p in sorted(root.iterdir())
            if p.is_dir() and ((p / "iphone").is_dir() or (p / "dslr").is_dir())]


def _convert_iphone(scene: Path, w: SceneWriter, depth: Path | None, depth_scale: float, allow_distortion: bool,
                    distortion_tol: float, frame_step: int, max_frames: int | None) -> None:
    ip = scene / "iphone"
    rec = read_model(ip / "colmap")
    by_name = images_by_name(rec)
    depth_dir = Path(depth) if depth is not None else ip / "depth"
    names = sorted(p.name for p in (ip / "rgb").glob("frame_*.jpg"))
    if not names:
        raise ConvertError(f"{ip / 'rgb'}: no frame_*.jpg (extract them from rgb.mkv with the ScanNet++ toolkit)")
    w.meta["skipped_frames"] = [n for n in names if n not in by_name]
    for name in subsample([n for n in names if n in by_name], frame_step, max_frames):
        img = by_name[name]
        where = f"{ip / 'colmap'} (image {name})"
        cam = rec.cameras[img.camera_id]
        if is_distorted(cam, distortion_tol) and not allow_distortion:
            raise ConvertError(f"{where}: camera {cam.model.name} has distortion {list(cam.params)} beyond "
                               f"{distortion_tol}; pass allow_distortion to ignore it")
        rgb = ip / "rgb" / name
        K = pinhole_K(camera_at_size(cam, image_hw(rgb), where))
        if depth is None:
            d = clean_depth(read_png16(depth_dir / f"{Path(name).stem}.png").astype(np.float64) / depth_scale)
        else:
            d = read_user_depth(find_depth_file(depth_dir, name), depth_scale)
        image, K = fit_image_to_depth(rgb, K, d.shape, aspect_tol=0.02)
        cfw = cam_from_world(img, where)
        w.add_frame(name, image, d, K, cfw)


def _convert_dslr(scene: Path, w: SceneWriter, depth: Path | None, depth_scale: float, frame_step: int,
                  max_frames: int | None) -> None:
    ds = scene / "dslr"
    tf_path = ds / "nerfstudio" / "transforms_undistorted.json"
    meta = read_json(tf_path)
    depth_dir = Path(depth) if depth is not None else ds / "render_depth"
    if not depth_dir.is_dir():
        raise ConvertError(f"{depth_dir}: no depth for the DSLR (render it from the mesh with the ScanNet++ "
                           f"toolkit, or pass a depth folder)")
    frames = list(meta.get("frames", [])) + list(meta.get("test_frames", []))
    frames.sort(key=lambda f: str(f.get("file_path", "")))
    if not frames:
        raise ConvertError(f"{tf_path}: no frames")
    for i, fr in enumerate(subsample(frames, frame_step, max_frames)):
        fp = str(fr.get("file_path", ""))
        img = ds / "undistorted_images" / Path(fp).name
        where = f"{tf_path} (frame {fp})"
        K, cfw = dl3dv_camera(meta, fr, image_hw(img), where)
        d = read_user_depth(find_depth_file(depth_dir, img.name), depth_scale)
        image, K = fit_image_to_depth(img, K, d.shape)
        w.add_frame(img.name, image, d, K, cfw)


def convert_scannetpp(src: Path, out: Path, *, stream: str = "iphone", depth: Path | None = None,
                      depth_scale: float = 1000.0, allow_distortion: bool = False, distortion_tol: float = 1e-3,
                      frame_step: int = 1, max_frames: int | None = None, overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One ScanNet++ scene folder -> canonical scene at ``out`` (written atomically)."""
    scene = _scene_root(Path(src))
    if stream not in ("iphone", "dslr"):
        raise ConvertError(f"stream must be 'iphone' or 'dslr', got {stream!r}")
    if not (scene / stream).is_dir():
        raise ConvertError(f"{scene / stream}: missing folder (expected {LAYOUT})")
    with SceneWriter(out, source=f"scannetpp-{stream}", depth_units="m", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(scene), "stream": stream}) as w:
        if stream == "iphone":
            _convert_iphone(scene, w, depth, depth_scale, allow_distortion, distortion_tol, frame_step, max_frames)
        else:
            _convert_dslr(scene, w, depth, depth_scale, frame_step, max_frames)
    return Path(out)
