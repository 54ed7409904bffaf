"""Question/answer tasks rendered from canonical scenes with object maps (the demo's synthetic rooms).

Two families, kept apart on purpose (issue 15: GASP's gains must come *without* 3D VQA data):

- **general** (no geometry needed to answer): one frame -- ``objects`` (list the visible objects),
  ``presence`` (is there a sphere?), ``texture`` (what texture does the floor have?), ``count`` (how many
  objects in this image?) -- and two images of two *different* rooms, ``shared_texture`` (which texture
  appears in both images?), the multi-image content comparison of a VLM's ordinary pre-training. Nothing
  links the two rooms' views, so it teaches comparing content across frames without any 3D.
- **spatial** (a clip of frames, the answer needs 3D or cross-view reasoning): ``motion`` (does the
  camera move left or right?), ``closer`` (which of two named objects is nearer in the first frame?),
  ``count_views`` (how many *different* objects appear across the frames: one seen twice counts once),
  ``same_surface`` (is the surface at the centre of the first frame the one at the centre of the last?).

Answers are short canonical strings scored by exact match after :func:`normalize_answer`; spatial records
also list their ``choices`` (the answer among them) for closed-set scoring by answer likelihood. Objects are
named by what can be seen -- texture + shape ("rocket box") -- and only when that name is unique in
the scene, so every question is answerable from the pixels.

Output (LLaVA-Video-178K JSON layout, read by train/instructions/; written atomically)::

    <out>/tasks.json     [{"id", "task", "answer", "image": "media/img_0000.png" | "video": "media/clip_0000",
                           "conversations": [{"from": "human", ...}, {"from": "gpt", "value": answer}]}, ...]
    <out>/media/...      the frames (PNG)
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from gasp_vlm.data.scene import Scene, SceneError, list_scene_dirs, load_scene
from gasp_vlm.geometry.cameras import camera_center
from gasp_vlm.io import atomic_directory

GENERAL_TASKS: tuple[str, ...] = ("objects", "presence", "texture", "count", "shared_texture")
SPATIAL_TASKS: tuple[str, ...] = ("motion", "closer", "count_views", "same_surface")
SHAPES: tuple[str, ...] = ("box", "sphere", "cylinder")
MIN_VISIBLE_FRACTION = 0.02  # an object counts as visible when it covers >= 2 % of the frame (~1.3 tokens)

QA = tuple[str, str]  # (question, answer): a general task
ClosedQA = tuple[str, str, list[str]]  # (question, answer, choices): a spatial task, also scored closed-set


def normalize_answer(text: str) -> str:
    """Lower case, first line, no surrounding punctuation/space, no leading article ("The rocket box." ->
    "rocket box"): the exact-match rule of the demo's spatial QA."""
    s = text.strip().splitlines()[0] if text.strip() else ""
    s = s.lower().strip().strip(".!?,;:\"' ")
    return re.sub(r"^(the|a|an)\s+", "", s)


# ------------------------------------------------------------------------------------------------
# What a frame shows
# ------------------------------------------------------------------------------------------------
def object_names(scene: Scene) -> dict[int, str]:
    """Visible names of the scene's objects: room faces by place ("floor", "left wall"), solids by
    texture + shape ("rocket box"); solids whose name is not unique in the scene are left out."""
    names: dict[int, str] = {}
    solids: dict[str, list[int]] = {}
    for o in scene.meta.get("objects", []):
        oid, kind, name = int(o["id"]), str(o.get("kind", "")), str(o.get("name", ""))
        if kind == "room_face":
            names[oid] = " ".join(reversed(name.split("_"))) if "_" in name else name  # wall_left -> left wall
        elif kind in SHAPES:
            solids.setdefault(f"{o.get('texture', 'plain')} {kind}", []).append(oid)
    for label, ids in solids.items():
        if len(ids) == 1:
            names[ids[0]] = label
    return names


def solid_ids(scene: Scene) -> dict[int, str]:
    """Object id -> shape of every solid (box/sphere/cylinder) of the scene, named or not."""
    return {int(o["id"]): str(o["kind"]) for o in scene.meta.get("objects", []) if o.get("kind") in SHAPES}


