"""Data mixture files (the LLaVA-NeXT convention): which JSON files, their media roots, how much of each.

A mixture is a YAML list (or a mapping with a ``datasets:`` list) of entries::

    - json_path: 0_30_s_academic_v0_1/0_30_s_academic_v0_1_cap_processed.json
      media_root: 0_30_s_academic_v0_1      # default: the JSON's folder
      sampling: all                          # all | first:N | end:N | random:N | P% | first:P% | random:P%
      weight: 1.0                            # > 0, see below

Relative paths resolve against the YAML's folder. ``sampling`` picks the entry's records once (``P%`` is
a random P percent; random picks are seeded by ``data.seed`` and the entry's position, kept in file
order). ``weight`` w scales the entry's share of every pass over the mixture: it fills round(w·n) slots of
the pass for its n picked records (at least 1), so w = 2 shows each record twice per pass and w = 0.5
shows a fixed seeded half of them. With all weights 1 a pass is each picked record once, like a
concatenation. The pass is then shuffled by the stream (train/stream.py), so everything stays a pure
function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from gasp_vlm.train.instructions.conversations import InstructionFormatError


@dataclass(frozen=True)
class MixtureEntry:
    json_path: Path
    media_root: Path
    sampling: str = "all"
    weight: float = 1.0


def _count(spec: str, n: int, where: str) -> int:
    try:
        k = math.floor(n * float(spec[:-1]) / 100 + 1e-9) if spec.endswith("%") else int(spec)
    except ValueError:
        raise InstructionFormatError(f"{where}: sampling count {spec!r} is not an integer or a percentage") from None
    if k < 0 or (spec.endswith("%") and not 0 <= float(spec[:-1]) <= 100):
        raise InstructionFormatError(f"{where}: sampling {spec!r} must be a count >= 0 or 0-100%")
    return min(k, n)


def select(n: int, sampling: str, seed: int, where: str = "mixture") -> list[int]:
    """Indices of the n records an entry's ``sampling`` keeps (sorted)."""
    s = str(sampling).strip()
    if s == "all":
        return list(range(n))
    how, _, spec = s.partition(":") if ":" in s else ("random", "", s)
    if how not in ("first", "end", "random") or not spec:
        raise InstructionFormatError(f"{where}: sampling {sampling!r}: use all | first:N | end:N | random:N | P%")
    k = _count(spec, n, where)
    if how == "first":
        return list(range(k))
    if how == "end":
        return list(range(n - k, n))
    return sorted(np.random.default_rng([seed, 77]).choice(n, size=k, replace=False).tolist())


def load_mixture(path: str | Path) -> list[MixtureEntry]:
    path = Path(path)
    if not path.is_file():
        raise InstructionFormatError(f"mixture file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InstructionFormatError(f"{path}: invalid YAML ({e})") from e
    if isinstance(data, dict):
        data = data.get("datasets")
    if not isinstance(data, list) or not data:
        raise InstructionFormatError(f"{path}: expected a list of entries (or 'datasets:' with one)")
    out = []
    for i, e in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(e, dict) or "json_path" not in e:
            raise InstructionFormatError(f"{where}: needs 'json_path'")
        unknown = set(e) - {"json_path", "media_root", "sampling", "sampling_strategy", "weight"}
        if unknown:
            raise InstructionFormatError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                                         "(json_path, media_root, sampling, weight)")
        js = (path.parent / Path(e["json_path"]).expanduser())
        root = path.parent / Path(e["media_root"]).expanduser() if e.get("media_root") else js.parent
        weight = e.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise InstructionFormatError(f"{where}: weight must be a number > 0, got {weight!r}")
        sampling = str(e.get("sampling", e.get("sampling_strategy", "all")))
        select(1, sampling, 0, where)  # validate the spec now, not at the first sample
        if not js.is_file():
            raise InstructionFormatError(f"{where}: json_path {js} does not exist")
        if not root.is_dir():
            raise InstructionFormatError(f"{where}: media_root {root} is not a folder")
        out.append(MixtureEntry(js, root, sampling, float(weight)))
    return out
