"""Deterministic, resumable per-step batches: every micro-batch a geometry part, plus an instruction part.

Everything a step loads is a pure function of (seed, step, rank, world size), so the data state of
a checkpoint is just the step, ``--resume`` replays nothing, and all ranks agree on the parts and
frame counts of every micro-batch (same module calls everywhere: DDP/ZeRO never wait on each other).

- Parts: micro-batch i holds a geometry part (when a geometry source is configured) and, iff
  floor((i+1)·ρ) > floor(i·ρ) with ρ = instruction_ratio, an instruction part. Both run in the same
  forward (method/gasp.py), so a micro-batch with both parts carries the paper's whole objective
  L = L_LM + λ_corr·L_corr + λ_depth·L_depth, with the λ's its only weights. ρ = 1 (the 7B configs):
  every optimizer step; ρ < 1 (cheap miniatures) adds L_LM to that fraction of micro-batches.
- Sample indices: the k-th part of a kind takes global positions p = (k·world + rank)·B + j of an
  endless stream that reshuffles each epoch (permutation seeded by (seed, epoch)). A manifest source
  (data/manifest.py) is per rank instead: its k-th part takes local positions k·B + j over the rows
  this rank owns, in manifest order in the first epoch.
- Frame count of a geometry part: uniform in [frames_min, frames_max], seeded by (seed, step).
- Bad media: an instruction sample whose media is missing or undecodable (MediaError) is replaced by
  shuffled_index(idx, n, key_k) for k = 1, 2, ... (a fixed sequence per index, so resume sees the same
  replacement); each skipped one is reported in the batch's ``bad_media`` list, which the recipe
  counts and logs (recipe.py: logs/bad_media.jsonl, data.max_bad_media_fraction).

"step" here is the *micro*-step (the recipe asks for step·grad_accum + micro).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from gasp_vlm.train.config import ConfigError, DataConfig

log = logging.getLogger(__name__)
MAX_MEDIA_TRIES = 32  # replacements tried for one bad sample before the stream gives up


def is_instruction_step(step: int, ratio: float) -> bool:
    return math.floor((step + 1) * ratio + 1e-9) > math.floor(step * ratio + 1e-9)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fixed, well-mixing 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def shuffled_index(off: int, n: int, key: int) -> int:
    """Position ``off`` of a pseudo-random permutation of range(n) chosen by ``key``, in O(1).

    A 4-round Feistel network on the smallest even bit width covering n is a bijection on
    [0, 2^bits); walking the cycle until the value falls below n restricts it to a bijection on
    [0, n) (fewer than 4 steps on average). No per-call permutation of the whole set (1.75 M items
    cost 0.16 s each that way)."""
    if n <= 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    lo_mask = (1 << half) - 1
    x = off
    while True:
        left, right = x >> half, x & lo_mask
        for r in range(4):
            left, right = right, left ^ (_mix64((key * 4 + r) ^ (right << 20)) & lo_mask)
        x = (left << half) | right
        if x < n:
            return x


def _permutation_key(seed: int, salt: int) -> int:
    """Feistel key of one permutation: a hash of the seed and what the permutation is for (an epoch, a
    bad-media retry)."""
    return _mix64(_mix64(seed & _MASK64) ^ salt)


def _stream_index(pos: int, n: int, seed: int) -> int:
    """Item at position ``pos`` of an endless stream over n items that reshuffles every epoch."""
    epoch, off = divmod(pos, n)
    return shuffled_index(off, n, _permutation_key(seed, epoch))


class ConcatGeometry:
    """Several geometry sources as one index space; items remember their source for targets."""

    def __init__(self, sources: Sequence[Any]) -> None:
        self.sources = list(sources)
        self.sizes = [len(s) for s in self.sources]
        if not sum(self.sizes):
            raise ConfigError("data.geometry: the geometry sources hold no sequences")

    def __len__(self) -> int:
        return sum(self.sizes)

    def sample(self, index: int, num_frames: int) -> dict:
        for si, n in enumerate(self.sizes):
            if index < n:
                item = self.sources[si].sample(index, num_frames)
                item["source"] = si
                return item
            index -= n
        raise IndexError(index)

    def targets(self, layout, item: dict):
        return self.sources[item["source"]].targets(layout, item)


class ToyGeometrySource:
    """The built-in exact-geometry source (toy_geometry.py) behind the source interface."""

    def __init__(self, cfg: DataConfig) -> None:
        from gasp_vlm.train.toy_geometry import OrthoShiftSequences

        self.seq = OrthoShiftSequences(cfg.toy_sequences, tuple(cfg.frame_hw), seed=cfg.seed)

    def __len__(self) -> int:
        return len(self.seq)

    def sample(self, index: int, num_frames: int) -> dict:
        return self.seq.sample(index, num_frames)

    def targets(self, layout, item):
        from gasp_vlm.train.toy_geometry import ortho_targets

        return ortho_targets(layout, item)


def build_geometry(cfg: DataConfig, rank: int = 0, world: int = 1):
    """The geometry source of ``cfg``: a manifest (per rank) or the concatenation of data.geometry."""
    if cfg.manifest:
        from gasp_vlm.data.manifest import ManifestGeometrySource

        src = ManifestGeometrySource(Path(cfg.manifest).expanduser(), rank=rank, world=world, grid=cfg.grid,
                                     anchors=cfg.anchors, snap_queries=cfg.snap_queries)
        if cfg.manifest_id is not None and cfg.manifest_id != src.id:
            raise ConfigError(f"config key 'data.manifest': {cfg.manifest} has id {src.id}, but this run was made "
                              f"with manifest id {cfg.manifest_id} (the manifest changed); use the original")
        return src
    sources = []
    for entry in cfg.geometry:
        if entry == "toy":
            sources.append(ToyGeometrySource(cfg))
        else:
            from gasp_vlm.data.sequences import GeometrySequenceSource

            if not Path(entry).expanduser().is_dir():
                raise ConfigError(f"config key 'data.geometry': {entry}: no such folder (give folders of canonical "
                                  "scenes, see `gasp data --help`, or 'toy' for the built-in set)")
            sources.append(GeometrySequenceSource(entry, frames_window=cfg.window_radius, grid=cfg.grid, seed=cfg.seed,
                                                  anchors=cfg.anchors, cache_frames=cfg.cache_frames,
                                                  snap_queries=cfg.snap_queries))
    return ConcatGeometry(sources) if sources else None


def build_instructions(cfg: DataConfig, work_dir: str | Path | None = None):
    """The instruction set of ``cfg`` (None when no step is an instruction step).

    ``data.instructions: generated`` writes the built-in toy set (instructions.make_instruction_set)
    under ``work_dir/instructions``; it is deterministic, written to a private temp dir and renamed into
    place, so concurrent ranks never see a half-written set and need no barrier.
    """
    from gasp_vlm.train.instructions import InstructionSet, make_instruction_set

    if not cfg.instructions or cfg.instruction_ratio <= 0:
        return None
    video = video_options(cfg)
    if cfg.instructions != "generated":
        return InstructionSet(Path(cfg.instructions).expanduser(), cfg.media_root, video=video, seed=cfg.seed)
    if work_dir is None:
        raise ConfigError("data.instructions: 'generated' needs a work directory (the run's output dir)")
    final = Path(work_dir) / "instructions"
    if not (final / "instructions.json").is_file():
        tmp = Path(work_dir) / f".tmp-instructions-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        make_instruction_set(tmp / "instructions.json", num_samples=cfg.generated_instructions,
                             num_frames=cfg.instruction_frames, frame_hw=tuple(cfg.frame_hw), seed=cfg.seed + 1)
        try:
            os.replace(tmp, final)
        except OSError:  # another rank got there first; its set is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return InstructionSet(final / "instructions.json", video=video, seed=cfg.seed)


def video_options(cfg: DataConfig):
    """The decoding settings of ``cfg`` (train/instructions/video.py)."""
    from gasp_vlm.train.instructions import VideoOptions

    return VideoOptions(sampling=cfg.video_sampling, max_frames=cfg.instruction_frames, fps=cfg.video_fps,
                        min_frames=cfg.video_min_frames, max_pixels=cfg.video_max_pixels, seek=cfg.video_seek,
                        seek_tolerance_s=cfg.video_seek_tolerance_s,
                        threads=cfg.decode_threads)


def instruction_samples_requested(cfg: DataConfig, micro_steps: int, world: int) -> int:
    """Instruction samples the stream asked for in micro-steps [0, micro_steps) on all ranks together
    (each bad one adds one more try: tried = requested + bad)."""
    return math.floor(micro_steps * cfg.instruction_ratio + 1e-9) * cfg.batch_size * world


def robust_instruction_sample(src, pos: int, seed: int, num_frames: int | None = None) -> tuple[dict, list[dict]]:
    """The instruction item at stream position ``pos``, skipping bad media (module docstring).

    Returns (item, bad) with one record dict(file, error, index, pos) per skipped sample."""
    from gasp_vlm.train.instructions import InstructionFormatError, MediaError

    n = len(src)
    idx = _stream_index(pos, n, seed)
    bad: list[dict] = []
    for k in range(1, MAX_MEDIA_TRIES + 1):
        try:
            return src.sample(idx, num_frames), bad
        except MediaError as e:
            path = src.media_path(idx) if hasattr(src, "media_path") else None
            bad.append({"file": str(path) if path else None, "error": str(e), "index": idx, "pos": pos})
            idx = shuffled_index(idx, n, _permutation_key(seed, k * 0x5851F42D4C957F2D))
    raise InstructionFormatError(
        f"instruction stream position {pos}: {MAX_MEDIA_TRIES} samples in a row have bad media (last: "
        f"{bad[-1]['error']}); check data.instructions and the media roots")


class StepBatches(torch.utils.data.Dataset):
    """Dataset indexed by *micro-step*: ``ds[step]`` -> dict(step, parts=[dict(kind, items), ...]) for
    this rank, the geometry part ("geo") first, then the instruction part ("instr") when the step has one.

    ``geometry_parts=False`` leaves the geometry parts out (the LM-only control: they carry no loss
    there). Wrap in a DataLoader(batch_size=None, sampler=range(start, stop)) to prefetch with workers.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world: int = 1, geometry=None, instructions=None,
                 work_dir: str | Path | None = None, geometry_parts: bool = True) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.geometry = geometry if geometry is not None else build_geometry(cfg, rank, world)
        if instructions is None:
            instructions = build_instructions(cfg, work_dir)
        self.instructions = instructions
        self.geometry_parts = geometry_parts and self.geometry is not None
        if cfg.instruction_ratio < 1 and self.geometry is None:
            raise ConfigError("data.geometry: micro-batches without an instruction part need a geometry source")
        if cfg.instruction_ratio > 0 and self.instructions is None:
            raise ConfigError("data.instructions: instruction parts are scheduled but no instruction set is configured")

    def __len__(self) -> int:  # effectively endless; the sampler decides the range
        return 2 ** 31

    def kinds(self, step: int) -> list[str]:
        """The parts of micro-step ``step``, in order."""
        return ["geo"] * self.geometry_parts + ["instr"] * is_instruction_step(step, self.cfg.instruction_ratio)

    def __getitem__(self, step: int) -> dict:
        c = self.cfg
        parts = []
        bad: list[dict] = []  # instruction samples skipped for bad media (robust_instruction_sample)
        for kind in self.kinds(step):
            instr = kind == "instr"
            src = self.instructions if instr else self.geometry
            k = math.floor(step * c.instruction_ratio + 1e-9) if instr else step  # parts of this kind before
            n_frames = c.instruction_frames if instr else \
                int(np.random.default_rng([c.seed, step, 7]).integers(c.frames_min, c.frames_max + 1))
            items = []
            for j in range(c.batch_size):
                pos = (k * self.world + self.rank) * c.batch_size + j
                if instr:
                    item, skipped = robust_instruction_sample(src, pos, c.seed + 1000, n_frames)
                    bad += skipped
                    items.append(item)
                elif getattr(src, "per_rank", False):  # a manifest: this rank's own rows, in order
                    items.append(src.sample(src.stream_index(k * c.batch_size + j, c.seed), n_frames))
                else:
                    items.append(src.sample(_stream_index(pos, len(src), c.seed), n_frames))
            parts.append(dict(kind=kind, items=items))
        return dict(step=step, parts=parts, bad_media=bad)


