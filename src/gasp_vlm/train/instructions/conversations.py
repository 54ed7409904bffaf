"""LLaVA-style conversation records -> whole-conversation entries (all turns of a record in one sample).

A record::

    {"id": "...", "video": "academic_source/youcook2/x.mp4" | "image": "x.jpg" | neither (text only),
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...]}

Roles: human/user -> "user", gpt/assistant -> "assistant"; a leading system turn becomes the entry's
system text (the adapters use their own fixed system prompt, so it is kept but not fed). The media
placeholders ``<image>``/``<video>`` are removed: the adapter puts the visual tokens before the first
user text itself. A conversation must alternate user/assistant starting with the user; a trailing user
turn without an answer is dropped (it would carry no loss).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MEDIA_TOKENS = ("<image>", "<video>")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class InstructionFormatError(ValueError):
    """An instruction file or mixture that does not fit the format (names the file and record)."""


@dataclass(frozen=True)
class Entry:
    """One sample: its media (kind video | image | None, path relative to media_root) and turns."""

    kind: str | None
    media: str | None
    turns: tuple[tuple[str, str], ...]  # ((role, text), ...), role user | assistant, alternating
    record_id: str = ""


def clean_text(text: str) -> str:
    for tok in MEDIA_TOKENS:
        text = text.replace(tok, "")
    return text.strip()


def parse_record(rec: dict, where: str) -> Entry:
    if not isinstance(rec, dict):
        raise InstructionFormatError(f"{where}: a record must be a mapping, got {type(rec).__name__}")
    kind = "video" if rec.get("video") else "image" if rec.get("image") else None
    media = rec.get(kind) if kind else None
    if isinstance(media, list):  # multi-image records: only single-media samples are supported
        if len(media) != 1:
            raise InstructionFormatError(f"{where}: {len(media)} {kind} files in one record; one is supported")
        media = media[0]
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise InstructionFormatError(f"{where}: 'conversations' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise InstructionFormatError(f"{where}: turn {j} needs 'from' and 'value'")
        if t["from"] == "system" and j == 0:
            continue
        role = ROLES.get(str(t["from"]).lower())
        if role is None:
            raise InstructionFormatError(f"{where}: turn {j} has unknown role {t['from']!r} (human | gpt)")
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise InstructionFormatError(f"{where}: turn {j} is {t['from']!r} but a {want} turn is expected "
                                         "(turns must alternate, starting with the human)")
        turns.append((role, clean_text(str(t["value"])) if role == "user" else str(t["value"]).strip()))
    if turns and turns[-1][0] == "user":
        turns.pop()
    if not turns:
        raise InstructionFormatError(f"{where}: no human/gpt turn pair")
    return Entry(kind, str(media) if media else None, tuple(turns), str(rec.get("id", "")))


def load_entries(json_path: str | Path) -> list[Entry]:
    """All records of a JSON list (or JSON Lines, ``.jsonl``) file as entries."""
    path = Path(json_path)
    if not path.is_file():
        raise InstructionFormatError(f"instruction file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as e:
        raise InstructionFormatError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(records, list):
        raise InstructionFormatError(f"{path}: expected a JSON list of records")
    entries = [parse_record(r, f"{path}: record {i} ({r.get('id') if isinstance(r, dict) else '?'})")
               for i, r in enumerate(records)]
    if not entries:
        raise InstructionFormatError(f"{path}: no records")
    return entries
