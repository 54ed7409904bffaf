"""MegaDepth v1 -> canonical scenes, one per (scene, dense reconstruction).

Input: the MegaDepth root holding ``MegaDepth_v1/`` (possibly as ``phoenix/S6/zl548/MegaDepth_v1/``)
and ``MegaDepth_v1_SfM/``, or the ``MegaDepth_v1`` folder itself (then ``sfm_root`` names the SfM
folder). Per scene ``<id>`` and reconstruction ``k``:
``MegaDepth_v1/<id>/dense<k>/imgs/<name>.jpg``, ``MegaDepth_v1/<id>/dense<k>/depths/<stem>.h5``
(HDF5 dataset ``depth``, float32 z-depth, 0 = no depth) and the COLMAP model
``MegaDepth_v1_SfM/<id>/sparse/manhattan/<k>/`` (bin or txt, read with pycolmap). Output
``out/<id>_<k>/``.

- The dense images are COLMAP-undistorted, while the SfM model describes the original (distorted,
  SIMPLE_RADIAL) photos. Each image's K is therefore the pinhole camera COLMAP's undistorter makes of
  its SfM camera (``pycolmap.undistort_camera``, exactly the image_undistorter step of the MegaDepth
  pipeline), rescaled to the dense image's size (the pipeline capped the size). An undistorted model
  (e.g. from D2-Net's ``undistort_reconstructions.py``) may be passed as ``sfm_root`` instead; its
  PINHOLE cameras are used as they are.
- Poses: COLMAP cam_from_world (OpenCV). Depth and poses share the SfM (arbitrary) scale. Dense images
  not registered in the model are skipped (``skipped_frames``).
"""

from __future__ import annotations

from pathlib import Path

from gasp_vlm.data.convert.colmap import (cam_from_world, camera_at_size, images_by_name, pinhole_K, read_model,
                                          undistorted_camera)
from gasp_vlm.data.convert.common import ConvertError, clean_depth, image_hw, read_h5, subsample
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter

LAYOUT = "<root>/{MegaDepth_v1/<id>/dense<k>/{imgs,depths}/, MegaDepth_v1_SfM/<id>/sparse/manhattan/<k>/}"


def _roots(src: Path, sfm_root: Path | None) -> tuple[Path, Path]:
    src = Path(src)
    for dense in (src / "MegaDepth_v1", src / "phoenix" / "S6" / "zl548" / "MegaDepth_v1", src):
        if dense.is_dir() and any(dense.glob("*/dense*/depths")):
            break
    else:
        raise ConvertError(f"{src}: no MegaDepth_v1/<id>/dense<k>/depths folders (expected {LAYOUT})")
    if sfm_root is None:
        for cand in (src / "MegaDepth_v1_SfM", src.parent / "MegaDepth_v1_SfM"):
            if cand.is_dir():
                sfm_root = cand
                break
        else:
            raise ConvertError(f"{src}: no MegaDepth_v1_SfM folder next to MegaDepth_v1; pass sfm_root")
    return dense, Path(sfm_root)


def megadepth_scenes(src: Path, *, sfm_root: Path | None = None) -> list[SceneJob]:
    dense_root, sfm = _roots(src, sfm_root)
    jobs = []
    for depths in sorted(dense_root.glob("*/dense*/depths")):
        scene_dir, k = depths.parent.parent, depths.parent.name[len("dense"):]
        jobs.append(SceneJob(f"{scene_dir.name}_{k}", (depths.parent, sfm / scene_dir.name, k)))
    return jobs


def _model_dir(sfm_scene: Path, k: str) -> Path:
    for cand in (sfm_scene / "sparse" / "manhattan" / k, sfm_scene / "sparse" / k, sfm_scene / "sparse"):
        if (cand / "cameras.bin").is_file() or (cand / "cameras.txt").is_file():
            return cand
    raise ConvertError(f"{sfm_scene}: no COLMAP model at sparse/manhattan/{k}/ (or sparse/{k}/, sparse/)")


def convert_megadepth(src: tuple[Path, Path, str], out: Path, *, frame_step: int = 1, max_frames: int | None = None,
                      overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One MegaDepth (dense<k> folder, SfM scene folder, k) -> canonical scene at ``out`` (atomic)."""
    dense, sfm_scene, k = Path(src[0]), Path(src[1]), str(src[2])
    model_dir = _model_dir(sfm_scene, k)
    rec = read_model(model_dir)
    by_name = images_by_name(rec)
    names = sorted(p.name for p in (dense / "imgs").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not names:
        raise ConvertError(f"{dense / 'imgs'}: no images")
    skipped = [n for n in names if n not in by_name]
    ud_cams: dict[int, object] = {}
    with SceneWriter(out, source="megadepth", depth_units="scene (SfM scale)", overwrite=overwrite, depth_format=depth_format,
                     extra={"converted_from": str(dense), "model": str(model_dir), "skipped_frames": skipped}) as w:
        for name in subsample([n for n in names if n in by_name], frame_step, max_frames):
            img = by_name[name]
            where = f"{model_dir} (image {name})"
            if img.camera_id not in ud_cams:
                ud_cams[img.camera_id] = undistorted_camera(rec.cameras[img.camera_id], where)
            dpath = dense / "depths" / f"{Path(name).stem}.h5"
            d = read_h5(dpath, "depth")
            if d.ndim != 2:
                raise ConvertError(f"{dpath}: depth has shape {d.shape}, expected (H, W)")
            d = clean_depth(d)
            ipath = dense / "imgs" / name
            if image_hw(ipath) != d.shape:
                raise ConvertError(f"{ipath}: image {image_hw(ipath)} and depth {d.shape} differ in size")
            K = pinhole_K(camera_at_size(ud_cams[img.camera_id], d.shape, where, aspect_tol=0.02))
            w.add_frame(name, ipath, d, K, cam_from_world(img, where))
    return Path(out)
