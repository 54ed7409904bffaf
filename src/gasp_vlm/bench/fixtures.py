"""Tiny synthetic copies of the four benchmarks in their exact on-disk layouts and column types.

Used by the tests (written into tmp_path) and handy for smoke-testing `gasp eval` without the real
data. Content is synthetic (solid-colour images, 8-frame 64x48 videos whose frame i has grey level
`frame_level(i)`, so frame sampling can be checked by decoding); all four together are < 100 kB.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_FRAMES, VIDEO_SIZE, VIDEO_FPS = 8, (64, 48), 4


def frame_level(i: int) -> int:
    return 16 + 28 * (i % 9)  # distinct for the first 9 frames (the fixtures' clips), then repeating


def tiny_jpeg(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def tiny_mp4(path: str | Path, n_frames: int = VIDEO_FRAMES, size: tuple[int, int] = VIDEO_SIZE,
             fps: int = VIDEO_FPS) -> Path:
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            arr = np.full((size[1], size[0], 3), frame_level(i), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


# ---- VSI-Bench ------------------------------------------------------------------------------------
VSI_ROWS = [
    # (question_type, question, options, ground_truth)
    ("object_counting", "How many chair(s) are in this room?", None, "4"),
    ("object_abs_distance", "Measuring from the closest point of each object, what is the direct distance "
     "between the sofa and the tv (in meters)?", None, "2.5"),
    ("object_size_estimation", "What is the length of the longest dimension (length, width, or height) of the "
     "table, measured in centimeters?", None, "120"),
    ("room_size_estimation", "What is the size of this room (in square meters)? If multiple rooms are shown, "
     "estimate the size of the combined space.", None, "20"),
    ("object_rel_distance", "Measuring from the closest point of each object, which of these objects (bed, lamp, "
     "door, sink) is the closest to the tv?", ["A. bed", "B. lamp", "C. door", "D. sink"], "B"),
    ("object_rel_direction_easy", "If I am standing by the sofa and facing the tv, is the table to my left or right?",
     ["A. left", "B. right"], "A"),
    ("object_rel_direction_medium", "If I am standing by the sofa and facing the tv, is the table to my left, "
     "right, or back?", ["A. left", "B. right", "C. back"], "C"),
    ("object_rel_direction_hard", "If I am standing by the sofa and facing the tv, is the table to my "
     "front-left, front-right, back-left, or back-right?",
     ["A. front-left", "B. front-right", "C. back-left", "D. back-right"], "D"),
    ("route_planning", "You are a robot beginning at the door facing the bed. You want to navigate to the sink. "
     "You will perform the following actions: 1. Go forward until the bed 2. [please fill in]. What should "
     "[please fill in] be?", ["A. Turn Left", "B. Turn Right", "C. Turn Back"], "A"),
    ("obj_appearance_order", "What will be the first-time appearance order of the following categories in the "
     "video: chair, tv, lamp, sink?", ["A. chair, tv, lamp, sink", "B. tv, chair, lamp, sink",
                                     "C. lamp, sink, chair, tv", "D. sink, lamp, tv, chair"], "A"),
    ("object_counting", "How many lamp(s) are in this room?", None, "10"),
]
VSI_SCENES = [("arkitscenes", "41069025"), ("scannet", "scene0011_00"), ("scannetpp", "0a7cc12c0e")]


def make_vsibench(root: str | Path, *, jsonl: bool = True, first_release_parquet: bool = False,
                  debiased: bool = True, videos: bool = True) -> Path:
    """ROOT/test.jsonl (+ test_debiased.parquet) and ROOT/<dataset>/<scene>.mp4."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (qt, q, opts, gt) in enumerate(VSI_ROWS):
        ds, scene = VSI_SCENES[i % len(VSI_SCENES)]
        rows.append({"id": i, "dataset": ds, "scene_name": scene, "question_type": qt, "question": q,
                     "options": opts, "ground_truth": gt})
    if jsonl:
        with (root / "test.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    schema = pa.schema([("id", pa.int64()), ("dataset", pa.string()), ("scene_name", pa.string()),
                        ("question_type", pa.string()), ("question", pa.string()),
                        ("options", pa.list_(pa.string())), ("ground_truth", pa.string())])
    if first_release_parquet:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "test-00000-of-00001.parquet")
    if debiased:
        drows = [dict(r, pruned=(r["id"] % 4 == 3)) for r in rows]
        pq.write_table(pa.Table.from_pylist(drows, schema=schema.append(pa.field("pruned", pa.bool_()))),
                       root / "test_debiased.parquet")
    if videos:
        for ds, scene in VSI_SCENES:
            tiny_mp4(root / ds / f"{scene}.mp4")
    return root


