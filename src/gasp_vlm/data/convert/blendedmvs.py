"""BlendedMVS (and BlendedMVG/MVS+/MVS++, same layout) -> canonical scenes.

Input: the dataset root holding one folder per scene (``<pid>/``, 24 hex digits), or one scene:
``<pid>/blended_images/<%08d>.jpg`` (``*_masked.jpg`` are ignored), ``<pid>/cams/<%08d>_cam.txt``
(MVSNet format: ``extrinsic`` + 4x4 world-to-camera, ``intrinsic`` + 3x3 K, then depth range) and
``<pid>/rendered_depth_maps/<%08d>.pfm`` (float32 z-depth, 0 = no surface). Output ``out/<pid>/``.

- Poses are already OpenCV world-to-camera; depth and poses share the reconstruction's (arbitrary)
  scale. Images and depth are 768x576 (low-res release) and aligned pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gasp_vlm.data.convert.common import (ConvertError, check_rotation, clean_depth, fit_image_to_depth, read_pfm,
                                          scene_dirs, subsample)
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter

LAYOUT = "<root>/<pid>/{blended_images/*.jpg, cams/*_cam.txt, rendered_depth_maps/*.pfm}"


def read_mvsnet_cam(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MVSNet ``*_cam.txt`` -> (K (3, 3), cam_from_world (3, 4))."""
    try:
        words = Path(path).read_text().split()
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing camera file") from None
    try:
        e = words.index("extrinsic")
        i = words.index("intrinsic")
        ext = np.array([float(x) for x in words[e + 1:e + 17]]).reshape(4, 4)
        K = np.array([float(x) for x in words[i + 1:i + 10]]).reshape(3, 3)
    except ValueError:
        raise ConvertError(f"{path}: not an MVSNet camera file (want 'extrinsic' 4x4 then 'intrinsic' 3x3)") from None
    return K, ext[:3]


def blendedmvs_scenes(src: Path) -> list[SceneJob]:
    dirs = scene_dirs(src, "cams")
    if dirs == [Path(src)]:
        return [SceneJob(None, Path(src))]
    return [SceneJob(d.name, d) for d in dirs]


def convert_blendedmvs(src: Path, out: Path, *, frame_step: int = 1, max_frames: int | None = None,
                       overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One BlendedMVS scene folder -> canonical scene at ``out`` (written atomically)."""
    src = Path(src)
    img_dir, cam_dir, depth_dir = src / "blended_images", src / "cams", src / "rendered_depth_maps"
    for d in (img_dir, cam_dir, depth_dir):
        if not d.is_dir():
            raise ConvertError(f"{d}: missing folder (expected {LAYOUT})")
    stems = sorted(p.stem for p in img_dir.glob("*.jpg") if not p.stem.endswith("_masked"))
    if not stems:
        raise ConvertError(f"{img_dir}: no images")
    with SceneWriter(out, source="blendedmvs", depth_units="scene (reconstruction scale)", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(src)}) as w:
        for stem in subsample(stems, frame_step, max_frames):
            cam = cam_dir / f"{stem}_cam.txt"
            K, cfw = read_mvsnet_cam(cam)
            check_rotation(cfw[:, :3], str(cam))
            d = clean_depth(read_pfm(depth_dir / f"{stem}.pfm"))
            image, K = fit_image_to_depth(img_dir / f"{stem}.jpg", K, d.shape)
            w.add_frame(f"{stem}.jpg", image, d, K, cfw)
    return Path(out)
