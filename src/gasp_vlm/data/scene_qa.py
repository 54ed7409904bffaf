"""A small instruction set answered from scene geometry (LLaVA-Video-178K JSON layout).

For the demo and tests: the "interleaved instruction data" of GASP's LM loss, generated from
canonical scenes (data/scene.py) so nothing is downloaded. Each sample is a clip of ``num_frames``
consecutive scene frames saved as a PNG folder plus questions whose answers follow from the depth
maps, cameras and (when present) object maps and names in scene.json:

- camera motion: the displacement of the camera centre from the first to the last frame, expressed in
  the first camera's axes (x right, z forward; OpenCV), as "left/right" and "forward/backward";
- nearest surface: the smallest valid depth of the first frame, rounded to 0.1 m;
- which of two named objects is closer (median depth of its visible pixels in the first frame).

Output (atomic: written to a temp folder, renamed at the end)::

    <out>/instructions.json   [{"id", "video": "media/clip_XXXX", "conversations": [q, a]}, ...]  one per question
    <out>/media/clip_XXXX/000.png ...
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from gasp_vlm.data.scene import Scene, SceneError, list_scene_dirs, load_scene
from gasp_vlm.geometry.cameras import camera_center


def _motion_answer(scene: Scene, ids: list[int]) -> str:
    c0, c1 = camera_center(scene.cam_from_worlds[ids[0]]), camera_center(scene.cam_from_worlds[ids[-1]])
    d = scene.cam_from_worlds[ids[0]][:, :3] @ (c1 - c0)  # displacement in the first camera's axes
    words = []
    if abs(d[0]) > 0.05:
        words.append("right" if d[0] > 0 else "left")
    if abs(d[2]) > 0.05:
        words.append("forward" if d[2] > 0 else "backward")
    return "It moves " + " and ".join(words) + "." if words else "It barely moves."


def _closer_question(scene: Scene, frame: int, rng: np.random.Generator) -> tuple[str, str] | None:
    objects = scene.objects(frame) if scene.has_objects else None
    names = {int(o["id"]): str(o["name"]) for o in scene.meta.get("objects", []) if "id" in o and "name" in o}
    if objects is None or len(names) < 2:
        return None
    depth = scene.depth(frame)
    medians = {}
    for oid, name in names.items():
        m = (objects == oid) & (depth > 0)
        if m.sum() >= 64 and "wall" not in name and "floor" not in name and "ceiling" not in name:
            medians[oid] = float(np.median(depth[m]))
    if len(medians) < 2:
        return None
    a, b = rng.choice(sorted(medians), size=2, replace=False)
    if abs(medians[a] - medians[b]) < 0.2:  # too close to call from one frame
        return None
    na, nb = names[int(a)].replace("_", " "), names[int(b)].replace("_", " ")
    closer = na if medians[a] < medians[b] else nb
    return f"Which is closer to the camera in the first frame, the {na} or the {nb}?", f"The {closer}."


def make_scene_qa(scenes_root: str | os.PathLike, out_dir: str | os.PathLike, num_samples: int = 32,
                  num_frames: int = 4, seed: int = 0) -> Path:
    """Write ``num_samples`` clips + questions from the scenes under ``scenes_root``; returns the JSON path."""
    scenes = [load_scene(d) for d in list_scene_dirs(scenes_root)]
    if not scenes:
        raise SceneError(f"{scenes_root}: no scenes to build an instruction set from")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "media").mkdir(parents=True)
    try:
        rng = np.random.default_rng([seed, 17])
        records = []
        for i in range(num_samples):
            sc = scenes[i % len(scenes)]
            if sc.num_frames < num_frames:
                raise SceneError(f"{sc.path}: {sc.num_frames} frames, fewer than the {num_frames} a clip needs")
            start = int(rng.integers(0, sc.num_frames - num_frames + 1))
            ids = list(range(start, start + num_frames))
            clip = tmp / "media" / f"clip_{i:04d}"
            clip.mkdir()
            for k, f in enumerate(ids):
                Image.fromarray(sc.image(f)).save(clip / f"{k:03d}.png")
            depth0 = sc.depth(ids[0])
            valid = depth0[depth0 > 0]
            convo = [{"from": "human", "value": "<video>\nWhich way does the camera move?"},
                     {"from": "gpt", "value": _motion_answer(sc, ids)}]
            if valid.size:
                convo += [{"from": "human", "value": "How far is the nearest surface in the first frame?"},
                          {"from": "gpt", "value": f"About {float(valid.min()):.1f} meters."}]
            qa = _closer_question(sc, ids[0], rng)
            if qa is not None:
                convo += [{"from": "human", "value": qa[0]}, {"from": "gpt", "value": qa[1]}]
            # one record per question: short single-turn samples, the instruction stream the demo was
            # measured with (real mixtures keep whole conversations, train/instructions/)
            for j in range(0, len(convo), 2):
                q = convo[j]["value"] if convo[j]["value"].startswith("<video>") else "<video>\n" + convo[j]["value"]
                records.append({"id": f"{sc.name}-{start:04d}-q{j // 2}", "video": f"media/{clip.name}",
                                "conversations": [{"from": "human", "value": q}, convo[j + 1]]})
        (tmp / "instructions.json").write_text(json.dumps(records, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial output
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir / "instructions.json"