# ---- All-Angles Bench ------------------------------------------------------------------------------
AA_ROWS = [
    # (category, question, A, B, C, answer, n_views)
    ("counting", "Across these views, how many people are in the scene?", "2", "3", "4", "B", 2),
    ("attribute_identification", "What colour is the shirt of the person at the left of View 1?", "red", "blue",
     "green", "A", 2),
    ("relative_distance", "In View 2, which object is closest to the camera?", "the chair", "the table",
     "the ball", "C", 3),
    ("relative_direction", "If you stand at the camera of View 1, where is the person holding the ball?",
     "left", "right", "behind", "A", 2),
    ("manipulation", "Which view shows the hand touching the cup first?", "View 1", "View 2", "View 3", "B", 3),
    ("camera_pose_estimation", "Relative to View 1, where is the camera of View 2 placed?", "left", "right",
     "opposite", "C", 2),
    ("camera_pose_estimation", "Relative to View 1, how is the camera of View 2 rotated?", "clockwise",
     "counter-clockwise", "no rotation", "A", 2),
    ("camera_pose_estimation", "Which view is captured from the highest position?", "View 1", "View 2",
     "View 4", "C", 4),
]


def make_all_angles(root: str | Path, *, tsv: bool = False) -> Path:
    """ROOT/data.json + images in nested folders (and the VLMEvalKit TSV at bench_tsv/ when tsv=True)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (cat, q, a, b, c, ans, nv) in enumerate(AA_ROWS):
        folder = f"egohumans/0{i % 2 + 1}_tagging/00{i}" if i % 2 else f"egoexo4d/scene_{i:03d}"
        paths = []
        for v in range(nv):
            rel = f"{folder}/cam{v + 1:02d}/{i:05d}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(tiny_jpeg((40 * v, 100, 30 * i % 255)))
            paths.append(rel)
        pair = i + 1 if i % 2 == 0 and i + 1 < len(AA_ROWS) else (i - 1 if i % 2 else None)
        rows.append({"index": i, "folder": folder, "category": cat, "pair_idx": pair, "image_path": paths,
                     "question": q, "A": a, "B": b, "C": c, "answer": ans,
                     "sourced_dataset": "EgoHumans" if i % 2 else "Ego-Exo4D"})
    (root / "data.json").write_text(json.dumps(rows, indent=1))
    if tsv:
        import csv

        (root / "bench_tsv").mkdir(exist_ok=True)
        cols = ["index", "question", "A", "B", "C", "answer", "category", "image_path", "pair_idx", "folder",
                "sourced_dataset"]
        with (root / "bench_tsv" / "all_angles_bench_huggingface.tsv").open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(cols)
            for r in rows:  # pandas-style: list cells as Python literals, missing as ""
                w.writerow([str(r[k]) if k == "image_path" else ("" if r[k] is None else r[k]) for k in cols])
    return root


# ---- BLINK -----------------------------------------------------------------------------------------
MVR_PROMPT = ("The images are frames from a video. The video is shooting a static scene. The camera is either moving "
              "clockwise (left) or counter-clockwise (right) around the object. The first image is from the beginning "
              "of the video and the second image is from the end. Is the camera moving left or right when shooting the "
              "video? Select from the following options.\n(A) left\n(B) right")
BLINK_ROWS = {
    # subtask: list of (question, choices, answer, n_images)
    "Multi-view_Reasoning": [
        ("The images are frames from a video. The video is shooting a static scene. The camera is either moving "
         "clockwise (left) or counter-clockwise (right) around the object. The first image is from the beginning of "
         "the video and the second image is from the end. Is the camera moving left or right when shooting the video?",
         ["left", "right"], "(A)", 2)] * 2 + [(None, ["left", "right"], "(B)", 2)] * 2,
    "Relative_Depth": [("Two points are circled on the image, labeled by A and B beside each circle. Which point is "
                        "closer to the camera?", ["A is closer", "B is closer"], "(B)", 1)] * 2,
    "Counting": [("How many blue floats are there?", ["0", "3", "2", "1"], "(C)", 1)],
    "Art_Style": [("Which image shares the same style as the reference image?", ["the first image", "the second image"],
                   "(A)", 3)],
}


def make_blink(root: str | Path, subtasks: dict | None = None, split: str = "val") -> Path:
    """ROOT/<Subtask>/<split>-00000-of-00001.parquet with HF Image structs {bytes, path}; unused images None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                        ("image_1", img_t), ("image_2", img_t), ("image_3", img_t), ("image_4", img_t),
                        ("choices", pa.list_(pa.string())), ("answer", pa.string()), ("prompt", pa.string()),
                        ("explanation", pa.string())])
    for task, items in (subtasks or BLINK_ROWS).items():
        rows = []
        for j, (q, choices, ans, n_img) in enumerate(items):
            q = q or BLINK_ROWS["Multi-view_Reasoning"][0][0]
            opts = "\n".join(f"({'ABCDE'[k]}) {c}" for k, c in enumerate(choices))
            row = {"idx": f"{split}_{task}_{j + 1}", "question": q, "sub_task": task, "choices": choices,
                   "answer": ans if split == "val" else "hidden", "prompt": f"{q} Select from the following options.\n{opts}",
                   "explanation": ""}
            for k in range(4):
                row[f"image_{k + 1}"] = ({"bytes": tiny_jpeg((60 * k, 20 * j, 90)), "path": None} if k < n_img else None)
            rows.append(row)
        (root / task).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / task / f"{split}-00000-of-00001.parquet")
    return root


