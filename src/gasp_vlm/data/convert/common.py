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
from gasp_vlm.io import read_png16 as io_read_png16
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
    """Raw (H, W) uint16 values of a 16-bit single-channel PNG (gasp_vlm.io.read_png16, ConvertError naming the file)."""
    try:
        return io_read_png16(path)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing depth file") from None
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None


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


def fit_image_to_depth(image: Path | np.ndarray, K: np.ndarray, depth_hw: tuple[int, int],
                       aspect_tol: float = 0.01) -> tuple[np.ndarray | Path, np.ndarray]:
    """Depth is the geometric ground truth, so never resample it: when the image (a path or an
    (H, W, 3) uint8 array) differs in size from the depth, resize the image (bicubic) to the depth size
    and scale K by the same factors. Returns (the image unchanged or resized as an array, its K)."""
    is_array = isinstance(image, np.ndarray)
    h, w = image.shape[:2] if is_array else image_hw(image)
    dh, dw = depth_hw
    if (h, w) == (dh, dw):
        return image, np.asarray(K, dtype=np.float64)
    sx, sy = dw / w, dh / h
    if abs(sx / sy - 1.0) > aspect_tol:
        raise ConvertError(f"{'an image' if is_array else image}: image {w}x{h} and its depth {dw}x{dh} have "
                           f"different aspect ratios (a crop, not a resize?); refusing to guess the alignment")
    if is_array:
        img = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize((dw, dh), Image.BICUBIC))
    else:
        with Image.open(image) as im:
            img = np.asarray(im.convert("RGB").resize((dw, dh), Image.BICUBIC))
    return img, scale_intrinsics(K, sx, sy)


def check_rotation(rot: np.ndarray, where: str) -> None:
    from gasp_vlm.geometry.cameras import is_rotation

    if not np.isfinite(rot).all():
        raise ConvertError(f"{where}: non-finite camera pose")
    if not is_rotation(rot, atol=1e-3):
        raise ConvertError(f"{where}: the pose's rotation is not a rotation matrix (scaled or sheared pose?)")


def read_matrix_txt(path: Path, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    """A whitespace-separated matrix file (ScanNet poses, intrinsics) -> float64 of ``shape``."""
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    except ValueError as e:
        raise ConvertError(f"{path}: not a whitespace-separated matrix ({e})") from None
    if m.shape != shape:
        raise ConvertError(f"{path}: shape {m.shape}, expected {shape}")
    return m


def read_pfm(path: Path) -> np.ndarray:
    """Portable float map (``Pf`` grey / ``PF`` colour; the scale's sign gives the byte order, rows are
    stored bottom to top) -> float32 (H, W) or (H, W, 3), top row first."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    lines, pos = [], 0
    for _ in range(3):  # magic, "W H", scale -- each ends with one newline
        end = raw.find(b"\n", pos)
        if end < 0:
            raise ConvertError(f"{path}: not a PFM file (truncated header)")
        lines.append(raw[pos:end].decode("ascii", "replace").strip())
        pos = end + 1
    magic = lines[0]
    if magic not in ("Pf", "PF"):
        raise ConvertError(f"{path}: not a PFM file (magic {magic!r})")
    try:
        w, h = (int(x) for x in lines[1].split())
        scale = float(lines[2])
    except ValueError:
        raise ConvertError(f"{path}: not a PFM file (bad header {lines[1:]!r})") from None
    c = 3 if magic == "PF" else 1
    data = np.frombuffer(raw[pos:], dtype="<f4" if scale < 0 else ">f4")
    if data.size != w * h * c:
        raise ConvertError(f"{path}: header says {w}x{h}x{c} values, file holds {data.size}")
    arr = data.reshape(h, w, c)[::-1]
    return np.ascontiguousarray(arr[..., 0] if c == 1 else arr, dtype=np.float32)


def write_pfm(path: Path, arr: np.ndarray) -> None:
    """float (H, W) -> little-endian grey PFM (the inverse of ``read_pfm``; for fixtures)."""
    a = np.asarray(arr, dtype="<f4")
    h, w = a.shape
    Path(path).write_bytes(f"Pf\n{w} {h}\n-1.0\n".encode() + np.ascontiguousarray(a[::-1]).tobytes())


def read_h5(path: Path, key: str) -> np.ndarray:
    """One dataset of an HDF5 file (MegaDepth depth, Hypersim images/cameras) -> numpy array."""
    try:
        import h5py
    except ImportError:
        raise ConvertError(f"{path}: reading HDF5 needs h5py: pip install 'gasp-vlm[data]'") from None
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise ConvertError(f"{path}: HDF5 file has no dataset {key!r} (has {sorted(f.keys())})")
            return np.asarray(f[key])
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing file") from None
    except OSError as e:
        raise ConvertError(f"{path}: unreadable HDF5 ({e})") from None


def subsample(items: list, frame_step: int = 1, max_frames: int | None = None) -> list:
    """Every ``frame_step``-th item, at most ``max_frames`` of them."""
    if frame_step < 1:
        raise ConvertError(f"frame_step must be >= 1, got {frame_step}")
    if max_frames is not None and max_frames < 1:
        raise ConvertError(f"max_frames must be >= 1, got {max_frames}")
    out = items[::frame_step]
    return out if max_frames is None else out[:max_frames]


def scene_dirs(root: Path, marker: str, pattern: str = "*") -> list[Path]:
    """Folders matching ``pattern`` under ``root`` that contain ``marker`` (a file or folder name),
    sorted; ``[root]`` when ``root`` itself contains it."""
    root = Path(root)
    if (root / marker).exists():
        return [root]
    return sorted(p for p in root.glob(pattern) if p.is_dir() and (p / marker).exists())
