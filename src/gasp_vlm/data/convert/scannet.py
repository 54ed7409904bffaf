"""ScanNet v2 (SensReader export) -> canonical scene.

Input: ``<scene>/color/<i>.jpg`` (1296x968), ``depth/<i>.png`` (uint16 millimetres, 640x480, 0 =
invalid), ``pose/<i>.txt`` (4x4 camera-to-world, OpenCV axes), ``intrinsic/intrinsic_depth.txt`` and
``intrinsic_color.txt`` (4x4, K in the top-left 3x3).

- Resolution: the scene is written at the **depth** resolution -- colour is resized (bicubic) to the
  depth size; depth (the geometry) is never resampled.
- Intrinsics: ``intrinsics="depth"`` (default) uses ``intrinsic_depth.txt``, the camera the exported
  depth is registered to; ``"color"`` uses ``intrinsic_color.txt`` rescaled to the depth size.
- Frames whose pose is non-finite (ScanNet marks tracking failures with -inf) are skipped; their ids
  are recorded in scene.json (``skipped_frames``). ``frame_step`` / ``max_frames`` subsample.
- Depth = png / ``depth_scale`` (1000: mm -> m). ``depth`` overrides the depth folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gasp_vlm.data.convert.common import (ConvertError, check_rotation, clean_depth, fit_image_to_depth, read_matrix_txt,
                                          read_png16)
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter
from gasp_vlm.geometry.cameras import cam_from_world_from_c2w



def scannet_scenes(src: Path) -> list[SceneJob]:
    """One exported scene, or every ``scene*`` export under a root (``scans/``)."""
    src = Path(src)
    if (src / "color").is_dir() or (src / "pose").is_dir():
        return [SceneJob(None, src)]
    return [SceneJob(p.name, p) for p in sorted(src.glob("scene*")) if (p / "pose").is_dir()] or [SceneJob(None, src)]


def convert_scannet(src: Path, out: Path, *, depth: Path | None = None, intrinsics: str = "depth",
                    depth_scale: float = 1000.0, frame_step: int = 1, max_frames: int | None = None,
                    overwrite: bool = False, depth_format: str = "float32") -> Path:
    """Exported ScanNet scene folder -> canonical scene at ``out`` (written atomically)."""
    src = Path(src)
    color_dir, pose_dir = src / "color", src / "pose"
    depth_dir = Path(depth) if depth is not None else src / "depth"
    for d in (color_dir, pose_dir, depth_dir):
        if not d.is_dir():
            raise ConvertError(f"{d}: missing folder (expected a SensReader export: color/, depth/, pose/, intrinsic/)")
    if intrinsics not in ("depth", "color"):
        raise ConvertError(f"intrinsics must be 'depth' or 'color', got {intrinsics!r}")
    if frame_step < 1:
        raise ConvertError(f"frame_step must be >= 1, got {frame_step}")
    K_file = src / "intrinsic" / f"intrinsic_{intrinsics}.txt"
    K_raw = read_matrix_txt(K_file)[:3, :3]
    ids = sorted(int(p.stem) for p in color_dir.glob("*.jpg") if p.stem.isdigit())
    if not ids:
        raise ConvertError(f"{color_dir}: no <index>.jpg colour frames")
    ids = ids[::frame_step]
    skipped: list[int] = []
    written = 0
    with SceneWriter(out, source="scannet", depth_units="m", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(src), "intrinsics": intrinsics}) as w:
        for i in ids:
            if max_frames is not None and written >= max_frames:
                break
            c2w = read_matrix_txt(pose_dir / f"{i}.txt")
            if not np.isfinite(c2w).all():
                skipped.append(i)
                continue
            check_rotation(c2w[:3, :3], str(pose_dir / f"{i}.txt"))
            dpath = depth_dir / f"{i}.png"
            d = clean_depth(read_png16(dpath).astype(np.float64) / depth_scale)
            img = color_dir / f"{i}.jpg"
            # Colour is resized to the depth size; "color" K follows that resize, "depth" K already
            # belongs to the depth size.
            image, K_img = fit_image_to_depth(img, K_raw, d.shape, aspect_tol=0.02)
            K = K_img if intrinsics == "color" else K_raw
            w.add_frame(f"{i:06d}.jpg", image, d, K, cam_from_world_from_c2w(c2w))
            written += 1
        w.meta["skipped_frames"] = skipped
        if not written:
            raise ConvertError(f"{pose_dir}: no frame with a finite pose")
    return Path(out)
