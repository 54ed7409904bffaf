"""Training sequences from a folder of canonical scenes (data/scene.py), as in the GASP paper.

Sampling: an anchor frame, then further frames drawn uniformly *without replacement* from the window
|i - anchor| <= radius (default 48) inside the scene (with replacement only when the window holds
fewer frames than asked for, as VGGT's ``get_nearby_ids`` always does). Everything is a pure function
of (seed, index): the same seed gives the same sequence in any process or DataLoader worker, and the
global numpy/torch RNGs are never touched.

Index space: scene k contributes one index per anchor ``range(0, n_frames_k, anchor_stride)``;
index -> (scene, anchor) in scene-name order.

Frame order in a sample: temporal (ascending frame id, the anchor at its place; ``anchor_first=True``
puts it first, as VGGT does). ``num_frames`` counts every frame of the sample, the anchor included
(the trainer's protocol, train/stream.py); the paper's 8-24 further frames are num_frames 9-25.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from gasp_vlm.data.scene import Scene, SceneError, list_scene_dirs, load_scene, read_image_names
from gasp_vlm.data.targets import GRIDS, TokenTargets, build_multi_anchor_targets, build_token_targets

if TYPE_CHECKING:
    from gasp_vlm.models.layout import TokenLayout


def window_frames(n_frames: int, anchor: int, count: int, radius: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` further frame ids (int64) drawn uniformly from |i - anchor| <= radius, i != anchor, inside
    [0, n_frames). Without replacement when the window is large enough, else with replacement; a
    one-frame scene repeats the anchor. Prefix-stable: a larger count extends a smaller one."""
    if count <= 0:
        return np.zeros(0, np.int64)
    lo, hi = max(0, anchor - radius), min(n_frames - 1, anchor + radius)
    cand = np.array([i for i in range(lo, hi + 1) if i != anchor], dtype=np.int64)
    if cand.size == 0:
        return np.full(count, anchor, np.int64)
    if cand.size >= count:
        return rng.permutation(cand)[:count]
    return rng.choice(cand, size=count, replace=True)


def resize_view(image: np.ndarray, depth: np.ndarray, objects: np.ndarray | None, K: np.ndarray,
                hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """One view resized to ``hw`` = (H, W): image bicubic; depth and object ids nearest (a depth is a
    measurement, never blended across an edge); K scaled by (W/w, H/h), exact with pixel centres at
    +0.5 (geometry/cameras.py). Non-uniform when the aspect ratios differ (a stretch, still a pinhole)."""
    from PIL import Image

    from gasp_vlm.geometry.cameras import scale_intrinsics

    h0, w0 = depth.shape
    h, w = int(hw[0]), int(hw[1])
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    # nearest: the source pixel that contains each new pixel centre
    rows = np.minimum(((np.arange(h) + 0.5) * h0 / h).astype(np.int64), h0 - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * w0 / w).astype(np.int64), w0 - 1)
    d = np.ascontiguousarray(depth[rows[:, None], cols[None, :]])
    obj = None if objects is None else np.ascontiguousarray(objects[rows[:, None], cols[None, :]])
    return img, d, obj, scale_intrinsics(K, w / w0, h / h0)


class SceneCache:
    """Scenes loaded (and checked) on first use, the ``size`` most recently used kept in memory."""

    def __init__(self, size: int = 256) -> None:
        self._cache: OrderedDict[Path, Scene] = OrderedDict()
        self._size = int(size)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, path: Path) -> Scene:
        sc = self._cache.get(path)
        if sc is None:
            sc = self._cache[path] = load_scene(path)
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        return sc


class LazyScenes:
    """Scenes of a dataset by position, loaded on first use (``SceneCache``); ``frames`` and ``names``
    come from each scene's image_names.json / folder name up front."""

    def __init__(self, dirs: Sequence[Path], cache: int = 256) -> None:
        self.dirs = list(dirs)
        self.names = [d.name for d in self.dirs]
        self.frames = [len(read_image_names(d)) for d in self.dirs]
        self._scenes = SceneCache(cache)

    def __len__(self) -> int:
        return len(self.dirs)

    def __getitem__(self, k: int) -> Scene:
        return self._scenes.get(self.dirs[k])

    def __iter__(self):
        return (self[k] for k in range(len(self)))