class PreparedSteps(torch.utils.data.Dataset):
    """``StepBatches`` plus the CPU half of every part (tokenisation, pixel patches, GT targets,
    collation), so DataLoader workers hand the trainer ready batches: ``ds[step]`` ->
    dict(step, parts=[dict(kind, batch=PreparedBatch, targets, rows)], bad_media, stats, load_s, prep_s).

    ``adapter`` should be ``adapter.preparer()`` (no model weights in the workers)."""

    def __init__(self, steps: StepBatches, adapter, prompt: str, frame_mode: str | None = None,
                 max_length: int | None = None) -> None:
        self.steps, self.adapter, self.prompt = steps, adapter, prompt
        self.frame_mode, self.max_length = frame_mode, max_length

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, step: int) -> dict:
        import time

        t0 = time.perf_counter()
        raw = self.steps[step]
        t1 = time.perf_counter()
        stats: dict[str, int] = {}
        parts = []
        for part in raw["parts"]:
            batch, targets, rows = prepare_step(self.adapter, part, self.steps.geometry, self.prompt, self.frame_mode,
                                                max_length=self.max_length, stats=stats)
            parts.append(dict(kind=part["kind"], batch=batch, targets=targets, rows=rows))
        return dict(step=raw["step"], parts=parts, bad_media=raw["bad_media"], stats=stats, load_s=t1 - t0,
                    prep_s=time.perf_counter() - t1)


