"""The canonical scene format (gasp-scene/1): reading, with the one validation every command runs.

```
<scene>/
  scene.json            {"format": "gasp-scene/1", "source": ..., "depth_units": ..., ...}
  image_names.json      ordered list of file names; the order defines the frame index
  images/<name>         RGB png/jpg
  depths/<stem>.npy     float32 (H, W) z-depth along the optical axis; 0 = invalid -- or, as scene.json
                        "depth_format" says: float16 .npy, or png16 = depths/<stem>.png uint16 holding
                        round(depth * depth_png_scale) (0 = invalid); readers return float32 either way
  intrinsics.npy        (N, 3, 3) pixels; pixel (col, row) has its centre at (col+0.5, row+0.5)
  cam_from_worlds.npy   (N, 3, 4) OpenCV axes (x right, y down, z forward)
  objects/<stem>.npy    optional int16 (H, W) per-pixel object id (synthetic scenes; -1 = none)
```
A dataset is a folder of scenes (or a single scene folder). Cameras follow geometry/cameras.py.

Every reader here checks what it reads and raises a SceneError naming the file (scene folder + file
name, never a frame's position in some clip). ``Scene`` checks the per-scene files when opened and
each frame's files when read, so `data tracks`, `diagnose` and training refuse exactly what
`data check` (data/scene_check.py, which calls these same readers) reports. ``SceneWriter`` writes
scenes atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
from PIL import Image

from gasp_vlm.geometry.cameras import is_rotation
from gasp_vlm.io import read_png16

FORMAT = "gasp-scene/1"
REQUIRED_META = ("format", "source", "depth_units")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class SceneError(ValueError):
    """A user-facing problem with scene data. ``file`` (relative to the scene folder) and ``problem``
    are set when the problem is one file's, so a checker can collect them per scene."""

    def __init__(self, message: str, *, file: str | None = None, problem: str | None = None) -> None:
        super().__init__(message)
        self.file, self.problem = file, problem


def _fail(scene_dir: Path, file: str, problem: str) -> NoReturn:
    raise SceneError(f"{scene_dir / file}: {problem}", file=file, problem=problem)


# ---------------------------------------------------------------------------------------------
# File readers (scene_dir, file relative to it) -> checked content
# ---------------------------------------------------------------------------------------------
def _read_json(scene_dir: Path, file: str) -> Any:
    try:
        return json.loads((scene_dir / file).read_text())
    except FileNotFoundError:
        _fail(scene_dir, file, "missing file")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(scene_dir, file, f"not valid JSON ({e})")


def _read_npy(scene_dir: Path, file: str) -> np.ndarray:
    path = scene_dir / file
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        _fail(scene_dir, file, "missing file")
    except (ValueError, OSError, EOFError) as e:
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except OSError:
            magic = b""
        why = "not a .npy file" if magic != b"\x93NUMPY" else f"corrupt, truncated or pickled data ({e})"
        _fail(scene_dir, file, f"unreadable .npy: {why}")


def _open_image(scene_dir: Path, file: str, decode: bool) -> Any:
    try:
        with Image.open(scene_dir / file) as im:
            return np.asarray(im.convert("RGB")) if decode else (im.size[1], im.size[0])
    except FileNotFoundError:
        _fail(scene_dir, file, "missing file")
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports broken PNG chunks as SyntaxError
        _fail(scene_dir, file, f"unreadable image ({e})")