# "one": the paper's single anchor frame per sequence; "all": every frame an anchor in turn.
ANCHOR_MODES = ("one", "all")
SNAP_MODES = ("auto", "on", "off")
SPARSE_MIN_VALID = 1e-9  # sparse depth: a token's depth is the mean of whatever points it holds


class GeometrySequenceSource:
    """Map-style geometry source over a dataset folder (the trainer's source protocol, train/stream.py).

    ``sample(index, num_frames)`` -> dict(kind="geo", frames=[(H, W, 3) uint8], depths=[(H, W) float32],
    K=(F, 3, 3), cam_from_world=(F, 3, 4), scene=name, frame_ids=[int], anchor=position of the anchor in
    the lists, objects=[(H, W) int16] or None, meta=scene.json dict, index=index).
    ``targets(layout, item)`` -> TokenTargets (data/targets.py) for the model's layout of that item.
    """

    def __init__(self, root: str | os.PathLike, frames_window: int = 48, grid: str = "coarse", seed: int = 0,
                 anchor_stride: int = 1, fine_per_token: int = 2, anchor_first: bool = False,
                 rel_tol: float = 0.05, min_valid_fraction: float = 0.5, anchors: str = "one",
                 cache_frames: bool = False, forward_stride: int | None = None, snap_queries: str = "auto") -> None:
        # forward_stride: the paper's diagnostic clip (§5.3) instead of a window sample -- the anchor is the
        # clip's first frame and the others follow it at anchor + s, + 2s, ... (gaps that grow along the
        # clip); a clip that would run past the scene's end starts earlier, so it ends on the last frame, and
        # a scene too short for s apart uses the largest step that fits (gaps are recorded per pair)
        # cache_frames: keep decoded images/depths/object maps in memory (small datasets, e.g. the demo's:
        # PNG decoding otherwise costs as much as a tiny model's training step)
        self._cache: dict[tuple[int, str, int], np.ndarray] | None = {} if cache_frames else None
        # snap_queries: "auto" moves depthless queries to valid pixels of their token (and pools token depth
        # over any valid pixel) only in scenes whose depth is sparse (scene.json depth_source "sparse",
        # e.g. DL3DV from SfM points); "on" / "off" force it everywhere / nowhere
        if snap_queries not in SNAP_MODES:
            raise ValueError(f"snap_queries must be one of {SNAP_MODES}, got {snap_queries!r}")
        self.snap_queries = snap_queries
        if anchors not in ANCHOR_MODES:
            raise ValueError(f"anchors must be one of {ANCHOR_MODES}, got {anchors!r}")
        self.anchors = anchors
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
        if frames_window < 1 or anchor_stride < 1:
            raise ValueError(f"frames_window and anchor_stride must be >= 1 (got {frames_window}, {anchor_stride})")
        self.root = Path(root)
        # only the frame counts are read up front (image_names.json); a scene's cameras load on first use
        self.scenes = LazyScenes(list_scene_dirs(self.root))
        if not len(self.scenes):
            raise SceneError(f"{self.root}: no scenes found")
        self.radius, self.grid, self.seed = int(frames_window), grid, int(seed)
        self.anchor_stride, self.fine_per_token = int(anchor_stride), int(fine_per_token)
        self.anchor_first, self.rel_tol, self.min_valid_fraction = anchor_first, rel_tol, min_valid_fraction
        if forward_stride is not None and forward_stride < 1:
            raise ValueError(f"forward_stride must be >= 1, got {forward_stride}")
        self.forward_stride = forward_stride
        counts = [-(-n // self.anchor_stride) for n in self.scenes.frames]  # ceil
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def describe(self) -> str:
        """Everything that determines the items (used in diagnostics' resume fingerprints)."""
        return (f"GeometrySequenceSource(root={self.root}, scenes={self.scenes.names}, seed={self.seed}, "
                f"radius={self.radius}, grid={self.grid}, fine_per_token={self.fine_per_token}, "
                f"anchor_stride={self.anchor_stride}, anchor_first={self.anchor_first}, rel_tol={self.rel_tol}, "
                f"min_valid_fraction={self.min_valid_fraction}, forward_stride={self.forward_stride}, "
                f"snap_queries={self.snap_queries})")

    def __repr__(self) -> str:
        return f"GeometrySequenceSource({str(self.root)!r}, {len(self.scenes)} scenes, {len(self)} sequences)"

    def locate(self, index: int) -> tuple[int, int]:
        """index -> (scene position, anchor frame id)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range ({len(self)} sequences)")
        k = int(np.searchsorted(self._starts, index, side="right") - 1)
        return k, int(index - self._starts[k]) * self.anchor_stride

    def distinct_frames(self, index: int) -> int:
        """How many distinct frames sample ``index`` can hold: its anchor plus every other frame of the
        window |i - anchor| <= radius inside the scene. A ``num_frames`` above this repeats frames
        (``window_frames`` then samples with replacement, fine for training, wrong for a diagnostic)."""
        k, anchor = self.locate(index)
        if self.forward_stride:
            return self.scenes.frames[k]
        lo, hi = max(0, anchor - self.radius), min(self.scenes.frames[k] - 1, anchor + self.radius)
        return hi - lo + 1

    def frame_ids(self, index: int, num_frames: int) -> tuple[int, list[int], int]:
        """(scene position, frame ids in sample order, anchor position) of sample ``index``."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        k, anchor = self.locate(index)
        if self.forward_stride:
            n = self.scenes.frames[k]
            step = max(1, min(self.forward_stride, (n - 1) // max(num_frames - 1, 1)))
            start = max(0, min(anchor, n - 1 - (num_frames - 1) * step))
            return k, [min(n - 1, start + j * step) for j in range(num_frames)], 0
        rng = np.random.default_rng([self.seed, int(index)])
        others = window_frames(self.scenes.frames[k], anchor, num_frames - 1, self.radius, rng)
        if self.anchor_first:
            ids = [anchor, *others.tolist()]
            return k, ids, 0
        order = sorted(others.tolist())
        pos = int(np.searchsorted(order, anchor))  # anchor before any repeat of an equal id
        return k, order[:pos] + [anchor] + order[pos:], pos

    def _read(self, k: int, kind: str, i: int) -> np.ndarray:
        if self._cache is None:
            return getattr(self.scenes[k], kind)(i)
        key = (k, kind, i)
        if key not in self._cache:
            self._cache[key] = getattr(self.scenes[k], kind)(i)
        return self._cache[key]

    def sample(self, index: int, num_frames: int) -> dict[str, Any]:
        """Frames of a scene may differ in size: every frame is brought to the anchor frame's (H, W) by
        ``resize_view`` (intrinsics scaled exactly), so a sample always has one size."""
        k, ids, pos = self.frame_ids(index, num_frames)
        return load_views(self.scenes[k], ids, pos, lambda kind, i: self._read(k, kind, i), index)

    def targets(self, layout: "TokenLayout", item: dict) -> TokenTargets:
        return sequence_targets(layout, item, grid=self.grid, fine_per_token=self.fine_per_token,
                                rel_tol=self.rel_tol, min_valid_fraction=self.min_valid_fraction,
                                anchors=self.anchors, snap_queries=self.snap_queries)


def load_views(sc: Scene, ids: Sequence[int], pos: int, read, index: int) -> dict[str, Any]:
    """The source item of frames ``ids`` of scene ``sc`` (anchor at ``pos``); ``read(kind, i)`` reads
    ``image`` / ``depth`` / ``objects`` of frame i (possibly cached). Frames of another size than the
    anchor's are resized to it (``resize_view``), so an item always has one size."""
    frames = [read("image", i) for i in ids]
    depths = [read("depth", i) for i in ids]
    objects = [read("objects", i) for i in ids] if sc.has_objects else None
    K = sc.intrinsics[list(ids)].copy()
    hw = frames[pos].shape[:2]
    for j in range(len(ids)):
        if frames[j].shape[:2] != hw:
            frames[j], depths[j], obj, K[j] = resize_view(frames[j], depths[j], None if objects is None
                                                          else objects[j], K[j], hw)
            if objects is not None:
                objects[j] = obj
    return dict(kind="geo", frames=frames, depths=depths, K=K, cam_from_world=sc.cam_from_worlds[list(ids)].copy(),
                scene=sc.name, frame_ids=list(ids), anchor=pos, objects=objects, meta=dict(sc.meta), index=index)


def sequence_targets(layout: "TokenLayout", item: dict, *, grid: str, fine_per_token: int, rel_tol: float,
                     min_valid_fraction: float, anchors: str, snap_queries: str) -> TokenTargets:
    """TokenTargets of a source item under a source's settings (see GeometrySequenceSource)."""
    sparse = snap_queries == "on" or (snap_queries == "auto"
                                      and (item.get("meta") or {}).get("depth_source") == "sparse")
    kw = dict(grid=grid, fine_per_token=fine_per_token, rel_tol=rel_tol,
              min_valid_fraction=SPARSE_MIN_VALID if sparse and snap_queries == "auto" else min_valid_fraction,
              snap_queries=sparse)
    if anchors == "all":  # every frame an anchor in turn (more pairs per step; training only)
        a = int(item["anchor"])
        order = [a] + [f for f in range(len(item["frames"])) if f != a]
        return build_multi_anchor_targets(layout, item["depths"], item["K"], item["cam_from_world"], order, **kw)
    return build_token_targets(layout, item["depths"], item["K"], item["cam_from_world"],
                               anchor_frame=int(item["anchor"]), **kw)


class GeometrySequenceDataset(torch.utils.data.Dataset):
    """Torch Dataset over a source: item i = ``source.sample(i, n)`` with n drawn from
    ``num_frames`` (an int, or an inclusive (min, max) range) by a generator seeded with (seed, i)
    -- worker-safe and reproducible (no global RNG)."""

    def __init__(self, source: GeometrySequenceSource, num_frames: int | tuple[int, int] = (9, 25),
                 seed: int = 0) -> None:
        self.source = source
        lo, hi = (num_frames, num_frames) if isinstance(num_frames, int) else num_frames
        if not 1 <= lo <= hi:
            raise ValueError(f"num_frames range must satisfy 1 <= min <= max, got {num_frames}")
        self.frames_range, self.seed = (int(lo), int(hi)), int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def num_frames(self, index: int) -> int:
        lo, hi = self.frames_range
        return int(np.random.default_rng([self.seed, int(index), 1]).integers(lo, hi + 1))

    def __getitem__(self, index: int) -> dict:
        return self.source.sample(int(index), self.num_frames(index))


class SequenceCollator:
    """Batch of source items -> dict(prepared=PreparedBatch, targets=[TokenTargets], items=[dict]).

    Runs ``adapter.prepare_frames`` (tokeniser + pixel processing only) and the target builder, so it can
    run inside DataLoader workers; frames of a batch must share one size per sample (the adapter's rule).
    """

    def __init__(self, adapter, source: GeometrySequenceSource, prompt: str | None = None,
                 frame_mode: str | None = None) -> None:
        self.adapter, self.source, self.prompt, self.frame_mode = adapter, source, prompt, frame_mode

    def __call__(self, items: Sequence[dict]) -> dict:
        prepared = self.adapter.prepare_frames([it["frames"] for it in items], prompt=self.prompt,
                                               frame_mode=self.frame_mode)
        targets = [self.source.targets(lay, it) for lay, it in zip(prepared.layouts, items)]
        return dict(prepared=prepared, targets=targets, items=list(items))
