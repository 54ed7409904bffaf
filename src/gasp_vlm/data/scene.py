"""The canonical scene format (gasp-scene/1): read, write, validate.

```
<scene>/
  scene.json            {"format": "gasp-scene/1", "source": ..., "depth_units": ..., ...}
  image_names.json      ordered list of file names; the order defines the frame index
  images/<name>         RGB png/jpg
  depths/<stem>.npy     float32 (H, W) z-depth along the optical axis; 0 = invalid
  intrinsics.npy        (N, 3, 3) pixels; pixel (col, row) has its centre at (col+0.5, row+0.5)
  cam_from_worlds.npy   (N, 3, 4) OpenCV axes (x right, y down, z forward)
  objects/<stem>.npy    optional int16 (H, W) per-pixel object id (synthetic scenes; -1 = none)
```
A dataset is a folder of scenes (or a single scene folder). Cameras follow geometry/cameras.py.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from gasp_vlm.geometry.cameras import is_rotation

FORMAT = "gasp-scene/1"
REQUIRED_META = ("format", "source", "depth_units")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class SceneError(ValueError):
    """A user-facing problem with scene data (message names the scene/file and the problem)."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SceneError(f"{path}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SceneError(f"{path}: not valid JSON ({e})") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SceneError(f"{path}: missing file") from None
    except (ValueError, OSError, EOFError) as e:
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except OSError:
            magic = b""
        why = "not a .npy file" if magic != b"\x93NUMPY" else f"corrupt or pickled data ({e})"
        raise SceneError(f"{path}: unreadable .npy: {why}") from None


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise SceneError(f"{path}: missing file") from None
    except OSError as e:
        raise SceneError(f"{path}: unreadable image ({e})") from None


class Scene:
    """One scene in the canonical format. Cameras load eagerly (small); images/depths lazily per frame."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SceneError(f"{self.path}: not a scene directory")
        self.meta: dict = _read_json(self.path / "scene.json")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise SceneError(f"{self.path / 'scene.json'}: format is not {FORMAT!r}")
        names = _read_json(self.path / "image_names.json")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
            raise SceneError(f"{self.path / 'image_names.json'}: expected a non-empty list of file names")
        self.image_names: list[str] = names
        self.intrinsics = _read_npy(self.path / "intrinsics.npy").astype(np.float64)  # (N, 3, 3)
        self.cam_from_worlds = _read_npy(self.path / "cam_from_worlds.npy").astype(np.float64)  # (N, 3, 4)
        n = len(names)
        for fname, arr, shape in (("intrinsics.npy", self.intrinsics, (n, 3, 3)),
                                  ("cam_from_worlds.npy", self.cam_from_worlds, (n, 3, 4))):
            if arr.shape != shape:
                raise SceneError(f"{self.path / fname}: shape {arr.shape}, expected {shape} "
                                 f"({n} frames in image_names.json)")

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
        return self.path / "depths" / f"{self.stem(i)}.npy"

    def objects_path(self, i: int) -> Path:
        return self.path / "objects" / f"{self.stem(i)}.npy"

    def image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB of frame i."""
        return read_rgb(self.image_path(i))

    def depth(self, i: int) -> np.ndarray:
        """(H, W) float32 z-depth of frame i (0 = invalid)."""
        d = _read_npy(self.depth_path(i))
        if d.ndim != 2:
            raise SceneError(f"{self.depth_path(i)}: depth has shape {d.shape}, expected (H, W)")
        return d.astype(np.float32, copy=False)

    def objects(self, i: int) -> np.ndarray | None:
        """(H, W) int16 per-pixel object id of frame i, or None when the scene has no object maps."""
        p = self.objects_path(i)
        return _read_npy(p) if p.exists() else None

    @property
    def has_objects(self) -> bool:
        return (self.path / "objects").is_dir()

    def image_hw(self, i: int = 0) -> tuple[int, int]:
        """(H, W) of frame i from the image header (no decoding)."""
        return self.read_hw(self.image_path(i))

    @staticmethod
    def read_hw(path: Path) -> tuple[int, int]:
        """(H, W) of an image file from its header."""
        try:
            with Image.open(path) as im:
                return im.size[1], im.size[0]
        except FileNotFoundError:
            raise SceneError(f"{path}: missing file") from None
        except OSError as e:
            raise SceneError(f"{path}: unreadable image ({e})") from None


