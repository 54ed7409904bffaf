"""Bad media accounting of a run: ``logs/bad_media.jsonl`` and the ``data.max_bad_media_fraction`` stop.

The stream skips bad instruction samples itself (stream.robust_instruction_sample); this counts them
over all ranks and steps. Each record is written once, by the main process, with the optimizer step
that met it; on resume the records past the checkpoint's step are dropped first (those steps run
again and meet the same files), so the log never holds a sample twice. The running total is restored
from the kept records, and "tried" is exact without any saved state: every requested sample is tried
once, plus one more try per bad one (tried = requested + bad).
"""

from __future__ import annotations

import json
from pathlib import Path

from gasp_vlm.train.config import DataConfig
from gasp_vlm.train.instructions import InstructionFormatError
from gasp_vlm.train.stream import instruction_samples_requested
from gasp_vlm.train.watch import JsonlLog


class BadMediaTracker:
    def __init__(self, out_dir: str | Path, cfg: DataConfig, world: int, main: bool,
                 resumed_at: int | None, grad_accum: int) -> None:
        self.path = Path(out_dir) / "logs" / "bad_media.jsonl"
        self.cfg, self.world, self.accum = cfg, world, grad_accum
        self.log = JsonlLog(self.path, resumed_at) if main else None  # truncates (resume) or clears (fresh)
        self.bad = 0
        if resumed_at is not None and self.path.is_file():  # every rank reads the shared run folder
            self.bad = sum(1 for ln in self.path.read_text().splitlines()
                           if ln.strip() and json.loads(ln)["step"] <= resumed_at)

    def tried(self, step: int) -> int:
        return instruction_samples_requested(self.cfg, step * self.accum, self.world) + self.bad

    def update(self, step: int, records: list[dict], step_bad: int) -> None:
        """After optimizer step ``step`` (1-based): ``records`` this rank's (or, on the main process, all
        ranks' gathered) bad samples, ``step_bad`` their global count. Raises past the allowed fraction."""
        self.bad += step_bad
        if self.log is not None:
            for r in records:
                self.log.write({"step": step, **r})
        tried = self.tried(step)
        if tried >= self.cfg.bad_media_min_tries and self.bad > self.cfg.max_bad_media_fraction * tried:
            last = f" (last: {records[-1]['error']})" if records else ""
            raise InstructionFormatError(
                f"{self.path}: {self.bad} of {tried} instruction samples tried so far have bad media, more than "
                f"data.max_bad_media_fraction = {self.cfg.max_bad_media_fraction}{last}; check data.instructions "
                "and the media roots, or raise the fraction")
