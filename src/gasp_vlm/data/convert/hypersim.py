"""Hypersim (apple/ml-hypersim) -> canonical scenes, one per (scene, camera trajectory).

Input: the dataset root (``ai_VVV_NNN/`` folders) or one scene folder:
``images/scene_cam_XX_final_preview/frame.IIII.tonemap.jpg`` (``images="tonemap"``, default) or
``images/scene_cam_XX_final_hdf5/frame.IIII.color.hdf5`` (``images="hdf5"``: HDR, tone-mapped here as
Hypersim's own scripts do: gamma 2.2, 90th-percentile brightness -> 0.8);
``images/scene_cam_XX_geometry_hdf5/frame.IIII.depth_meters.hdf5``;
``_detail/cam_XX/camera_keyframe_orientations.hdf5`` (N, 3, 3) and ``camera_keyframe_positions.hdf5``
(N, 3); ``_detail/metadata_scene.csv`` (``meters_per_asset_unit``). Output ``out/<scene>__cam_XX/``.

- Depth: ``depth_meters`` is the Euclidean **distance from the camera centre** along each pixel's
  ray (NaN where no geometry), not z-depth. z = distance / |((u - cx)/fx, (v - cy)/fy, 1)| with pixel
  centres at +0.5; NaN -> 0 (invalid).
- Poses: orientations map camera to world with camera axes x right, y up, z backwards (OpenGL);
  positions are in asset units, multiplied by ``meters_per_asset_unit`` so depth and poses are metres.
  Frame ``IIII`` is keyframe ``IIII``.
- Intrinsics: the default camera has a 60 degree horizontal field of view and square pixels
  (``fov_deg``). ``camera_params`` = Hypersim's ``metadata_camera_parameters.csv`` instead reads each
  scene's ``M_proj`` (OpenGL projection): fx = M00 W/2, cx = W/2 (1 - M02), fy = M11 H/2,
  cy = H/2 (1 + M12); a projection with other off-pinhole terms (tilt-shift) is refused.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from gasp_vlm.data.convert.common import ConvertError, check_rotation, clean_depth, read_h5, read_rgb, subsample
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter
from gasp_vlm.geometry.cameras import cam_from_world_from_c2w, opengl_to_opencv_c2w

LAYOUT = "<root>/ai_VVV_NNN/{images/scene_cam_XX_*/frame.IIII.*, _detail/cam_XX/, _detail/metadata_scene.csv}"
FRAME_RE = re.compile(r"frame\.(\d+)\.")


def hypersim_tonemap(rgb_hdr: np.ndarray) -> np.ndarray:
    """HDR (H, W, 3) -> uint8 sRGB-like image: scale so the 90th-percentile brightness maps to 0.8
    after gamma 1/2.2 (Hypersim's tone mapping, over all pixels)."""
    rgb = np.nan_to_num(np.asarray(rgb_hdr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    brightness = 0.3 * rgb[..., 0] + 0.59 * rgb[..., 1] + 0.11 * rgb[..., 2]
    p90 = float(np.percentile(brightness, 90)) if brightness.size else 0.0
    scale = 0.0 if p90 < 1e-4 else 0.8 ** 2.2 / p90
    out = np.power(np.maximum(scale * rgb, 0.0), 1 / 2.2)
    return (np.clip(out, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def distance_to_depth(dist: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Per-pixel distance from the camera centre (H, W) -> z-depth (pixel centres at +0.5)."""
    h, w = dist.shape
    u = (np.arange(w) + 0.5 - K[0, 2]) / K[0, 0]
    v = (np.arange(h) + 0.5 - K[1, 2]) / K[1, 1]
    norm = np.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + 1.0)
    return np.asarray(dist, dtype=np.float64) / norm


def meters_per_asset_unit(path: Path) -> float:
    try:
        rows = list(csv.reader(Path(path).read_text().splitlines()))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    for row in rows:
        if len(row) >= 2 and row[0].strip() == "meters_per_asset_unit":
            try:
                return float(row[1])
            except ValueError:
                break
    raise ConvertError(f"{path}: no numeric meters_per_asset_unit row")


def intrinsics_from_projection(row: dict, hw: tuple[int, int], where: str) -> np.ndarray:
    """A ``metadata_camera_parameters.csv`` row (M_proj_ij) -> K for an image of (H, W)."""
    try:
        M = np.array([[float(row[f"M_proj_{i}{j}"]) for j in range(4)] for i in range(4)])
    except (KeyError, ValueError):
        raise ConvertError(f"{where}: missing or non-numeric M_proj_ij columns") from None
    off = M.copy()
    for i, j in ((0, 0), (0, 2), (1, 1), (1, 2), (2, 2), (2, 3), (3, 2)):
        off[i, j] = 0.0
    if np.abs(off).max() > 1e-6:
        raise ConvertError(f"{where}: M_proj has tilt-shift terms (not a pinhole camera); skip this scene")
    h, w = hw
    return np.array([[M[0, 0] * w / 2, 0.0, w / 2 * (1 - M[0, 2])],
                     [0.0, M[1, 1] * h / 2, h / 2 * (1 + M[1, 2])], [0.0, 0.0, 1.0]])


def hypersim_scenes(src: Path) -> list[SceneJob]:
    src = Path(src)
    scenes = [src] if (src / "_detail").is_dir() else sorted(p for p in src.iterdir() if (p / "_detail").is_dir())
    jobs = []
    for s in scenes:
        for cam in sorted((s / "_detail").glob("cam_*")):
            if (cam / "camera_keyframe_orientations.hdf5").is_file():
                jobs.append(SceneJob(f"{s.name}__{cam.name}", (s, cam.name)))
    return jobs


def convert_hypersim(src: tuple[Path, str], out: Path, *, images: str = "tonemap", fov_deg: float = 60.0,
                     camera_params: Path | None = None, frame_step: int = 1, max_frames: int | None = None,
                     overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One Hypersim (scene folder, camera name) job of ``hypersim_scenes`` -> canonical scene at ``out``
    (written atomically)."""
    scene, cam = Path(src[0]), str(src[1])
    if images not in ("tonemap", "hdf5"):
        raise ConvertError(f"images must be 'tonemap' or 'hdf5', got {images!r}")
    detail = scene / "_detail"
    scale = meters_per_asset_unit(detail / "metadata_scene.csv")
    R = read_h5(detail / cam / "camera_keyframe_orientations.hdf5", "dataset").astype(np.float64)
    pos = read_h5(detail / cam / "camera_keyframe_positions.hdf5", "dataset").astype(np.float64) * scale
    geo = scene / "images" / f"scene_{cam}_geometry_hdf5"
    img_dir = scene / "images" / (f"scene_{cam}_final_preview" if images == "tonemap" else f"scene_{cam}_final_hdf5")
    frames = sorted(int(FRAME_RE.match(p.name).group(1)) for p in geo.glob("frame.*.depth_meters.hdf5")
                    if FRAME_RE.match(p.name))
    if not frames:
        raise ConvertError(f"{geo}: no frame.IIII.depth_meters.hdf5 files (expected {LAYOUT})")
    proj_row = None
    if camera_params is not None:
        with open(camera_params, newline="") as f:
            proj_row = next((r for r in csv.DictReader(f) if r.get("scene_name") == scene.name), None)
        if proj_row is None:
            raise ConvertError(f"{camera_params}: no row for scene {scene.name}")
    with SceneWriter(out, source="hypersim", depth_units="m", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(scene), "camera": cam, "images": images,
                            "meters_per_asset_unit": scale}) as w:
        for i in subsample(frames, frame_step, max_frames):
            where = f"{detail / cam} (keyframe {i})"
            if i >= len(R) or i >= len(pos):
                raise ConvertError(f"{where}: frame {i} has no keyframe pose ({len(R)} keyframes)")
            check_rotation(R[i], where)
            dist = read_h5(geo / f"frame.{i:04d}.depth_meters.hdf5", "dataset")
            if dist.ndim != 2:
                raise ConvertError(f"{geo / f'frame.{i:04d}.depth_meters.hdf5'}: shape {dist.shape}, expected (H, W)")
            h, wd = dist.shape
            if proj_row is not None:
                K = intrinsics_from_projection(proj_row, (h, wd), f"{camera_params} ({scene.name})")
            else:
                fx = wd / 2 / np.tan(np.radians(fov_deg) / 2)
                K = np.array([[fx, 0.0, wd / 2], [0.0, fx, h / 2], [0.0, 0.0, 1.0]])
            d = clean_depth(distance_to_depth(dist, K))
            if images == "tonemap":
                rgb = read_rgb(img_dir / f"frame.{i:04d}.tonemap.jpg")
            else:
                rgb = hypersim_tonemap(read_h5(img_dir / f"frame.{i:04d}.color.hdf5", "dataset"))
            if rgb.shape[:2] != d.shape:
                raise ConvertError(f"{img_dir}: frame {i} image {rgb.shape[:2]} does not match depth {d.shape}")
            c2w_gl = np.concatenate([R[i], pos[i][:, None]], axis=1)
            w.add_frame(f"frame.{i:04d}.jpg", rgb, d, K, cam_from_world_from_c2w(opengl_to_opencv_c2w(c2w_gl)))
    return Path(out)