def read_image(scene_dir: Path, name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``images/<name>``, fully decoded (a file truncated after its header fails)."""
    return _open_image(scene_dir, f"images/{name}", decode=True)


def read_image_hw(scene_dir: Path, name: str) -> tuple[int, int]:
    """(H, W) of ``images/<name>`` from its header (no decoding)."""
    return _open_image(scene_dir, f"images/{name}", decode=False)


def read_hw(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of any image file from its header."""
    path = Path(path)
    return _open_image(path.parent, path.name, decode=False)


def read_meta(scene_dir: Path) -> dict:
    meta = _read_json(scene_dir, "scene.json")
    if not isinstance(meta, dict):
        _fail(scene_dir, "scene.json", "expected a JSON object")
    if meta.get("format") != FORMAT:
        _fail(scene_dir, "scene.json", f"'format' is {meta.get('format')!r}, must be {FORMAT!r}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        _fail(scene_dir, "scene.json", f"missing keys {missing}")
    fmt = meta.get("depth_format", "float32")
    if fmt not in DEPTH_FORMATS:
        _fail(scene_dir, "scene.json", f"'depth_format' is {fmt!r}, must be one of {DEPTH_FORMATS}")
    if fmt == "png16" and not (isinstance(meta.get("depth_png_scale"), (int, float)) and meta["depth_png_scale"] > 0):
        _fail(scene_dir, "scene.json", "png16 depth needs a positive 'depth_png_scale'")
    return meta


def read_image_names(scene_dir: Path) -> list[str]:
    names = _read_json(scene_dir, "image_names.json")
    file = "image_names.json"
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        _fail(scene_dir, file, "expected a non-empty list of file names")
    if len(set(names)) != len(names):
        _fail(scene_dir, file, "duplicate names")
    odd = [nm for nm in names if Path(nm).name != nm or Path(nm).suffix.lower() not in IMAGE_EXTS]
    if odd:  # never follow such a name outside the scene folder
        _fail(scene_dir, file, f"{odd[0]!r}: names must be plain file names ending in one of {IMAGE_EXTS}")
    return names


def read_cameras(scene_dir: Path, file: str, names: list[str]) -> np.ndarray:
    """float64 (N, 3, 3) intrinsics.npy or (N, 3, 4) cam_from_worlds.npy, checked: pinhole K with
    fx, fy > 0 and zero skew; a proper rotation (det +1) in every pose."""
    n = len(names)
    shape = (n, 3, 3) if file == "intrinsics.npy" else (n, 3, 4)
    arr = _read_npy(scene_dir, file)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        _fail(scene_dir, file, f"dtype {arr.dtype} is not numeric")
    arr = arr.astype(np.float64)
    if arr.shape != shape:
        what = "wrong frame count: " if arr.ndim == 3 and arr.shape[1:] == shape[1:] else ""
        _fail(scene_dir, file, f"{what}shape {arr.shape}, expected {shape} ({n} images in image_names.json)")
    if not np.isfinite(arr).all():
        _fail(scene_dir, file, f"non-finite values in frames {np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2)))[:5].tolist()}")
    if file == "intrinsics.npy":
        wrong = np.flatnonzero((arr[:, 0, 0] <= 0) | (arr[:, 1, 1] <= 0) | (np.abs(arr[:, 2] - [0, 0, 1]).max(1) > 1e-6)
                               | (np.abs(arr[:, 1, 0]) > 1e-6) | (np.abs(arr[:, 0, 1]) > 1e-6))
        if wrong.size:
            _fail(scene_dir, file, f"frame {int(wrong[0])} ({names[wrong[0]]}): not a pinhole K with fx, fy > 0 "
                                   "and zero skew")
    else:
        wrong = [i for i in range(n) if not is_rotation(arr[i, :, :3], atol=1e-3)]
        if wrong:
            _fail(scene_dir, file, f"frame {wrong[0]} ({names[wrong[0]]}): rotation part is not a rotation matrix "
                                   f"({len(wrong)} of {n} frames)")
    return arr


def depth_values_problem(d: np.ndarray) -> str | None:
    """The format has one invalid marker (0): NaN/inf/negative values are errors, not 'invalid'."""
    finite = np.isfinite(d)
    if not finite.all():
        return f"{int((~finite).sum())} NaN/inf depth values (use 0 for invalid)"
    if (d < 0).any():
        return f"{int((d < 0).sum())} negative depth values (use 0 for invalid)"
    return None


DEPTH_FORMATS = ("float32", "float16", "png16")


def parse_depth_format(text: str) -> tuple[str, float | None]:
    """``float32`` | ``float16`` | ``png16[:SCALE]`` (values per depth unit, default 1000: mm for metres)."""
    kind, _, scale = str(text).partition(":")
    if kind not in DEPTH_FORMATS or (scale and kind != "png16"):
        raise SceneError(f"depth format {text!r}: use float32, float16 or png16[:SCALE]")
    if kind != "png16":
        return kind, None
    try:
        s = float(scale) if scale else 1000.0
    except ValueError:
        raise SceneError(f"depth format {text!r}: SCALE must be a number") from None
    if not s > 0:
        raise SceneError(f"depth format {text!r}: SCALE must be > 0")
    return kind, s


def depth_file(meta: dict, name: str) -> str:
    return f"depths/{Path(name).stem}.{'png' if meta.get('depth_format') == 'png16' else 'npy'}"


def read_depth(scene_dir: Path, name: str, image_hw: tuple[int, int] | None, meta: dict | None = None) -> np.ndarray:
    """float32 (H, W) z-depth of image ``name``, checked against its image's (H, W) when given; ``meta``
    (scene.json) says how it is stored (float32 when absent)."""
    meta = meta or {}
    file = depth_file(meta, name)
    if meta.get("depth_format") == "png16":
        d = _read_png16(scene_dir, file) / np.float32(meta.get("depth_png_scale", 1000.0))
    else:
        d = _read_npy(scene_dir, file)
        want = np.float16 if meta.get("depth_format") == "float16" else np.float32
        if d.ndim != 2 or d.dtype != want:
            _fail(scene_dir, file, f"expected a {np.dtype(want).name} (H, W) array, got {d.dtype} with shape {d.shape}")
        d = d.astype(np.float32, copy=False)
    if image_hw is not None and d.shape != tuple(image_hw):
        _fail(scene_dir, file, f"shape mismatch: depth {d.shape} vs image {tuple(image_hw)} (H, W)")
    problem = depth_values_problem(d)
    if problem:
        _fail(scene_dir, file, problem)
    return d


def _read_png16(scene_dir: Path, file: str) -> np.ndarray:
    try:
        return read_png16(scene_dir / file).astype(np.float32)
    except FileNotFoundError:
        _fail(scene_dir, file, "missing file")
    except ValueError as e:
        _fail(scene_dir, file, str(e))


def read_objects(scene_dir: Path, name: str, hw: tuple[int, int]) -> np.ndarray:
    """int16 (H, W) object ids of image ``name`` (-1 = none); ``hw`` is its frame's (H, W)."""
    file = f"objects/{Path(name).stem}.npy"
    o = _read_npy(scene_dir, file)
    if o.shape != tuple(hw):
        _fail(scene_dir, file, f"shape mismatch: objects {o.shape} vs frame {tuple(hw)} (H, W)")
    if o.dtype != np.int16:
        _fail(scene_dir, file, f"dtype {o.dtype}, expected int16 object ids")
    if o.size and o.min() < -1:
        _fail(scene_dir, file, "object ids below -1 (-1 = no object)")
    return o


# ---------------------------------------------------------------------------------------------
# A scene
# ---------------------------------------------------------------------------------------------
class Scene:
    """One scene in the canonical format. Metadata and cameras load (and are checked) eagerly; images,
    depths and object maps lazily per frame, checked as they are read."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SceneError(f"{self.path}: not a scene directory")
        self.meta: dict = read_meta(self.path)
        self.image_names: list[str] = read_image_names(self.path)
        self.intrinsics = read_cameras(self.path, "intrinsics.npy", self.image_names)  # (N, 3, 3)
        self.cam_from_worlds = read_cameras(self.path, "cam_from_worlds.npy", self.image_names)  # (N, 3, 4)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def num_frames(self) -> int:
        return len(self.image_names)

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        return f"Scene({str(self.path)!r}, frames={self.num_frames})"

    def stem(self, i: int) -> str:
        return Path(self.image_names[i]).stem

    def image_path(self, i: int) -> Path:
        return self.path / "images" / self.image_names[i]

    def depth_path(self, i: int) -> Path:
        return self.path / depth_file(self.meta, self.image_names[i])

    def objects_path(self, i: int) -> Path:
        return self.path / "objects" / f"{self.stem(i)}.npy"

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of frame i."""
        return read_image(self.path, self.image_names[i])

    def depth(self, i: int) -> np.ndarray:
        """(H, W) float32 z-depth of frame i (0 = invalid), checked against the image's size."""
        return read_depth(self.path, self.image_names[i], self.image_hw(i), self.meta)

    def objects(self, i: int) -> np.ndarray | None:
        """(H, W) int16 per-pixel object id of frame i, or None when the scene has no object maps."""
        if not self.has_objects:
            return None
        return read_objects(self.path, self.image_names[i], self.image_hw(i))

    @property
    def has_objects(self) -> bool:
        return (self.path / "objects").is_dir()

    def image_hw(self, i: int = 0) -> tuple[int, int]:
        """(H, W) of frame i from the image header (no decoding)."""
        return read_image_hw(self.path, self.image_names[i])


def load_scene(path: str | os.PathLike) -> Scene:
    """Open a canonical scene folder (raises SceneError naming the file on any malformed part)."""
    return Scene(path)


def is_scene_dir(path: Path) -> bool:
    return (path / "scene.json").is_file()


def list_scene_dirs(root: str | os.PathLike) -> list[Path]:
    """Scene folders of a dataset, sorted by name; ``root`` itself if it is a scene. Hidden folders
    (e.g. unfinished temporary scenes) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise SceneError(f"{root}: not a directory" if root.exists() else f"{root}: no such directory")
    if is_scene_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# Writing (atomic: a hidden temp folder next to the destination, renamed when complete)
# ---------------------------------------------------------------------------------------------
class SceneWriter:
    """Write one scene frame by frame; the folder appears only when ``close()`` succeeds.

    ```
    with SceneWriter(out_dir, source="synth", depth_units="m") as w:
        w.add_frame("000000.png", image, depth, K, cam_from_world)
    ```
    An exception inside the ``with`` removes the temporary folder, so no partial scene is left behind.
    """

    def __init__(self, path: str | os.PathLike, *, source: str, depth_units: str, extra: dict | None = None,
                 overwrite: bool = False, depth_format: str = "float32") -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise SceneError(f"{self.path}: already exists (remove it or choose another output)")
        self.overwrite = overwrite
        # depth_format: float32 (exact) | float16 (half the bytes, ~5e-4 relative error) | png16[:SCALE]
        # (16-bit PNG of round(depth * SCALE), default 1000 = mm for metres; values above 65535 / SCALE refused)
        self.depth_kind, self.depth_scale = parse_depth_format(depth_format)
        self.meta = {"format": FORMAT, "source": source, "depth_units": depth_units, **(extra or {})}
        if self.depth_kind != "float32":
            self.meta["depth_format"] = self.depth_kind
        if self.depth_scale is not None:
            self.meta["depth_png_scale"] = self.depth_scale
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"
        (self.tmp / "images").mkdir(parents=True)
        (self.tmp / "depths").mkdir()
        self.names: list[str] = []
        self.Ks: list[np.ndarray] = []
        self.extrinsics: list[np.ndarray] = []
        self._closed = False

    def add_frame(self, name: str, image: np.ndarray | str | os.PathLike, depth: np.ndarray, K: np.ndarray,
                  cam_from_world: np.ndarray, objects: np.ndarray | None = None) -> None:
        """Add frame ``name`` (a plain file name; its order is the frame index).

        ``image``: (H, W, 3) uint8 array (encoded by ``name``'s extension) or a path copied verbatim;
        ``depth`` (H, W) z-depth with 0 = invalid; K (3, 3); cam_from_world (3, 4) or (4, 4) OpenCV;
        ``objects`` optional (H, W) integer ids (-1 = none), stored as int16."""
        if Path(name).suffix.lower() not in IMAGE_EXTS:
            raise SceneError(f"{name}: image names must end in one of {IMAGE_EXTS}")
        if Path(name).name != name:
            raise SceneError(f"{name}: image names must be plain file names (no folders)")
        if name in self.names:
            raise SceneError(f"{name}: duplicate image name")
        stem = Path(name).stem
        depth = np.asarray(depth)
        if depth.ndim != 2:
            raise SceneError(f"{name}: depth must be (H, W), got shape {depth.shape}")
        problem = depth_values_problem(depth)
        if problem:  # converters must map NaN/inf/negative to 0 themselves
            raise SceneError(f"{name}: {problem}")
        if isinstance(image, np.ndarray):
            if image.ndim == 2:  # grey -> RGB, the format's only colour layout
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.dtype != np.uint8:
                raise SceneError(f"{name}: image dtype {image.dtype}, expected uint8 RGB")
            if image.shape != (*depth.shape, 3):
                raise SceneError(f"{name}: image shape {image.shape} does not match depth {depth.shape} "
                                 "(want (H, W, 3))")
        else:
            hw = read_hw(image)
            if hw != depth.shape:
                raise SceneError(f"{image}: image size (H, W) {hw} does not match depth {depth.shape}")
        if objects is not None and np.shape(objects) != depth.shape:
            raise SceneError(f"{name}: objects shape {np.shape(objects)} does not match depth {depth.shape}")
        if np.shape(K) != (3, 3) or np.shape(cam_from_world)[-2:] not in ((3, 4), (4, 4)):
            raise SceneError(f"{name}: K must be (3, 3) and cam_from_world (3, 4) or (4, 4)")
        dst = self.tmp / "images" / name
        if isinstance(image, np.ndarray):
            kw = {"quality": 95} if dst.suffix.lower() in (".jpg", ".jpeg") else {"compress_level": 6}
            Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(dst, **kw)
        else:
            shutil.copyfile(image, dst)
        self._write_depth(name, depth)
        if objects is not None:
            (self.tmp / "objects").mkdir(exist_ok=True)
            np.save(self.tmp / "objects" / f"{stem}.npy", np.ascontiguousarray(objects, dtype=np.int16))
        self.names.append(name)
        self.Ks.append(np.asarray(K, dtype=np.float64).reshape(3, 3))
        self.extrinsics.append(np.asarray(cam_from_world, dtype=np.float64)[:3, :4])

    def _write_depth(self, name: str, depth: np.ndarray) -> None:
        stem = Path(name).stem
        if self.depth_kind == "png16":
            from PIL import Image

            q = np.round(np.asarray(depth, np.float64) * self.depth_scale)
            if q.max(initial=0) > 65535:
                raise SceneError(f"{name}: depth {float(depth.max()):.4g} exceeds the png16 range at scale "
                                 f"{self.depth_scale:g} (max {65535 / self.depth_scale:.4g}); use a smaller "
                                 "png16:SCALE or float16")
            Image.fromarray(q.astype(np.uint16)).save(self.tmp / "depths" / f"{stem}.png")
        else:
            dtype = np.float16 if self.depth_kind == "float16" else np.float32
            if dtype == np.float16 and float(np.max(depth, initial=0)) > 65504:
                raise SceneError(f"{name}: depth {float(depth.max()):.4g} overflows float16; use float32")
            np.save(self.tmp / "depths" / f"{stem}.npy", np.ascontiguousarray(depth, dtype=dtype))

    def close(self) -> Path:
        if self._closed:
            return self.path
        if not self.names:
            self.abort()
            raise SceneError(f"{self.path}: no frames to write")
        old = None
        try:
            (self.tmp / "scene.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
            (self.tmp / "image_names.json").write_text(json.dumps(self.names, indent=0) + "\n")
            # float64: float32 rotations already cost ~1e-4 px at 500 px focal length.
            np.save(self.tmp / "intrinsics.npy", np.stack(self.Ks))
            np.save(self.tmp / "cam_from_worlds.npy", np.stack(self.extrinsics))
            if self.path.exists():
                if not self.overwrite:
                    raise SceneError(f"{self.path}: already exists (remove it or choose another output)")
                # Move the old scene aside first, so a failure never leaves neither version in place.
                old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
        except BaseException:
            if old is not None and old.exists() and not self.path.exists():
                os.replace(old, self.path)  # put the previous version back
            self.abort()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> "SceneWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_scene(path: str | os.PathLike, images: Sequence[np.ndarray], depths: Sequence[np.ndarray],
                intrinsics: np.ndarray, cam_from_worlds: np.ndarray, *, names: Sequence[str] | None = None,
                source: str = "unknown", depth_units: str = "m", extra: dict | None = None,
                objects: Sequence[np.ndarray] | None = None, overwrite: bool = False,
                depth_format: str = "float32") -> Path:
    """Write a whole scene from in-memory arrays (atomically). Default names: 000000.png, ..."""
    names = list(names) if names is not None else [f"{i:06d}.png" for i in range(len(images))]
    with SceneWriter(path, source=source, depth_units=depth_units, extra=extra, overwrite=overwrite,
                     depth_format=depth_format) as w:
        for i, name in enumerate(names):
            w.add_frame(name, images[i], depths[i], intrinsics[i], cam_from_worlds[i],
                        None if objects is None else objects[i])
    return Path(path)
