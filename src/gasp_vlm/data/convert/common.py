"""Shared pieces of the dataset converters: depth readers, K scaling, errors naming the file.

Depth readers return float32 (H, W) z-depth with 0 for invalid (non-finite and negative values are
zeroed). Pixel convention of geometry/cameras.py (centres at +0.5), under which scaling K by the
resize factors is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gasp_vlm.data.scene import SceneError
from gasp_vlm.geometry.cameras import scale_intrinsics

DEPTH_EXTS = (".npy", ".png", ".geometric.bin")


class ConvertError(SceneError):
    """A user-facing conversion problem; the message names the file and the problem."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def image_hw(path: Path) -> tuple[int, int]:
    """(H, W) from an image header."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing image") from None
    except OSError as e:
        raise ConvertError(f"{path}: unreadable image ({e})") from None


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing image") from None
    except OSError as e:
        raise ConvertError(f"{path}: unreadable image ({e})") from None


def read_png16(path: Path) -> np.ndarray:
    """Raw (H, W) uint16 values of a 16-bit single-channel PNG."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                raise ConvertError(f"{path}: expected a 16-bit single-channel PNG, got mode {im.mode!r}")
            arr = np.array(im)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing depth file") from None
    except OSError as e:
        raise ConvertError(f"{path}: unreadable PNG ({e})") from None
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
        raise ConvertError(f"{path}: values outside the 16-bit range")
    return arr.astype(np.uint16)


def write_png16(path: Path, values: np.ndarray) -> None:
    """(H, W) uint16 -> 16-bit PNG (for fixtures and exports)."""
    Image.fromarray(np.ascontiguousarray(values, dtype=np.uint16)).save(path)


def clean_depth(d: np.ndarray) -> np.ndarray:
    """float32 copy with non-finite and negative values set to 0 (the canonical 'invalid')."""
    d = np.array(d, dtype=np.float32)
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d


def read_colmap_array(path: Path) -> np.ndarray:
    """COLMAP dense ``*.geometric.bin`` / ``*.photometric.bin``: text header ``W&H&C&`` then float32
    little-endian values as a Fortran-order (W, H, C) array (x fastest: one channel plane after
    another, each row-major) -> (H, W) or (H, W, C) float32."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing depth file") from None
    pos, fields = 0, []
    for _ in range(3):
        amp = raw.find(b"&", pos)
        if amp < 0 or amp - pos > 20:
            raise ConvertError(f"{path}: not a COLMAP array (expected a 'width&height&channels&' header)")
        fields.append(raw[pos:amp])
        pos = amp + 1
    try:
        w, h, c = (int(f) for f in fields)
    except ValueError:
        raise ConvertError(f"{path}: not a COLMAP array (bad header {b'&'.join(fields)!r})") from None
    data = np.frombuffer(raw[pos:], dtype="<f4")
    if data.size != w * h * c:
        raise ConvertError(f"{path}: header says {w}x{h}x{c} values, file holds {data.size}")
    arr = data.reshape((w, h, c), order="F").transpose(1, 0, 2)
    return np.ascontiguousarray(arr[..., 0] if c == 1 else arr, dtype=np.float32)


def write_colmap_array(path: Path, arr: np.ndarray) -> None:
    """(H, W) or (H, W, C) float32 -> COLMAP array file (the inverse of ``read_colmap_array``)."""
    a = np.asarray(arr, dtype="<f4")
    a = a[..., None] if a.ndim == 2 else a
    h, w, c = a.shape
    Path(path).write_bytes(f"{w}&{h}&{c}&".encode() + a.transpose(1, 0, 2).flatten(order="F").tobytes())


def find_depth_file(depth_dir: Path, image_name: str) -> Path:
    """The user's depth file of an image: ``<stem>.npy``, ``<stem>.png``, or COLMAP's
    ``<name>.geometric.bin`` / ``<stem>.geometric.bin`` (first found, in that order)."""
    stem = Path(image_name).stem
    name = Path(image_name).name
    for cand in (f"{stem}.npy", f"{stem}.png", f"{name}.geometric.bin", f"{stem}.geometric.bin"):
        p = depth_dir / cand
        if p.is_file():
            return p
    raise ConvertError(f"{depth_dir}: no depth for image {name!r} (looked for {stem}.npy, {stem}.png, "
                       f"{name}.geometric.bin, {stem}.geometric.bin)")


def read_user_depth(path: Path, depth_scale: float = 1000.0) -> np.ndarray:
    """A user depth file -> float32 (H, W) z-depth. ``.npy``: values as stored; 16-bit ``.png``:
    value / depth_scale (Open3D convention, e.g. 1000 for millimetres -> metres); COLMAP
    ``.geometric.bin``: values as stored (COLMAP's scale = the poses' scale)."""
    path = Path(path)
    if path.name.endswith(".bin"):
        d = read_colmap_array(path)
    elif path.suffix == ".npy":
        try:
            d = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ConvertError(f"{path}: unreadable .npy ({e})") from None
    elif path.suffix == ".png":
        if not depth_scale > 0:
            raise ConvertError(f"{path}: depth_scale must be > 0, got {depth_scale}")
        d = read_png16(path).astype(np.float64) / depth_scale
    else:
        raise ConvertError(f"{path}: unknown depth format (use .npy, 16-bit .png or COLMAP .geometric.bin)")
    d = np.squeeze(np.asarray(d))
    if d.ndim != 2:
        raise ConvertError(f"{path}: depth has shape {np.shape(d)}, expected (H, W)")
    return clean_depth(d)


def fit_image_to_depth(image_path: Path, K: np.ndarray, depth_hw: tuple[int, int],
                       aspect_tol: float = 0.01) -> tuple[np.ndarray | Path, np.ndarray]:
    """Depth is the geometric ground truth, so never resample it: when the image size differs from the
    depth size, resize the image (bicubic) to the depth size and scale K by the same factors.
    Returns (image path unchanged or resized (H, W, 3) uint8 array, K of the returned image)."""
    h, w = image_hw(image_path)
    dh, dw = depth_hw
    if (h, w) == (dh, dw):
        return image_path, np.asarray(K, dtype=np.float64)
    sx, sy = dw / w, dh / h
    if abs(sx / sy - 1.0) > aspect_tol:
        raise ConvertError(f"{image_path}: image {w}x{h} and its depth {dw}x{dh} have different aspect ratios "
                           f"(a crop, not a resize?); refusing to guess the alignment")
    with Image.open(image_path) as im:
        img = np.asarray(im.convert("RGB").resize((dw, dh), Image.BICUBIC))
    return img, scale_intrinsics(K, sx, sy)


def check_rotation(rot: np.ndarray, where: str) -> None:
    from gasp_vlm.geometry.cameras import is_rotation

    if not np.isfinite(rot).all():
        raise ConvertError(f"{where}: non-finite camera pose")
    if not is_rotation(rot, atol=1e-3):
        raise ConvertError(f"{where}: the pose's rotation is not a rotation matrix (scaled or sheared pose?)")