def load_scene(path: str | os.PathLike) -> Scene:
    """Open a canonical scene folder (raises SceneError on a malformed scene.json/cameras)."""
    return Scene(path)


def is_scene_dir(path: Path) -> bool:
    return (path / "scene.json").is_file()


def list_scene_dirs(root: str | os.PathLike) -> list[Path]:
    """Scene folders of a dataset, sorted by name; ``root`` itself if it is a scene. Hidden folders
    (e.g. unfinished temporary scenes) are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise SceneError(f"{root}: not a directory")
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
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise SceneError(f"{self.path}: already exists (remove it or choose another output)")
        self.overwrite = overwrite
        self.meta = {"format": FORMAT, "source": source, "depth_units": depth_units, **(extra or {})}
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
        if not np.isfinite(depth).all() or (depth < 0).any():
            # The format has one invalid marker; converters must map NaN/inf/negative to 0 themselves.
            raise SceneError(f"{name}: depth has NaN/inf or negative values (write 0 for invalid depth)")
        if isinstance(image, np.ndarray):
            if image.ndim == 2:  # grey -> RGB, the format's only colour layout
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.dtype != np.uint8:
                raise SceneError(f"{name}: image dtype {image.dtype}, expected uint8 RGB")
            if image.shape != (*depth.shape, 3):
                raise SceneError(f"{name}: image shape {image.shape} does not match depth {depth.shape} "
                                 "(want (H, W, 3))")
        else:
            hw = Scene.read_hw(Path(image))
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
        np.save(self.tmp / "depths" / f"{stem}.npy", np.ascontiguousarray(depth, dtype=np.float32))
        if objects is not None:
            (self.tmp / "objects").mkdir(exist_ok=True)
            np.save(self.tmp / "objects" / f"{stem}.npy", np.ascontiguousarray(objects, dtype=np.int16))
        self.names.append(name)
        self.Ks.append(np.asarray(K, dtype=np.float64).reshape(3, 3))
        self.extrinsics.append(np.asarray(cam_from_world, dtype=np.float64)[:3, :4])

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
                objects: Sequence[np.ndarray] | None = None, overwrite: bool = False) -> Path:
    """Write a whole scene from in-memory arrays (atomically). Default names: 000000.png, ..."""
    names = list(names) if names is not None else [f"{i:06d}.png" for i in range(len(images))]
    with SceneWriter(path, source=source, depth_units=depth_units, extra=extra, overwrite=overwrite) as w:
        for i, name in enumerate(names):
            w.add_frame(name, images[i], depths[i], intrinsics[i], cam_from_worlds[i],
                        None if objects is None else objects[i])
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@dataclass
class SceneSummary:
    name: str
    frames: int = 0
    resolutions: set = field(default_factory=set)  # {(H, W)}
    valid_depth_fraction: float = 0.0
    depth_range: tuple[float, float] = (0.0, 0.0)
    valid_pixels: int = 0
    total_pixels: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_scene(path: str | os.PathLike, *, max_problems: int = 20) -> SceneSummary:
    """Validate one scene; every problem is a message naming scene, file and problem."""
    path = Path(path)
    s = SceneSummary(path.name)

    def bad(file: str, problem: str) -> None:
        s.problems.append(f"scene {path.name}: {file}: {problem}")

    meta_p = path / "scene.json"
    if not meta_p.is_file():
        bad("scene.json", "missing file")
    else:
        try:
            meta = _read_json(meta_p)
            if not isinstance(meta, dict):
                bad("scene.json", "expected a JSON object")
            elif meta.get("format") != FORMAT:
                bad("scene.json", f"'format' is {meta.get('format')!r}, must be {FORMAT!r}")
            else:
                missing = [k for k in REQUIRED_META if k not in meta]
                if missing:
                    bad("scene.json", f"missing keys {missing}")
        except SceneError as e:
            bad("scene.json", str(e).split(": ", 1)[-1])
    try:
        names = _read_json(path / "image_names.json")
    except SceneError as e:
        bad("image_names.json", str(e).split(": ", 1)[-1])
        return s
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        bad("image_names.json", "expected a non-empty list of file names")
        return s
    if len(set(names)) != len(names):
        bad("image_names.json", "duplicate names")
    odd = [nm for nm in names if Path(nm).name != nm or Path(nm).suffix.lower() not in IMAGE_EXTS]
    if odd:
        bad("image_names.json", f"{odd[0]!r}: names must be plain file names ending in one of {IMAGE_EXTS}")
    odd_set = set(odd)
    n = len(names)
    s.frames = n
    for fname, shape in (("intrinsics.npy", (n, 3, 3)), ("cam_from_worlds.npy", (n, 3, 4))):
        try:
            arr = _read_npy(path / fname)
        except SceneError as e:
            bad(fname, str(e).split(": ", 1)[-1])
            continue
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            bad(fname, f"dtype {arr.dtype} is not numeric")
            continue
        arr = arr.astype(np.float64)
        if arr.shape != shape:
            what = "wrong frame count: " if arr.ndim == 3 and arr.shape[1:] == shape[1:] else ""
            bad(fname, f"{what}shape {arr.shape}, expected {shape} ({n} images in image_names.json)")
            continue
        if not np.isfinite(arr).all():
            bad(fname, f"non-finite values in frames {np.flatnonzero(~np.isfinite(arr).all(axis=(1, 2)))[:5].tolist()}")
            continue
        if fname == "intrinsics.npy":
            wrong = np.flatnonzero((arr[:, 0, 0] <= 0) | (arr[:, 1, 1] <= 0) | (np.abs(arr[:, 2] - [0, 0, 1]).max(1) > 1e-6)
                                   | (np.abs(arr[:, 1, 0]) > 1e-6) | (np.abs(arr[:, 0, 1]) > 1e-6))
            if wrong.size:
                bad(fname, f"frame {int(wrong[0])} ({names[wrong[0]]}): not a pinhole K with fx, fy > 0 and zero skew")
        else:
            wrong = [i for i in range(n) if not is_rotation(arr[i, :, :3], atol=1e-3)]
            if wrong:
                bad(fname, f"frame {wrong[0]} ({names[wrong[0]]}): rotation part is not a rotation matrix "
                           f"({len(wrong)} of {n} frames)")
    valid = total = 0
    dmin, dmax = np.inf, 0.0
    has_objects = (path / "objects").is_dir()  # optional, but then one map per frame
    for i, name in enumerate(names):
        if len(s.problems) >= max_problems:
            s.problems.append(f"scene {path.name}: ... (stopped after {max_problems} problems)")
            break
        if name in odd_set:  # never follow such a name outside the scene folder
            continue
        img_p = path / "images" / name
        try:
            with Image.open(img_p) as im:
                hw = (im.size[1], im.size[0])
        except FileNotFoundError:
            bad(f"images/{name}", "missing file")
            hw = None
        except OSError as e:
            bad(f"images/{name}", f"unreadable image ({e})")
            hw = None
        stem = Path(name).stem
        dfile = f"depths/{stem}.npy"
        try:
            d = _read_npy(path / dfile)
        except SceneError as e:
            bad(dfile, str(e).split(": ", 1)[-1])
            continue
        if d.ndim != 2 or d.dtype != np.float32:
            bad(dfile, f"expected a float32 (H, W) array, got {d.dtype} with shape {d.shape}")
            continue
        if hw is not None and d.shape != hw:
            bad(dfile, f"shape mismatch: depth {d.shape} vs image {hw} (H, W)")
        finite = np.isfinite(d)
        if not finite.all():
            bad(dfile, f"{int((~finite).sum())} NaN/inf depth values (use 0 for invalid)")
            continue
        if (d < 0).any():
            bad(dfile, f"{int((d < 0).sum())} negative depth values (use 0 for invalid)")
        if has_objects:
            ofile = f"objects/{stem}.npy"
            try:
                o = _read_npy(path / ofile)
                if o.shape != d.shape:
                    bad(ofile, f"shape mismatch: objects {o.shape} vs depth {d.shape}")
                elif o.dtype != np.int16:
                    bad(ofile, f"dtype {o.dtype}, expected int16 object ids")
                elif o.size and o.min() < -1:
                    bad(ofile, "object ids below -1 (-1 = no object)")
            except SceneError as e:
                bad(ofile, str(e).split(": ", 1)[-1])
        s.resolutions.add(d.shape)
        pos = d > 0
        valid += int(pos.sum())
        total += d.size
        if pos.any():
            dmin, dmax = min(dmin, float(d[pos].min())), max(dmax, float(d[pos].max()))
    s.valid_pixels, s.total_pixels = valid, total
    s.valid_depth_fraction = valid / total if total else 0.0
    s.depth_range = (float(dmin) if np.isfinite(dmin) else 0.0, dmax)
    if total and valid == 0:
        bad("depths/", "no valid depth in any frame")
    return s


def check_dataset(root: str | os.PathLike) -> list[SceneSummary]:
    """Validate every scene of a dataset folder (or one scene folder)."""
    dirs = list_scene_dirs(root)
    if not dirs:
        raise SceneError(f"{root}: no scene folders found")
    return [check_scene(d) for d in dirs]


def format_summary(summaries: Iterable[SceneSummary], max_rows: int = 50) -> str:
    """Human summary: a table (scene, frames, resolution, valid-depth %, status; broken scenes always
    listed, at most ``max_rows`` ok ones), the totals over ok scenes, then every problem."""
    summaries = list(summaries)
    good = [s for s in summaries if s.ok]

    def res_str(resolutions: set) -> str:
        res = sorted(resolutions)
        return ", ".join(f"{w}x{h}" for h, w in res[:3]) + (" ..." if len(res) > 3 else "") or "-"

    rows = [s for s in summaries if not s.ok] + good[:max_rows]
    rows.sort(key=lambda s: s.name)
    width = max([len("scene")] + [len(s.name) for s in rows])
    lines = [f"{'scene':<{width}}  {'frames':>6}  {'resolution (WxH)':<16}  {'valid depth':>11}  status"]
    for s in rows:
        status = "ok" if s.ok else f"BROKEN ({len(s.problems)} problem{'s' * (len(s.problems) != 1)})"
        lines.append(f"{s.name:<{width}}  {s.frames:>6}  {res_str(s.resolutions):<16}  "
                     f"{100 * s.valid_depth_fraction:>10.1f}%  {status}")
    if len(good) > max_rows:
        lines.append(f"... {len(good) - max_rows} more ok scenes")
    frames = sum(s.frames for s in good)
    total_px = sum(s.total_pixels for s in good)
    frac = sum(s.valid_pixels for s in good) / total_px if total_px else 0.0
    lines += ["", f"scenes: {len(summaries)} ({len(good)} ok, {len(summaries) - len(good)} broken)",
              f"frames: {frames} (ok scenes)",
              f"resolution (WxH): {res_str(set().union(*[s.resolutions for s in good])) if good else '-'}",
              f"valid depth: {100 * frac:.1f}% of pixels"]
    if good:
        lo = min(s.depth_range[0] for s in good)
        hi = max(s.depth_range[1] for s in good)
        lines.append(f"depth range: {lo:.3g} .. {hi:.3g}")
    for s in summaries:
        lines.extend(s.problems)
    return "\n".join(lines)
