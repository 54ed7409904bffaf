"""CO3Dv2 -> canonical scenes (one per sequence).

Input: a category folder ``<root>/<category>/`` holding ``frame_annotations.jgz`` (gzipped JSON list; a
plain ``frame_annotations.json`` is read too), or one sequence folder inside it. Annotation paths
(``image.path``, ``depth.path``, ``depth.mask_path``) are relative to ``<root>`` (``depth`` overrides the
root for depth files), or a root holding several categories. Output: ``out/<sequence_name>/`` per sequence.

- Intrinsics (PyTorch3D NDC, ``viewpoint.focal_length`` / ``principal_point``, image size
  ``image.size`` = [H, W]): with half size (W/2, H/2) and s = (W/2, H/2) for ``ndc_norm_image_bounds``
  or s = min(W, H)/2 for ``ndc_isotropic``:  f_px = f_ndc * s,  c_px = (W/2, H/2) - p_ndc * s
  (NDC +x points left and +y up, hence the minus). Pixel centres at +0.5.
- Extrinsics: PyTorch3D uses row vectors, X_cam = X_world @ R + T, with camera axes +x left, +y up,
  +z forward. OpenCV: R_cv = diag(-1, -1, 1) @ R^T, t_cv = diag(-1, -1, 1) @ T.
- Depth: ``depths/*.geometric.png`` hold float16 bits in a 16-bit PNG, times ``depth.scale_adjustment``;
  pixels whose ``depth_masks/*.png`` value is <= 127 are set invalid (0). An image whose size differs
  from its depth map's is resized to it (K scaled).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from gasp_vlm.data.convert.common import (ConvertError, check_rotation, clean_depth, fit_image_to_depth,
                                          image_hw, read_png16)
from gasp_vlm.data.convert.runner import SceneJob
from gasp_vlm.data.scene import SceneWriter

P3D_TO_CV = np.diag([-1.0, -1.0, 1.0])


def read_float16_png(path: Path) -> np.ndarray:
    """CO3D depth: a 16-bit PNG whose values are float16 bit patterns -> float32 (H, W)."""
    raw = read_png16(path)
    return raw.view(np.float16).astype(np.float32)


def write_float16_png(path: Path, depth: np.ndarray) -> None:
    """float (H, W) -> CO3D-style float16-bits 16-bit PNG (fixtures)."""
    Image.fromarray(np.ascontiguousarray(np.asarray(depth, np.float16).view(np.uint16))).save(path)


def ndc_to_pixels(focal_ndc: Iterable[float], principal_ndc: Iterable[float], size_hw: Iterable[int],
                  fmt: str = "ndc_isotropic") -> np.ndarray:
    """PyTorch3D NDC intrinsics of an image of size [H, W] -> K (3, 3) in pixels."""
    h, w = (float(x) for x in size_hw)
    half = np.array([w / 2.0, h / 2.0])
    fmt = fmt.lower()
    if fmt == "ndc_norm_image_bounds":
        s = half
    elif fmt == "ndc_isotropic":
        s = np.full(2, half.min())
    else:
        raise ConvertError(f"unknown intrinsics_format {fmt!r} (expected ndc_isotropic or ndc_norm_image_bounds)")
    f = np.asarray(list(focal_ndc), np.float64) * s
    c = half - np.asarray(list(principal_ndc), np.float64) * s
    return np.array([[f[0], 0.0, c[0]], [0.0, f[1], c[1]], [0.0, 0.0, 1.0]])


def pytorch3d_to_opencv(R: np.ndarray, T: np.ndarray) -> np.ndarray:
    """PyTorch3D (R (3, 3) row-vector convention, T (3,)) -> OpenCV cam_from_world (3, 4)."""
    R = np.asarray(R, np.float64).reshape(3, 3)
    T = np.asarray(T, np.float64).reshape(3)
    return np.concatenate([P3D_TO_CV @ R.T, (P3D_TO_CV @ T)[:, None]], axis=1)


def _load_annotations(cat_dir: Path) -> list[dict]:
    for name in ("frame_annotations.jgz", "frame_annotations.json"):
        p = cat_dir / name
        if p.is_file():
            try:
                raw = gzip.decompress(p.read_bytes()) if name.endswith(".jgz") else p.read_bytes()
                data = json.loads(raw)
            except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConvertError(f"{p}: unreadable annotations ({e})") from None
            if not isinstance(data, list):
                raise ConvertError(f"{p}: expected a JSON list of frame annotations")
            return data
    raise ConvertError(f"{cat_dir}: no frame_annotations.jgz (or .json) found")


def _frame_depth(root: Path, entry: dict, where: str, use_masks: bool) -> np.ndarray:
    dinfo = entry.get("depth") or {}
    if not dinfo.get("path"):
        raise ConvertError(f"{where}: no depth path in the annotation")
    d = read_float16_png(root / dinfo["path"]) * float(dinfo.get("scale_adjustment", 1.0) or 1.0)
    if use_masks and dinfo.get("mask_path"):
        mp = root / dinfo["mask_path"]
        try:
            with Image.open(mp) as im:
                mask = np.asarray(im.convert("L"))
        except FileNotFoundError:
            raise ConvertError(f"{mp}: missing depth mask") from None
        except OSError as e:
            raise ConvertError(f"{mp}: unreadable depth mask ({e})") from None
        if mask.shape != d.shape:
            raise ConvertError(f"{mp}: mask {mask.shape} does not match depth {d.shape}")
        d = np.where(mask > 127, d, 0.0)
    return clean_depth(d)


def _category_of(src: Path) -> tuple[Path, str | None]:
    """(category folder, the one sequence named by ``src`` or None)."""
    if (src / "frame_annotations.jgz").is_file() or (src / "frame_annotations.json").is_file():
        return src, None
    if (src.parent / "frame_annotations.jgz").is_file() or (src.parent / "frame_annotations.json").is_file():
        return src.parent, src.name
    raise ConvertError(f"{src}: not a CO3D category or sequence folder (no frame_annotations.jgz here or above)")


@lru_cache(maxsize=2)  # a worker converts many sequences of one category; parse its annotations once
def _sequences(cat_dir: str) -> dict[str, list[dict]]:
    by_seq: dict[str, list[dict]] = {}
    for e in _load_annotations(Path(cat_dir)):
        name = e.get("sequence_name")
        if name is None:
            raise ConvertError(f"{cat_dir}: an annotation has no sequence_name")
        by_seq.setdefault(name, []).append(e)
    for entries in by_seq.values():
        entries.sort(key=lambda e: int(e.get("frame_number", 0)))
    return by_seq


def co3d_scenes(src: Path, *, sequences: Iterable[str] | None = None) -> list[SceneJob]:
    """Sequences of a category folder, of one sequence folder, or of every category under a root."""
    src = Path(src)
    cats = [p for p in sorted(src.iterdir()) if (p / "frame_annotations.jgz").is_file()
            or (p / "frame_annotations.json").is_file()] if src.is_dir() else []
    pairs = [(c, None) for c in cats] if cats and not (src / "frame_annotations.jgz").is_file() \
        and not (src / "frame_annotations.json").is_file() else [_category_of(src)]
    want = set(sequences) if sequences is not None else None
    jobs = []
    for cat_dir, only in pairs:
        seqs = sorted(_sequences(str(cat_dir)))
        seqs = [s for s in seqs if (only is None or s == only) and (want is None or s in want)]
        if not seqs:
            raise ConvertError(f"{cat_dir}: no frames for sequences {sorted(want or {only} - {None})}")
        jobs += [SceneJob(seq, (cat_dir, seq)) for seq in seqs]
    return jobs


def convert_co3d_sequence(src: tuple[Path, str], out: Path, *, depth: Path | None = None,
                          use_depth_masks: bool = True, overwrite: bool = False, depth_format: str = "float32") -> Path:
    """One CO3D (category folder, sequence name) -> canonical scene at ``out`` (written atomically)."""
    cat_dir, seq = Path(src[0]), str(src[1])
    root = cat_dir.parent
    droot = Path(depth) if depth is not None else root
    entries = _sequences(str(cat_dir)).get(seq)
    if not entries:
        raise ConvertError(f"{cat_dir}: no frames for sequence {seq}")
    with SceneWriter(out, source="co3d", depth_units="co3d (scale_adjustment applied)",
                     overwrite=overwrite, depth_format=depth_format, extra={"converted_from": str(cat_dir), "sequence": seq,
                                                 "category": cat_dir.name}) as w:
        for e in entries:
            try:
                img_rel = e["image"]["path"]
                size = e["image"]["size"]
                vp = e["viewpoint"]
                K = ndc_to_pixels(vp["focal_length"], vp["principal_point"], size,
                                  vp.get("intrinsics_format", "ndc_norm_image_bounds"))
                cfw = pytorch3d_to_opencv(vp["R"], vp["T"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConvertError(f"{cat_dir}: sequence {seq} frame {e.get('frame_number')}: malformed "
                                   f"annotation ({err!r})") from None
            where = f"{cat_dir}: sequence {seq} frame {e.get('frame_number')}"
            check_rotation(cfw[:, :3], where)
            img = root / img_rel
            h, w_ = image_hw(img)
            if (h, w_) != (int(size[0]), int(size[1])):  # annotation made for another size
                K[0] *= w_ / float(size[1])
                K[1] *= h / float(size[0])
            d = _frame_depth(droot, e, where, use_depth_masks)
            image, K = fit_image_to_depth(img, K, d.shape)
            w.add_frame(img.name, image, d, K, cfw)
    return Path(out)
