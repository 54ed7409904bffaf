"""`gasp data check`: validate scenes with the very readers every other command uses (data/scene.py),
collecting every problem (scene, file, problem) instead of stopping at the first, plus dataset stats."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np

from gasp_vlm.data.scene import (SceneError, list_scene_dirs, read_cameras, read_depth, read_image_names, read_meta,
                                 read_image, read_objects)

T = TypeVar("T")


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
    """Validate one scene; every problem is a message "scene NAME: FILE: problem". Images are fully
    decoded (a truncated file fails here, not hours into training)."""
    path = Path(path)
    s = SceneSummary(path.name)

    def attempt(fn: Callable[..., T], *args) -> T | None:
        try:
            return fn(path, *args)
        except SceneError as e:
            s.problems.append(f"scene {path.name}: {e.file or path.name}: {e.problem or e}")
            return None

    meta = attempt(read_meta) or {}
    names = attempt(read_image_names)
    if names is None:
        return s
    s.frames = len(names)
    attempt(read_cameras, "intrinsics.npy", names)
    attempt(read_cameras, "cam_from_worlds.npy", names)
    valid = total = 0
    dmin, dmax = np.inf, 0.0
    has_objects = (path / "objects").is_dir()  # optional, but then one map per frame
    for name in names:
        if len(s.problems) >= max_problems:
            s.problems.append(f"scene {path.name}: ... (stopped after {max_problems} problems)")
            break
        rgb = attempt(read_image, name)
        hw = None if rgb is None else rgb.shape[:2]
        d = attempt(read_depth, name, hw, meta)
        ref_hw = hw if hw is not None else None if d is None else d.shape
        if has_objects and ref_hw is not None:
            attempt(read_objects, name, ref_hw)
        if d is None:
            continue
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
        s.problems.append(f"scene {path.name}: depths/: no valid depth in any frame")
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
    mixed = [s.name for s in good if len(s.resolutions) > 1]
    if mixed:  # fine: sampling resizes each frame to its anchor's size (data/sequences.py resize_view)
        lines.append(f"frames of several sizes in {len(mixed)} scene(s) ({', '.join(mixed[:5])}"
                     f"{' ...' if len(mixed) > 5 else ''}): each sample resizes them to its anchor frame's size")
    for s in summaries:
        lines.extend(s.problems)
    return "\n".join(lines)