# ---- MMSI-Bench ------------------------------------------------------------------------------------
MMSI_ROWS = [
    # (question_type, question (options embedded), answer, n_images)
    ("Positional Relationship (Cam.–Obj.)", "When the first image was taken, where was the sofa relative to the "
     "camera?\nOptions: A: front-left, B: front-right, C: behind, D: directly ahead", "A", 2),
    ("Positional Relationship (Cam.–Obj.)", "Where is the lamp relative to the camera of the second image?\nOptions: "
     "A: left, B: right, C: above, D: below", "B", 2),
    ("Motion (Cam.)", "How did the camera move between the two images?\nOptions: A: forward, B: backward, "
     "C: turned left, D: turned right", "C", 2),
    ("Attribute (Meas.)", "What is the height of the door?\nOptions: A: 1.2 m, B: 2.0 m, C: 3.1 m, D: 0.8 m", "B", 2),
    ("MSR", "Following the views in order, which object is passed last?\nOptions: A: the sink, B: the bed, "
     "C: the table, D: the tv", "D", 4),
]


def make_mmsi(root: str | Path, *, tsv: bool = False) -> Path:
    """ROOT/MMSI_Bench.parquet (`images` list<binary> of JPEGs); optionally the VLMEvalKit MMSI_bench.tsv."""
    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (qt, q, ans, n) in enumerate(MMSI_ROWS):
        rows.append({"id": i, "images": [tiny_jpeg((50 * k, 80, 20 * i)) for k in range(n)], "question_type": qt,
                     "question": q, "answer": ans, "thought": "synthetic"})
    schema = pa.schema([("id", pa.int64()), ("images", pa.list_(pa.binary())), ("question_type", pa.string()),
                        ("question", pa.string()), ("answer", pa.string()), ("thought", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "MMSI_Bench.parquet")
    if tsv:
        import csv

        with (root / "MMSI_bench.tsv").open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            # VLMEvalKit's TSV also carries the options as columns A..D (the question keeps them too)
            w.writerow(["index", "image", "question", "answer", "category", "A", "B", "C", "D"])
            for r in rows:
                opts = dict(re.findall(r"([A-D]): ([^,]+)", r["question"].split("Options:", 1)[1]))
                w.writerow([r["id"], json.dumps([base64.b64encode(b).decode() for b in r["images"]]), r["question"],
                            r["answer"], r["question_type"], *(opts[c].strip() for c in "ABCD")])
    return root


MAKERS = {"vsibench": make_vsibench, "all_angles": make_all_angles, "blink": make_blink, "mmsi": make_mmsi}


def make_fixture(benchmark: str, root: str | Path) -> Path:
    """Write the synthetic copy of `benchmark` (registry name) under `root`."""
    if benchmark in ("videomme", "videomme_w_subtitle", "mvbench"):  # in fixtures_video (which imports this module)
        from gasp_vlm.bench.fixtures_video import MAKERS as VIDEO_MAKERS

        return VIDEO_MAKERS[benchmark](root)
    return MAKERS[benchmark](root)
