"""InstructionSet: the samples of a mixture (or one JSON) as one index space, decoded on demand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gasp_vlm.train.instructions.conversations import Entry, InstructionFormatError, load_entries
from gasp_vlm.train.instructions.mixture import MixtureEntry, load_mixture, select
from gasp_vlm.train.instructions.video import VideoOptions, read_media


class InstructionSet:
    """Map-style set: ``sample(i) -> dict(kind="instr", frames, turns, media, frame_indices, id)``.

    ``source``: a mixture YAML (.yaml/.yml), a JSON / JSONL file (media relative to ``media_root``,
    default its folder), or a list of MixtureEntry. Index i is a slot of one pass over the mixture
    (mixture.py: weights); media decoding errors surface as ``MediaError`` for the caller to skip.
    """

    def __init__(self, source: str | Path | list[MixtureEntry], media_root: str | Path | None = None,
                 video: VideoOptions | None = None, seed: int = 0) -> None:
        if isinstance(source, (str, Path)):
            p = Path(source)
            if p.suffix.lower() in (".yaml", ".yml"):
                source = load_mixture(p)
            else:
                root = Path(media_root) if media_root else p.parent
                source = [MixtureEntry(p, root)]
        self.video = video or VideoOptions()
        self.parts: list[tuple[MixtureEntry, list[Entry], list[int], int]] = []  # entry, records, picked, slots
        for k, m in enumerate(source):
            records = load_entries(m.json_path)
            picked = select(len(records), m.sampling, seed * 1_000_003 + k, f"{m.json_path}")
            if picked:
                self.parts.append((m, records, picked, max(1, round(m.weight * len(picked)))))
        self.size = sum(s for *_, s in self.parts)
        if not self.size:
            raise InstructionFormatError("instruction mixture: the sampling keeps no records")
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def locate(self, index: int) -> tuple[MixtureEntry, Entry]:
        """The mixture entry and record of slot ``index``."""
        from gasp_vlm.train.stream import shuffled_index

        if not 0 <= index < self.size:
            raise IndexError(index)
        for k, (m, records, picked, slots) in enumerate(self.parts):
            if index < slots:
                n = len(picked)
                # w >= 1: slot j repeats record j mod n; w < 1: a seeded fixed subset of the picked records
                local = index % n if slots >= n else shuffled_index(index, n, self.seed * 7919 + k)
                return m, records[picked[local]]
            index -= slots
        raise IndexError(index)

    def media_path(self, index: int) -> Path | None:
        m, e = self.locate(index)
        return m.media_root / e.media if e.media else None

    def sample(self, index: int, num_frames: int | None = None) -> dict:
        m, e = self.locate(index)
        frames, idx = [], []
        if e.media:
            opts = self.video if num_frames is None else dataclasses.replace(self.video, max_frames=num_frames)
            frames, idx = read_media(m.media_root / e.media, e.kind or "video", opts)
        users = [t for r, t in e.turns if r == "user"]
        answers = [t for r, t in e.turns if r == "assistant"]
        return dict(kind="instr", frames=frames, frame_indices=idx, turns=list(e.turns), id=e.record_id,
                    media=str(m.media_root / e.media) if e.media else None, prompt=users[0], answer=answers[0])
