"""Instruction-tuning samples in the LLaVA-Video-178K conversation JSON format.

A file is a JSON list of records::

    {"id": "...", "video": "rel/path.mp4" | "rel/frame_folder", "conversations": [
        {"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}

or with ``"image": "rel/path.jpg"`` instead of ``"video"``. Paths are relative to a media root (default:
the JSON's folder). Videos are decoded with PyAV (optional dependency ``gasp-vlm[video]``); a folder
is read as its sorted image files; an image is a one-frame clip. Every (human, gpt) turn pair becomes
one sample (frames, prompt, answer); the ``<image>``/``<video>`` placeholders are removed from the
prompt because the adapter inserts the visual tokens itself. Only the answer gets LM labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEDIA_TOKENS = ("<image>", "<video>")


class InstructionFormatError(ValueError):
    pass


def _clean_prompt(text: str) -> str:
    for tok in MEDIA_TOKENS:
        text = text.replace(tok, "")
    return text.strip()


def uniform_indices(total: int, n: int) -> list[int]:
    """n frame indices spread uniformly over [0, total) (repeats when total < n)."""
    if total <= 0:
        raise ValueError("video has no frames")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def read_video_frames(path: Path, num_frames: int) -> list[np.ndarray]:
    """Decode ``num_frames`` uniformly spaced RGB frames with PyAV."""
    try:
        import av
    except ImportError as e:  # optional dependency
        raise ImportError(f"{path}: decoding video files needs PyAV -- pip install 'gasp-vlm[video]' (or av), "
                          f"or store the clip as a folder of frame images") from e
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return [frames[i] for i in uniform_indices(len(frames), num_frames)]


def read_media(path: Path, num_frames: int) -> list[np.ndarray]:
    from PIL import Image

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise InstructionFormatError(f"{path}: frame folder without images")
        return [np.asarray(Image.open(files[i]).convert("RGB")) for i in uniform_indices(len(files), num_frames)]
    if not path.exists():
        raise InstructionFormatError(f"{path}: media file not found")
    if path.suffix.lower() in IMAGE_EXTS:
        return [np.asarray(Image.open(path).convert("RGB"))]
    return read_video_frames(path, num_frames)


class InstructionSet:
    """Map-style set of (record, turn) samples; ``sample(i, num_frames) -> dict(kind, frames, prompt, answer)``."""

    def __init__(self, json_path: str | Path, media_root: str | Path | None = None) -> None:
        self.path = Path(json_path)
        if not self.path.is_file():
            raise InstructionFormatError(f"instruction file {self.path} does not exist")
        try:
            records = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise InstructionFormatError(f"{self.path}: invalid JSON ({e})") from e
        if not isinstance(records, list):
            raise InstructionFormatError(f"{self.path}: expected a JSON list of records")
        self.root = Path(media_root) if media_root else self.path.parent
        self.entries: list[tuple[str, str, str]] = []  # (media path, prompt, answer)
        for i, rec in enumerate(records):
            media = rec.get("video") or rec.get("image")
            if not media:
                raise InstructionFormatError(f"{self.path}: record {i} ({rec.get('id')}) has no 'video' or 'image'")
            conv = rec.get("conversations") or []
            for j in range(0, len(conv) - 1, 2):
                h, g = conv[j], conv[j + 1]
                if h.get("from") != "human" or g.get("from") != "gpt":
                    raise InstructionFormatError(
                        f"{self.path}: record {i} turns {j},{j + 1} are not a human/gpt pair")
                self.entries.append((str(media), _clean_prompt(h["value"]), str(g["value"]).strip()))
        if not self.entries:
            raise InstructionFormatError(f"{self.path}: no human/gpt turn pairs")

    def __len__(self) -> int:
        return len(self.entries)

    def sample(self, index: int, num_frames: int) -> dict:
        media, prompt, answer = self.entries[index]
        frames = read_media(self.root / media, num_frames)
        return dict(kind="instr", frames=frames, prompt=prompt, answer=answer)


# ------------------------------------------------------------------------------------------------
# A small generated instruction set (tests, demo)
# ------------------------------------------------------------------------------------------------
def _direction(dx: float, dy: float) -> str:
    if dx == 0 and dy == 0:
        return "It stays still."
    horiz = "right" if dx > 0 else "left" if dx < 0 else ""
    vert = "down" if dy > 0 else "up" if dy < 0 else ""
    return f"It moves {' and '.join(w for w in (horiz, vert) if w)}."


def make_instruction_set(out_json: str | Path, num_samples: int = 16, num_frames: int = 4,
                         frame_hw: tuple[int, int] = (112, 112), seed: int = 0) -> Path:
    """Write ``num_samples`` clips (frame folders) + a LLaVA-Video-style JSON answered from scene facts.

    The clips come from the built-in toy geometry (toy_geometry.py), whose camera motion is known
    exactly (instruction sets answered from real scene folders: data/scene_qa.py): Q "Which way does the camera move?" A "It moves left and up." and
    Q "How far is the nearest surface in the first frame?" A "About 2.3 meters." (from GT depth).
    """
    from PIL import Image

    from gasp_vlm.train.toy_geometry import OrthoShiftSequences

    out_json = Path(out_json)
    media_dir = out_json.parent / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    src = OrthoShiftSequences(num_samples, frame_hw, seed=seed)
    records = []
    for i in range(num_samples):
        item = src.sample(i, num_frames)
        clip = media_dir / f"clip_{i:04d}"
        clip.mkdir(exist_ok=True)
        for k, f in enumerate(item["frames"]):
            Image.fromarray(f).save(clip / f"{k:03d}.png")
        motion = item["offsets_px"][-1] - item["offsets_px"][0]  # camera (crop) displacement, px
        nearest = float(item["depths"][0].min())
        records.append({"id": f"toy-{i:04d}", "video": f"media/{clip.name}", "conversations": [
            {"from": "human", "value": "<video>\nWhich way does the camera move?"},
            {"from": "gpt", "value": _direction(float(motion[0]), float(motion[1]))},
            {"from": "human", "value": "How far is the nearest surface in the first frame?"},
            {"from": "gpt", "value": f"About {nearest:.1f} meters."}]})
    out_json.write_text(json.dumps(records, indent=1))
    return out_json
