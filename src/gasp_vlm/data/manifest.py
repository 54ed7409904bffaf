"""Sequence manifests: the paper-scale list of training sequences, written once, read per rank.

``build_manifest`` draws N sequences (source, scene, anchor, other frames) from dataset folders of
canonical scenes and writes them as parquet shards plus ``manifest.json``:

- Mixture: each source gets ``lengths[name]`` sequences when given (VGGT's fixed per-dataset length),
  else a share of N proportional to ``weights[name]`` (default: its frame count, i.e. every anchor of
  every dataset equally likely). Counts are rounded by largest remainder to sum to N.
- A sequence: anchor uniform over the source's frames (a scene thus ∝ its length); then the others in
  draw order, uniformly without replacement from the window |i - anchor| <= radius (as training's
  ``window_frames``; with replacement only when the window is too small). ``others`` always holds
  ``frames_max`` ids; ``num_frames`` = 1 + a count uniform in [frames_min, frames_max] (the paper's
  8-24 further frames). A reader needing n frames takes the anchor and the first n - 1 others.
- Row order is a seeded shuffle of the sources' rows, so any contiguous slice mixes the datasets.
- Deterministic: shard s is drawn by a generator seeded with (seed, s); the same inputs give the same
  bytes. ``manifest.json`` holds an ``id`` (sha256 over the spec, the scene lists and the shards) that a
  run records, so a resume can tell whether its manifest changed.

Columns: ``row`` int64, ``source`` int16 (index into manifest.json ``sources``), ``scene`` string,
``anchor`` int32, ``others`` list<int32>, ``num_frames`` int16. Written atomically (a hidden temp folder
renamed into place).

``ManifestGeometrySource`` is the trainer's geometry source over a manifest: rank r of W owns shards
s ≡ r (mod W) (rows i ≡ r (mod W) when there are fewer shards than ranks) and reads only those files;
scene metadata is loaded on first use (bounded cache), never for the whole collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from gasp_vlm.data.scene import Scene, SceneError, list_scene_dirs, read_image_names
from gasp_vlm.data.sequences import SNAP_MODES, SceneCache, load_views, sequence_targets
from gasp_vlm.data.targets import GRIDS, TokenTargets

if TYPE_CHECKING:
    from gasp_vlm.models.layout import TokenLayout

FORMAT = "gasp-manifest/1"


@dataclass(frozen=True)
class ManifestSpec:
    sequences: int
    frames_min: int = 8  # further frames besides the anchor (the paper: 8-24)
    frames_max: int = 24
    radius: int = 48
    seed: int = 0
    shard_rows: int = 16_384  # 107 shards at 1.75 M rows: every rank of a 32-GPU run reads only its own
    weights: dict[str, float] | None = None
    lengths: dict[str, int] | None = None

    def check(self, names: Sequence[str]) -> None:
        if self.sequences < 1 and not self.lengths:
            raise SceneError(f"--sequences must be >= 1, got {self.sequences}")
        if not 0 <= self.frames_min <= self.frames_max:
            raise SceneError(f"--frames {self.frames_min}-{self.frames_max}: need 0 <= min <= max")
        if self.radius < 1 or self.shard_rows < 1:
            raise SceneError("--radius and --shard-rows must be >= 1")
        for what, d in (("weights", self.weights), ("lengths", self.lengths)):
            unknown = sorted(set(d or {}) - set(names))
            if unknown:
                raise SceneError(f"--{what} names {unknown}, which are not sources (sources: {sorted(names)})")
            if d and any(v < 0 for v in d.values()):
                raise SceneError(f"--{what}: values must be >= 0")


def scan_source(root: Path) -> list[tuple[str, int]]:
    """(scene name, frame count) of every scene under ``root``, reading only image_names.json."""
    return [(d.name, len(read_image_names(d))) for d in list_scene_dirs(root)]


def _counts(spec: ManifestSpec, totals: dict[str, int]) -> dict[str, int]:
    names = list(totals)
    if spec.lengths:
        missing = [n for n in names if n not in spec.lengths]
        if missing:
            raise SceneError(f"--lengths must name every source (missing {missing})")
        return {n: int(spec.lengths[n]) for n in names}
    w = np.array([float((spec.weights or {}).get(n, totals[n] if not spec.weights else 0.0)) for n in names])
    if w.sum() <= 0:
        raise SceneError("the source weights sum to 0")
    raw = spec.sequences * w / w.sum()
    base = np.floor(raw).astype(np.int64)
    rest = spec.sequences - int(base.sum())
    base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1  # largest remainder
    return dict(zip(names, base.tolist()))


def _draw_rows(rng: np.random.Generator, scenes: list[tuple[str, int]], n: int, spec: ManifestSpec
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """n sequences of one source -> (scene index (n,), anchor (n,), others (n, frames_max), num_frames (n,))."""
    lens = np.array([c for _, c in scenes], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    g = rng.integers(0, starts[-1], n)
    sc = np.searchsorted(starts, g, side="right") - 1
    anchor = g - starts[sc]
    length = lens[sc]
    r, m = spec.radius, spec.frames_max
    offs = np.concatenate([np.arange(-r, 0), np.arange(1, r + 1)])  # (2r,) never the anchor
    cand = anchor[:, None] + offs[None, :]
    ok = (cand >= 0) & (cand < length[:, None])
    keys = np.where(ok, rng.random((n, offs.size)), np.inf)
    k = min(m, offs.size)  # a radius smaller than frames_max / 2 offers fewer candidates than slots
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]
    others = np.empty((n, m), dtype=np.int64)
    others[:, :k] = np.take_along_axis(cand, order, axis=1)
    n_ok = ok.sum(1)
    short = np.nonzero(n_ok < m)[0]
    for i in short:  # small window: the valid ones first, then repeats of them (with replacement)
        valid = others[i, : n_ok[i]]
        if valid.size == 0:
            others[i] = anchor[i]
        else:
            others[i, n_ok[i]:] = rng.choice(valid, size=m - n_ok[i], replace=True)
    num = 1 + rng.integers(spec.frames_min, spec.frames_max + 1, n)
    return sc, anchor, others, num


def build_manifest(sources: dict[str, Path], out: Path, spec: ManifestSpec, *, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write the manifest of ``spec`` over ``sources`` (name -> dataset folder) to ``out`` (atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not overwrite:
        raise SceneError(f"{out}: already exists (remove it or pass --overwrite)")
    spec.check(list(sources))
    scans = {name: scan_source(Path(root)) for name, root in sources.items()}
    for name, sc in scans.items():
        if not sc:
            raise SceneError(f"{sources[name]}: no scenes (source {name!r})")
    totals = {n: sum(c for _, c in sc) for n, sc in scans.items()}
    counts = _counts(spec, totals)
    names = list(sources)
    n_rows = int(sum(counts.values()))
    if n_rows < 1:
        raise SceneError("the manifest would hold no sequences")
    labels = np.repeat(np.arange(len(names), dtype=np.int16), [counts[n] for n in names])
    labels = np.random.default_rng([spec.seed, 0x5EED]).permutation(labels)

    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    digest = hashlib.sha256(json.dumps({"spec": asdict(spec), "scenes": scans}, sort_keys=True).encode())
    shards = []
    try:
        n_shards = -(-n_rows // spec.shard_rows)
        for s in tqdm(range(n_shards), desc="manifest", unit="shard", disable=not progress or n_shards < 2):
            a, b = s * spec.shard_rows, min(n_rows, (s + 1) * spec.shard_rows)
            rng = np.random.default_rng([spec.seed, s])
            lab = labels[a:b]
            scene = np.empty(b - a, dtype=object)
            anchor = np.zeros(b - a, np.int32)
            others = np.zeros((b - a, spec.frames_max), np.int32)
            num = np.zeros(b - a, np.int16)
            for si, name in enumerate(names):
                sel = np.nonzero(lab == si)[0]
                if sel.size == 0:
                    continue
                sc, an, ot, nf = _draw_rows(rng, scans[name], sel.size, spec)
                scene[sel] = [scans[name][k][0] for k in sc]
                anchor[sel], others[sel], num[sel] = an, ot, nf
            table = pa.table({
                "row": pa.array(np.arange(a, b, dtype=np.int64)),
                "source": pa.array(lab.astype(np.int16)),
                "scene": pa.array(scene.tolist(), type=pa.string()).dictionary_encode(),
                "anchor": pa.array(anchor),
                "others": pa.FixedSizeListArray.from_arrays(pa.array(others.ravel()), spec.frames_max),
                "num_frames": pa.array(num),
            })
            fname = f"shard-{s:05d}.parquet"
            pq.write_table(table, tmp / fname, compression="zstd")
            digest.update((tmp / fname).read_bytes())
            shards.append({"file": fname, "rows": b - a, "first_row": a})
        meta = {"format": FORMAT, "id": digest.hexdigest()[:16], "spec": asdict(spec), "rows": n_rows,
                "sources": [{"name": n, "root": str(Path(sources[n]).resolve()), "scenes": len(scans[n]),
                             "frames": totals[n], "rows": counts[n]} for n in names],
                "shards": shards}
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest_meta(path: Path) -> dict:
    p = Path(path) / "manifest.json"
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise SceneError(f"{p}: missing file (not a manifest folder; make one with `gasp data manifest`)") from None
    except json.JSONDecodeError as e:
        raise SceneError(f"{p}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise SceneError(f"{p}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_shard(path: Path) -> dict[str, np.ndarray]:
    """One parquet shard -> row, source, anchor (n,), scene (n,) object, others (n, frames_max)."""
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path, columns=["row", "source", "scene", "anchor", "others"])
    except (OSError, ValueError) as e:
        raise SceneError(f"{path}: unreadable manifest shard ({e})") from None
    return {"row": t["row"].to_numpy(), "source": t["source"].to_numpy(),
            "scene": np.asarray(t["scene"].to_pylist(), dtype=object), "anchor": t["anchor"].to_numpy(),
            "others": np.asarray(t["others"].combine_chunks().flatten()).reshape(t.num_rows, -1)}


def owned_shards(n_shards: int, rank: int, world: int) -> tuple[list[int], bool]:
    """(shards rank reads, whether it must further keep only rows i ≡ rank mod world)."""
    if n_shards >= world:
        return list(range(rank, n_shards, world)), False
    return list(range(n_shards)), True


class ManifestGeometrySource:
    """The trainer's geometry source over a manifest (module doc), for one rank of ``world``.

    ``per_rank``: the stream asks ``stream_index(local position, seed)`` instead of shuffling global
    indices: epoch 0 takes this rank's rows in manifest order (so the manifest *is* the list of what
    the run trained on), later epochs reshuffle them."""

    per_rank = True

    def __init__(self, path: str | os.PathLike, rank: int = 0, world: int = 1, grid: str = "coarse",
                 fine_per_token: int = 2, rel_tol: float = 0.05, min_valid_fraction: float = 0.5,
                 anchors: str = "one", snap_queries: str = "auto", scene_cache: int = 256) -> None:
        if grid not in GRIDS or snap_queries not in SNAP_MODES:
            raise ValueError(f"grid must be one of {GRIDS} and snap_queries one of {SNAP_MODES}")
        self.path = Path(path)
        self.meta = read_manifest_meta(self.path)
        self.id, self.total = self.meta["id"], int(self.meta["rows"])
        self.roots = [Path(s["root"]) for s in self.meta["sources"]]
        self.settings = dict(grid=grid, fine_per_token=fine_per_token, rel_tol=rel_tol,
                             min_valid_fraction=min_valid_fraction, anchors=anchors, snap_queries=snap_queries)
        shards, stride = owned_shards(len(self.meta["shards"]), rank, world)
        parts = [read_shard(self.path / self.meta["shards"][s]["file"]) for s in shards]
        self.rows = np.concatenate([p["row"] for p in parts])
        self.source = np.concatenate([p["source"] for p in parts])
        self.scene = np.concatenate([p["scene"] for p in parts])
        self.anchor = np.concatenate([p["anchor"] for p in parts])
        self.others = np.concatenate([p["others"] for p in parts])
        if stride:
            keep = self.rows % world == rank
            self.rows, self.source, self.scene = self.rows[keep], self.source[keep], self.scene[keep]
            self.anchor, self.others = self.anchor[keep], self.others[keep]
        if len(self.rows) == 0:
            raise SceneError(f"{self.path}: rank {rank} of {world} owns no rows ({self.total} in the manifest)")
        self._scenes = SceneCache(scene_cache)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> str:
        return f"ManifestGeometrySource({self.path}, id={self.id}, rows={self.total}, {self.settings})"

    def stream_index(self, pos: int, seed: int) -> int:
        from gasp_vlm.train.stream import _permutation_key, shuffled_index

        epoch, off = divmod(int(pos), len(self))
        return off if epoch == 0 else shuffled_index(off, len(self), _permutation_key(seed, epoch))

    def scene_of(self, i: int) -> Scene:
        return self._scenes.get(self.roots[int(self.source[i])] / str(self.scene[i]))

    def frame_ids(self, i: int, num_frames: int) -> tuple[list[int], int]:
        """(frame ids in temporal order, anchor position) of local row i with ``num_frames`` frames."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        others = self.others[i].tolist()
        k = num_frames - 1
        take = (others * (-(-k // len(others)) if others else 0))[:k]  # cycle when asked for more
        order = sorted(take)
        a = int(self.anchor[i])
        pos = int(np.searchsorted(order, a))
        return order[:pos] + [a] + order[pos:], pos

    def sample(self, index: int, num_frames: int) -> dict[str, Any]:
        sc = self.scene_of(index)
        ids, pos = self.frame_ids(index, num_frames)
        if max(ids) >= sc.num_frames:
            raise SceneError(f"{sc.path}: manifest {self.path} row {int(self.rows[index])} names frame {max(ids)} "
                             f"but the scene has {sc.num_frames} (the scene changed after the manifest was made)")
        item = load_views(sc, ids, pos, lambda kind, j: getattr(sc, kind)(j), index)
        item["manifest_row"] = int(self.rows[index])
        return item

    def targets(self, layout: "TokenLayout", item: dict) -> TokenTargets:
        return sequence_targets(layout, item, **self.settings)


def check_manifest(path: str | os.PathLike, max_problems: int = 20) -> tuple[dict, list[str]]:
    """Before a long run: every scene a manifest names exists under its source root and holds every
    frame its rows use (image_names.json only, no images read). Returns (summary, problems)."""
    path = Path(path)
    meta = read_manifest_meta(path)
    roots = [Path(s["root"]) for s in meta["sources"]]
    need: dict[tuple[int, str], int] = {}
    rows = 0
    for sh in meta["shards"]:
        t = read_shard(path / sh["file"])
        top = np.maximum(t["anchor"], t["others"].max(axis=1))
        for s_, sc, m in zip(t["source"].tolist(), t["scene"], top.tolist()):
            key = (s_, sc)
            need[key] = max(need.get(key, -1), m)
        rows += len(t["row"])
    problems: list[str] = []
    for (s_, sc), top in sorted(need.items()):
        d = roots[s_] / sc
        try:
            n = len(read_image_names(d))
        except SceneError as e:
            problems.append(f"{meta['sources'][s_]['name']}: {e}")
            continue
        if top >= n:
            problems.append(f"{d}: the manifest uses frame {top}, the scene has {n} frames (changed since?)")
        if len(problems) >= max_problems:
            problems.append(f"... (stopped after {max_problems} problems)")
            break
    if rows != meta["rows"]:
        problems.append(f"{path}: manifest.json says {meta['rows']} rows, the shards hold {rows}")
    return {"id": meta["id"], "rows": rows, "scenes": len(need), "shards": len(meta["shards"])}, problems