def visible_solids(scene: Scene, frame: int) -> dict[int, int]:
    """Solid object id -> visible pixel count in ``frame`` (only those covering MIN_VISIBLE_FRACTION)."""
    obj = scene.objects(frame)
    if obj is None:
        raise SceneError(f"{scene.path}: no object maps (objects/), which the scene tasks need")
    ids, counts = np.unique(obj, return_counts=True)
    solids = solid_ids(scene)
    min_px = MIN_VISIBLE_FRACTION * obj.size
    return {int(i): int(c) for i, c in zip(ids, counts) if int(i) in solids and c >= min_px}


# ------------------------------------------------------------------------------------------------
# General tasks: one frame
# ------------------------------------------------------------------------------------------------
def task_objects(scene: Scene, f: int, rng: np.random.Generator) -> QA | None:
    names = object_names(scene)
    vis = [i for i, _ in sorted(visible_solids(scene, f).items(), key=lambda kv: -kv[1]) if i in names]
    if not vis:
        return None
    return "List the objects in the image, largest first.", ", ".join(names[i] for i in vis[:3])


def task_presence(scene: Scene, f: int, rng: np.random.Generator) -> QA | None:
    solids, vis = solid_ids(scene), visible_solids(scene, f)
    shapes_seen = {solids[i] for i in vis}
    want_yes = bool(rng.integers(0, 2))  # balance yes/no where the frame allows it
    pool = sorted(shapes_seen) if want_yes and shapes_seen else sorted(set(SHAPES) - shapes_seen) or sorted(SHAPES)
    shape = str(rng.choice(pool))
    return f"Is there a {shape} in the image?", "yes" if shape in shapes_seen else "no"


def task_texture(scene: Scene, f: int, rng: np.random.Generator) -> QA | None:
    """The texture of a room face filling >= 10 % of the frame, or of a visible solid whose shape is the
    only one of its kind in the frame ("the sphere")."""
    meta = {int(o["id"]): o for o in scene.meta.get("objects", [])}
    obj = scene.objects(f)
    ids, counts = np.unique(obj, return_counts=True)
    cand = {int(i): object_names(scene)[int(i)] for i, c in zip(ids, counts)
            if meta.get(int(i), {}).get("kind") == "room_face" and c >= 0.1 * obj.size}
    shapes = [solid_ids(scene)[i] for i in visible_solids(scene, f)]
    cand.update({i: s for i, s in zip(visible_solids(scene, f), shapes) if shapes.count(s) == 1})
    if not cand:
        return None
    oid = int(rng.choice(sorted(cand)))
    return f"What is the texture of the {cand[oid]}?", str(meta[oid].get("texture"))


def task_count(scene: Scene, f: int, rng: np.random.Generator) -> QA | None:
    return "How many objects are in the image?", str(len(visible_solids(scene, f)))


# ------------------------------------------------------------------------------------------------
# Spatial tasks: a clip
# ------------------------------------------------------------------------------------------------
def task_motion(scene: Scene, ids: Sequence[int], rng: np.random.Generator) -> ClosedQA | None:
    c0, c1 = camera_center(scene.cam_from_worlds[ids[0]]), camera_center(scene.cam_from_worlds[ids[-1]])
    dx = float((scene.cam_from_worlds[ids[0]][:, :3] @ (c1 - c0))[0])  # along the first camera's x (right)
    if abs(dx) < 0.05:
        return None
    return "Does the camera move left or right?", "right" if dx > 0 else "left", ["left", "right"]


def task_closer(scene: Scene, ids: Sequence[int], rng: np.random.Generator) -> ClosedQA | None:
    names, f = object_names(scene), ids[0]
    depth, obj = scene.depth(f), scene.objects(f)
    med = {i: float(np.median(depth[(obj == i) & (depth > 0)])) for i in visible_solids(scene, f) if i in names}
    if len(med) < 2:
        return None
    a, b = (int(x) for x in rng.choice(sorted(med), size=2, replace=False))
    if abs(med[a] - med[b]) < 0.2:  # too close to call
        return None
    return (f"Which is closer to the camera in the first frame, the {names[a]} or the {names[b]}?",
            names[a] if med[a] < med[b] else names[b], [names[a], names[b]])


