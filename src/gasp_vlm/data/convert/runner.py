"""Convert a whole dataset: scenes in parallel, sharded for cluster array jobs, resumable.

Each dataset module provides ``scenes(src, **opts) -> list[SceneJob]`` (what SRC holds) and
``convert(job.src, out_scene, **opts)`` (one scene, written atomically by SceneWriter). This module
only schedules: it sorts the jobs by name (so ``--shard i/n`` is the same split on every machine),
skips scenes whose output is complete (``scene.json`` is written last), runs the rest in
``workers`` processes, and collects per-scene failures instead of stopping at the first.
"""

from __future__ import annotations

import inspect
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from gasp_vlm.data.convert.common import ConvertError
from gasp_vlm.data.scene import SceneError


@dataclass(frozen=True)
class SceneJob:
    """One scene to convert. ``name`` is its output folder under ``out``; ``name=None`` means SRC is a
    single scene written at ``out`` itself. ``src`` is whatever the dataset's ``convert`` takes."""

    name: str | None
    src: Any


@dataclass(frozen=True)
class Dataset:
    name: str
    scenes: Callable[..., list[SceneJob]]
    convert: Callable[..., Path]
    layout: str  # one line: the input layout SRC may point at

    def options(self) -> set[str]:
        """Keyword options ``convert`` / ``scenes`` accept (what the CLI may pass to this dataset)."""
        return _keywords(self.scenes) | _keywords(self.convert)


@dataclass
class ConvertReport:
    dataset: str
    src: str
    out: str
    shard: tuple[int, int]
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    single_scene: bool = False  # SRC was one scene, written at ``out`` itself

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "src": self.src, "out": self.out, "shard": f"{self.shard[0]}/{self.shard[1]}",
                "converted": self.converted, "skipped": self.skipped, "failed": self.failed,
                "seconds": round(self.seconds, 2)}


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n -> (i, n)."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConvertError(f"--shard must look like i/n (e.g. 3/16), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConvertError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _keywords(fn: Callable) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}


def _split_options(ds: Dataset, options: dict) -> tuple[dict, dict]:
    scene_keys, conv_keys = _keywords(ds.scenes), _keywords(ds.convert)
    return ({k: v for k, v in options.items() if k in scene_keys},
            {k: v for k, v in options.items() if k in conv_keys})


def _convert_one(ds: Dataset, job: SceneJob, dst: Path, opts: dict) -> tuple[str, str | None]:
    """Worker body: never raises for a scene problem, so one bad scene cannot stop the others."""
    try:
        ds.convert(job.src, dst, **opts)
        return str(dst), None
    except (SceneError, OSError, ValueError, KeyError, IndexError) as e:
        return str(dst), f"{type(e).__name__}: {e}" if not isinstance(e, SceneError) else str(e)


def convert_dataset(ds: Dataset, src: Path, out: Path, *, workers: int = 1, shard: tuple[int, int] = (0, 1),
                    overwrite: bool = False, progress: bool = True, **options: Any) -> ConvertReport:
    """Convert every scene of ``src`` into ``out`` (see the module doc). Unknown options raise."""
    unknown = set(options) - ds.options()
    if unknown:
        raise ConvertError(f"{ds.name}: options {sorted(unknown)} do not apply (it takes: "
                         f"{', '.join(sorted(ds.options() - {'overwrite'})) or 'none'})")
    scene_opts, conv_opts = _split_options(ds, options)
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    jobs = sorted(ds.scenes(src, **scene_opts), key=lambda j: j.name or "")
    if not jobs:
        raise ConvertError(f"{src}: no {ds.name} scenes found (expected {ds.layout})")
    i, n = shard
    jobs = jobs[i::n]
    report = ConvertReport(ds.name, str(src), str(out), shard, single_scene=len(jobs) == 1 and jobs[0].name is None)
    todo: list[tuple[SceneJob, Path]] = []
    for job in jobs:
        dst = out if job.name is None else out / job.name
        if (dst / "scene.json").is_file() and not overwrite:
            report.skipped.append(str(dst))
        else:
            todo.append((job, dst))
    if overwrite and "overwrite" in ds.options():
        conv_opts["overwrite"] = True
    bar = tqdm(total=len(todo), desc=f"convert {ds.name}", unit="scene", disable=not progress or len(todo) < 2)
    if workers <= 1 or len(todo) <= 1:
        results = []
        for job, dst in todo:
            results.append(_convert_one(ds, job, dst, conv_opts))
            bar.update()
    else:
        results = []
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(_convert_one, ds, job, dst, conv_opts) for job, dst in todo]
            for f in as_completed(futs):
                results.append(f.result())
                bar.update()
    bar.close()
    for dst, err in sorted(results):
        if err is None:
            report.converted.append(dst)
        else:
            report.failed[dst] = err
    report.seconds = time.perf_counter() - t0
    return report