def prepare_step(adapter, batch: dict, geometry, prompt: str, frame_mode: str | None = None,
                 max_length: int | None = None, stats: dict | None = None):
    """One part of a step batch (dict(kind, items)) -> (PreparedBatch, targets list | None, rows | None).

    ``max_length`` / ``stats``: see prepare_conversations."""
    items = batch["items"]
    if batch["kind"] == "geo":
        prepared = adapter.prepare_frames([it["frames"] for it in items], prompt=prompt, frame_mode=frame_mode)
        targets = [geometry.targets(lay, it) for lay, it in zip(prepared.layouts, items)]
        return prepared, targets, None
    prepared = prepare_conversations(adapter, items, frame_mode, max_length=max_length, stats=stats)
    # Instruction samples have no correspondences; the heads read one position per sample (zero loss).
    rows = torch.zeros(len(items), 1, dtype=torch.long)
    return prepared, None, rows


def prepare_conversations(adapter, items: Sequence[dict], frame_mode: str | None = None,
                          max_length: int | None = None, stats: dict | None = None):
    """Per-sample conversations -> PreparedBatch (labels on every assistant turn, nothing else).

    An item holds ``frames`` (may be empty: text only) and ``turns`` [(role, text), ...] or a single
    ``prompt`` + ``answer``. A sample longer than ``max_length`` tokens loses trailing (user, assistant)
    turn pairs until it fits -- visual tokens are never cut; one that does not fit even with its first
    pair is kept whole. Each such sample is logged, and counted in ``stats`` (turns_dropped,
    samples_shortened, samples_over_length) when given.
    """
    from gasp_vlm.models.base import as_uint8_frames

    mode = frame_mode or adapter.frame_mode
    encoded = []
    for i, it in enumerate(items):
        frames = as_uint8_frames(it["frames"], f"sample {i}") if len(it["frames"]) else []
        turns = [tuple(t) for t in it["turns"]] if it.get("turns") else None
        enc = adapter._encode_sample(frames, it.get("prompt"), it.get("answer"), mode, turns=turns)
        if max_length is not None and len(enc["ids"]) > max_length and turns:
            full, keep = len(enc["ids"]), len(turns)
            while len(enc["ids"]) > max_length and keep > 2:
                keep -= 2
                enc = adapter._encode_sample(frames, None, None, mode, turns=turns[:keep])
            dropped = len(turns) - keep
            fits = len(enc["ids"]) <= max_length
            log.warning("instruction sample %s: %d tokens > data.max_length %d: dropped its last %d turns%s",
                        it.get("id") or it.get("media") or i, full, max_length, dropped,
                        "" if fits else f", still {len(enc['ids'])} tokens (visual tokens are never cut)")
            if stats is not None:
                stats["turns_dropped"] = stats.get("turns_dropped", 0) + dropped
                stats["samples_shortened"] = stats.get("samples_shortened", 0) + (dropped > 0)
                stats["samples_over_length"] = stats.get("samples_over_length", 0) + (not fits)
        encoded.append(enc)
    return adapter._collate(encoded)
