"""A small generated instruction set (tests, demo) in the LLaVA-Video JSON format."""

from __future__ import annotations

import json
from pathlib import Path


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
