"""ARKitScenes (raw / 3dod downloads) -> canonical scenes.

Input: a folder holding ``lowres_wide.traj`` (``raw/<split>/<video_id>/`` or
``3dod/<split>/<video_id>/<video_id>_frames/``), or any root above such folders (searched four levels
deep). Per frame: ``lowres_wide/<video_id>_<ts>.png`` (256x192 RGB), ``lowres_depth/<video_id>_<ts>.png``
(uint16 mm), ``lowres_wide_intrinsics/<video_id>_<ts>.pincam`` (``w h fx fy cx cy``), optional
``confidence/<video_id>_<ts>.png`` (ARKit 0 low / 1 medium / 2 high). Output ``out/<video_id>/``.

- ``lowres_wide.traj``: one line per pose, ``ts rx ry rz tx ty tz`` with (axis-angle r, t) the
  **world-to-camera** transform in OpenCV camera axes (ARKitScenes' own loader inverts it to get the
  camera pose), metres. Each frame takes the pose whose timestamp is nearest to its own; frames with
  no pose within ``pose_time_tol`` seconds are skipped (``skipped_frames`` in scene.json).
- Depth = png / ``depth_scale`` (1000, mm -> m); pixels with confidence < ``min_confidence`` (default 1:
  drop ARKit's low-confidence LiDAR returns) are invalid. 0 keeps all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from gasp_vlm.data.convert.common import (ConvertError, check_rotation, clean_depth, fit_image_to_depth, read_png16,
                                          subsample)
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter

LAYOUT = "<video_id>[/<video_id>_frames]/{lowres_wide.traj, lowres_wide/, lowres_depth/, lowres_wide_intrinsics/}"


def axis_angle_to_matrix(r: np.ndarray) -> np.ndarray:
    """Rodrigues: axis-angle (3,) radians -> (3, 3) rotation."""
    r = np.asarray(r, dtype=np.float64)
    th = float(np.linalg.norm(r))
    if th < 1e-12:
        return np.eye(3)
    k = r / th
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * Kx + (1 - np.cos(th)) * (Kx @ Kx)


def read_traj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``lowres_wide.traj`` -> (timestamps (N,), cam_from_world (N, 3, 4))."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    ts, poses = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            v = [float(x) for x in line.split()]
        except ValueError:
            raise ConvertError(f"{path}:{n}: not numbers") from None
        if len(v) != 7:
            raise ConvertError(f"{path}:{n}: {len(v)} values, expected 'ts rx ry rz tx ty tz'")
        ts.append(v[0])
        poses.append(np.concatenate([axis_angle_to_matrix(v[1:4]), np.array(v[4:7])[:, None]], axis=1))
    if not ts:
        raise ConvertError(f"{path}: no poses")
    order = np.argsort(ts)
    return np.asarray(ts)[order], np.stack(poses)[order]


def read_pincam(path: Path) -> np.ndarray:
    try:
        v = [float(x) for x in Path(path).read_text().split()]
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing intrinsics file") from None
    except ValueError:
        raise ConvertError(f"{path}: not numbers") from None
    if len(v) != 6:
        raise ConvertError(f"{path}: {len(v)} values, expected 'w h fx fy cx cy'")
    _, _, fx, fy, cx, cy = v
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _video_id(scene_dir: Path) -> str:
    name = scene_dir.name
    return name[: -len("_frames")] if name.endswith("_frames") else name


def arkitscenes_scenes(src: Path) -> list[SceneJob]:
    src = Path(src)
    if (src / "lowres_wide.traj").is_file():
        return [SceneJob(None, src)]
    found = [t.parent for pat in ("*/lowres_wide.traj", "*/*/lowres_wide.traj", "*/*/*/lowres_wide.traj",
                                  "*/*/*/*/lowres_wide.traj")
             for t in src.glob(pat)]
    return [SceneJob(_video_id(d), d) for d in sorted(set(found))]


def convert_arkitscenes(src: Path, out: Path, *, depth_scale: float = 1000.0, min_confidence: int = 1,
                        pose_time_tol: float = 0.1, frame_step: int = 1, max_frames: int | None = None,
                        overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One ARKitScenes video folder -> canonical scene at ``out`` (written atomically)."""
    src = Path(src)
    vid = _video_id(src)
    ts, poses = read_traj(src / "lowres_wide.traj")
    rgb_dir = src / "lowres_wide"
    frames = sorted(rgb_dir.glob(f"{vid}_*.png"), key=lambda p: float(p.stem.rsplit("_", 1)[1]))
    if not frames:
        raise ConvertError(f"{rgb_dir}: no {vid}_<timestamp>.png frames (expected {LAYOUT})")
    skipped: list[str] = []
    chosen = []
    for f in frames:
        t = float(f.stem.rsplit("_", 1)[1])
        j = int(np.clip(np.searchsorted(ts, t), 1, len(ts) - 1)) if len(ts) > 1 else 0
        j = j - 1 if len(ts) > 1 and abs(ts[j - 1] - t) <= abs(ts[j] - t) else j
        if abs(ts[j] - t) > pose_time_tol:
            skipped.append(f.name)
        else:
            chosen.append((f, j))
    if not chosen:
        raise ConvertError(f"{src / 'lowres_wide.traj'}: no frame has a pose within {pose_time_tol} s")
    with SceneWriter(out, source="arkitscenes", depth_units="m", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(src), "video_id": vid, "skipped_frames": skipped,
                            "min_confidence": min_confidence}) as w:
        for f, j in subsample(chosen, frame_step, max_frames):
            cfw = poses[j]
            check_rotation(cfw[:, :3], f"{src / 'lowres_wide.traj'} (t={ts[j]})")
            K = read_pincam(src / "lowres_wide_intrinsics" / f"{f.stem}.pincam")
            d = read_png16(src / "lowres_depth" / f.name).astype(np.float64) / depth_scale
            conf_path = src / "confidence" / f.name
            if min_confidence > 0 and conf_path.is_file():
                with Image.open(conf_path) as im:
                    conf = np.asarray(im)
                if conf.shape != d.shape:
                    raise ConvertError(f"{conf_path}: confidence {conf.shape} does not match depth {d.shape}")
                d = np.where(conf >= min_confidence, d, 0.0)
            d = clean_depth(d)
            image, K = fit_image_to_depth(f, K, d.shape)
            w.add_frame(f.name, image, d, K, cfw)
    return Path(out)
