"""WildRGB-D -> canonical scenes.

Input: the dataset root, a category, or one scene: ``<category>/scenes/<scene_XXX>/`` holding
``rgb/<%05d>.png``, ``depth/<%05d>.png`` (uint16, millimetres: "depth scale of 1000"), ``metadata``
(JSON with ``K`` as 9 numbers in column-major order, ``w``, ``h``) and ``cam_poses.txt`` (one line per
frame: frame id then the flattened 4x4 camera-to-world, OpenCV axes). Output
``out/<category>__<scene>/`` (or ``out`` for one scene).

- Poses are from RGB-D SLAM in metres; depth / ``depth_scale`` (1000) is metres. Frames without a
  pose line are skipped (recorded as ``skipped_frames``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gasp_vlm.data.convert.common import (ConvertError, check_rotation, clean_depth, fit_image_to_depth, read_json,
                                          read_png16, subsample)
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter
from gasp_vlm.geometry.cameras import cam_from_world_from_c2w

LAYOUT = "<root>/<category>/scenes/<scene>/{rgb/, depth/, metadata, cam_poses.txt}"


def read_wildrgbd_poses(path: Path) -> dict[int, np.ndarray]:
    """``cam_poses.txt`` -> {frame id: 4x4 camera-to-world}."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    poses = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            raise ConvertError(f"{path}:{n}: not numbers") from None
        if len(vals) != 17:
            raise ConvertError(f"{path}:{n}: {len(vals)} values, expected frame id + 16")
        poses[int(vals[0])] = np.array(vals[1:]).reshape(4, 4)
    return poses


def wildrgbd_scenes(src: Path) -> list[SceneJob]:
    src = Path(src)
    if (src / "cam_poses.txt").is_file():
        return [SceneJob(None, src)]
    cats = [src] if (src / "scenes").is_dir() else sorted(p for p in src.iterdir() if (p / "scenes").is_dir())
    return [SceneJob(f"{c.name}__{s.name}", s) for c in cats for s in sorted((c / "scenes").iterdir())
            if (s / "cam_poses.txt").is_file()]


def convert_wildrgbd(src: Path, out: Path, *, depth_scale: float = 1000.0, frame_step: int = 1,
                     max_frames: int | None = None, overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One WildRGB-D scene folder -> canonical scene at ``out`` (written atomically)."""
    src = Path(src)
    meta = read_json(src / "metadata")
    try:
        K = np.asarray(meta["K"], dtype=np.float64).reshape(3, 3).T  # stored column-major
    except (KeyError, TypeError, ValueError):
        raise ConvertError(f"{src / 'metadata'}: no 'K' with 9 numbers") from None
    poses = read_wildrgbd_poses(src / "cam_poses.txt")
    ids = sorted(int(p.stem) for p in (src / "rgb").glob("*.png") if p.stem.isdigit())
    if not ids:
        raise ConvertError(f"{src / 'rgb'}: no <frame>.png images (expected {LAYOUT})")
    skipped = [i for i in ids if i not in poses]
    cat = src.parent.parent.name
    with SceneWriter(out, source="wildrgbd", depth_units="m", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(src), "category": cat, "skipped_frames": skipped}) as w:
        for i in subsample([i for i in ids if i in poses], frame_step, max_frames):
            where = f"{src / 'cam_poses.txt'} (frame {i})"
            c2w = poses[i]
            check_rotation(c2w[:3, :3], where)
            name = f"{i:05d}.png"
            d = clean_depth(read_png16(src / "depth" / name).astype(np.float64) / depth_scale)
            image, K_i = fit_image_to_depth(src / "rgb" / name, K, d.shape)
            w.add_frame(name, image, d, K_i, cam_from_world_from_c2w(c2w))
    return Path(out)