def task_count_views(scene: Scene, ids: Sequence[int], rng: np.random.Generator) -> ClosedQA | None:
    seen: set[int] = set()
    for f in ids:
        seen |= set(visible_solids(scene, f))
    if not seen:
        return None
    return ("How many different objects appear across these frames?", str(len(seen)),
            [str(k) for k in range(1, len(solid_ids(scene)) + 1)])


def task_same_surface(scene: Scene, ids: Sequence[int], rng: np.random.Generator) -> ClosedQA | None:
    first, last = scene.objects(ids[0]), scene.objects(ids[-1])
    h, w = first.shape
    a, b = int(first[h // 2, w // 2]), int(last[h // 2, w // 2])
    if a < 0 or b < 0:  # sky / background
        return None
    return ("Is the surface at the centre of the first frame the same as the one at the centre of the last frame?",
            "yes" if a == b else "no", ["yes", "no"])


# ------------------------------------------------------------------------------------------------
# Pair tasks: two frames of two *different* rooms (multi-image, no geometry: nothing links the views)
# ------------------------------------------------------------------------------------------------
PAIR_MIN_FRACTION = 0.05  # a surface counts for "shared_texture" when it covers >= 5 % of its frame


def visible_textures(scene: Scene, frame: int) -> set[str]:
    """Textures of the surfaces (room faces and solids) covering PAIR_MIN_FRACTION of ``frame``."""
    tex = {int(o["id"]): str(o.get("texture")) for o in scene.meta.get("objects", [])}
    ids, counts = np.unique(scene.objects(frame), return_counts=True)
    return {tex[int(i)] for i, c in zip(ids, counts) if int(i) in tex and c >= PAIR_MIN_FRACTION * counts.sum()}


def task_shared_texture(a: Scene, fa: int, b: Scene, fb: int, rng: np.random.Generator) -> QA | None:
    """Which texture shows in both images (two rooms)? "none" when no texture is shared; ill-posed (redrawn)
    when several are."""
    shared = visible_textures(a, fa) & visible_textures(b, fb)
    if len(shared) > 1:
        return None
    return "Which texture appears in both images?", shared.pop() if shared else "none"


PAIR_TASKS: dict[str, Callable[[Scene, int, Scene, int, np.random.Generator], QA | None]] = {
    "shared_texture": task_shared_texture}
FRAME_TASKS: dict[str, Callable[[Scene, int, np.random.Generator], QA | None]] = {
    "objects": task_objects, "presence": task_presence, "texture": task_texture, "count": task_count}
CLIP_TASKS: dict[str, Callable[[Scene, Sequence[int], np.random.Generator], ClosedQA | None]] = {
    "motion": task_motion, "closer": task_closer, "count_views": task_count_views,
    "same_surface": task_same_surface}


# ------------------------------------------------------------------------------------------------
# Writing a task set
# ------------------------------------------------------------------------------------------------
def make_task_set(scenes_root: str | os.PathLike, out_dir: str | os.PathLike, tasks: dict[str, int], *,
                  num_frames: int = 4, clip_stride: int = 2, seed: int = 0, max_tries: int = 20) -> Path:
    """Write ``tasks[name]`` samples of each task from the scenes under ``scenes_root``; returns tasks.json.

    Frame tasks use one random frame; pair tasks a random frame of each of two different rooms (a two-frame
    clip); clip tasks ``num_frames`` frames ``clip_stride`` apart from a random start (so the camera moves
    between the first and the last), in reverse order half of the time. A draw whose question is ill-posed
    (no named object, ...) is redrawn up to ``max_tries`` times, then the sample is skipped."""
    unknown = sorted(set(tasks) - set(FRAME_TASKS) - set(CLIP_TASKS) - set(PAIR_TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from "
                         f"{sorted(FRAME_TASKS) + sorted(CLIP_TASKS) + sorted(PAIR_TASKS)}")
    scenes = [load_scene(d) for d in list_scene_dirs(scenes_root)]
    if not scenes:
        raise SceneError(f"{scenes_root}: no scenes to build tasks from")
    span = (num_frames - 1) * clip_stride + 1
    short = [s.path for s in scenes if s.num_frames < span]
    if short and any(t in CLIP_TASKS for t in tasks):
        raise SceneError(f"{short[0]}: fewer frames than a clip of {num_frames} frames {clip_stride} apart needs")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "media").mkdir()
        records: list[dict] = []
        for task, count in sorted(tasks.items()):
            rng = np.random.default_rng([seed, 23, zlib.crc32(task.encode())])  # a task's draws ignore the others
            for k in range(count):
                rec = _draw(task, scenes, rng, num_frames, clip_stride, max_tries)
                if rec is None:
                    continue
                views, (q, a, *closed) = rec
                key = f"{task}_{k:04d}"
                if len(views) == 1:
                    media = {"image": f"media/{key}.png"}
                    Image.fromarray(views[0][0].image(views[0][1])).save(tmp / media["image"])
                    tag = "<image>"
                else:
                    media = {"video": f"media/{key}"}
                    (tmp / media["video"]).mkdir()
                    for j, (sc, f) in enumerate(views):
                        Image.fromarray(sc.image(f)).save(tmp / media["video"] / f"{j:03d}.png")
                    tag = "<video>"
                name = "+".join(dict.fromkeys(sc.name for sc, _ in views))  # a pair task names both rooms
                records.append({"id": f"{key}-{name}", "task": task, "answer": a,
                                **({"choices": closed[0]} if closed else {}), "scene": name,
                                "frames": [int(f) for _, f in views], **media,
                                "conversations": [{"from": "human", "value": f"{tag}\n{q}"},
                                                  {"from": "gpt", "value": a}]})
        order = np.random.default_rng([seed, 29]).permutation(len(records))  # tasks interleaved
        (tmp / "tasks.json").write_text(json.dumps([records[i] for i in order], indent=1))
    return out_dir / "tasks.json"


def _draw(task: str, scenes: list[Scene], rng: np.random.Generator, num_frames: int, stride: int,
          max_tries: int) -> tuple[list[tuple[Scene, int]], QA | ClosedQA] | None:
    """(views, question): the (scene, frame) pairs shown, in order, and the question on them."""
    for _ in range(max_tries):
        i = int(rng.integers(0, len(scenes)))
        sc = scenes[i]
        if task in PAIR_TASKS:
            if len(scenes) < 2:
                raise SceneError(f"pair task {task!r} needs two scenes or more")
            other = scenes[(i + int(rng.integers(1, len(scenes)))) % len(scenes)]  # any room but sc
            views = [(sc, int(rng.integers(0, sc.num_frames))), (other, int(rng.integers(0, other.num_frames)))]
            qa = PAIR_TASKS[task](sc, views[0][1], other, views[1][1], rng)
        elif task in FRAME_TASKS:
            views = [(sc, int(rng.integers(0, sc.num_frames)))]
            qa = FRAME_TASKS[task](sc, views[0][1], rng)
        else:
            start = int(rng.integers(0, sc.num_frames - (num_frames - 1) * stride))
            frames = list(range(start, start + (num_frames - 1) * stride + 1, stride))
            if rng.integers(0, 2):  # played backwards half the time: the rooms' camera paths all turn one way
                frames = frames[::-1]
            views = [(sc, f) for f in frames]
            qa = CLIP_TASKS[task](sc, frames, rng)
        if qa is not None:
            return views, qa
    return None


def load_task_set(path: str | os.PathLike) -> list[dict]:
    """The records of a tasks.json (with a clear error for a file that is not one)."""
    path = Path(path)
    try:
        recs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SceneError(f"{path}: cannot read a task set ({e})") from e
    if not isinstance(recs, list) or any(not {"task", "answer", "conversations"} <= set(r) for r in recs):
        raise SceneError(f"{path}: not a task set (a list of records with task, answer, conversations)")
    return recs
