"""Tiny synthetic copies of Video-MME and MVBench in their real on-disk layouts (see videomme.py / mvbench.py).

Same conventions as fixtures.py: 8-frame 64x48 videos at 4 fps whose frame i has grey level
`frame_level(i)`, so the sampled frames can be checked by decoding. Both together are < 60 kB.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from gasp_vlm.bench.fixtures import tiny_mp4

# ---- Video-MME -----------------------------------------------------------------------------------------
VMME_VIDEOS = [  # (video_id, videoID, duration, domain, sub_category)
    ("001", "fFjv93ACGo8", "short", "Knowledge", "Humanity & History"),
    ("301", "N1cdUjctpG8", "medium", "Film & Television", "Animation"),
    ("601", "Kb7Qm2xZ_0s", "long", "Sports Competition", "Basketball"),
]
VMME_ROWS = [  # (video index, task_type, question, options, answer)
    (0, "Counting Problem", "Which kind of the decoration has the largest number?",
     ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."], "C"),
    (0, "Object Recognition", "What is placed on top of the tree?",
     ["A. A star.", "B. An angel.", "C. A bow.", "D. Nothing."], "A"),
    (1, "Action Reasoning", "Why does the rabbit run back home?",
     ["A. It is hungry.", "B. It is raining.", "C. It hears a fox.", "D. It is late."], "B"),
    (1, "Temporal Perception", "What happens right after the opening credits?",
     ["A. A chase.", "B. A song.", "C. A dialogue.", "D. A flashback."], "D"),
    (2, "OCR Problems", "What is the score shown at half time?",
     ["A. 52-48.", "B. 50-50.", "C. 48-52.", "D. 60-40."], "A"),
    (2, "Information Synopsis", "What is the video mainly about?",
     ["A. A training session.", "B. A championship final.", "C. An interview.", "D. A draft."], "B"),
]


FONT = '<font color="white" size=".72c">{}</font>'
VMME_SUBTITLES = {  # videoID -> .srt text (the third video has none); 8 frames at 4 fps: frame = int(s * 4)
    "fFjv93ACGo8": "\n\n".join([
        f"1\n00:00:00,000 --> 00:00:00,500\n{FONT.format('Welcome to the history hour.')}",
        # two text lines: only the first font span counts
        f"2\n00:00:00,500 --> 00:00:01,250\n{FONT.format('Today we decorate the tree')}\n"
        f"{FONT.format('with candles.')}",
        "3\n00:00:01,250 --> 00:00:01,500\n[music]",  # no font span: skipped
        f"4\n00:00:01,500 --> 00:00:03,000\n{FONT.format('The star goes on top.')}"]) + "\n",
    "N1cdUjctpG8": "\n\n".join([
        f"1\n00:00:00,000 --> 00:00:01,000\n{FONT.format('The rabbit hears the rain.')}",
        f"2\n00:00:00,000 --> 00:00:01,000\n{FONT.format('It runs home.')}",  # same time range: replaces 1
        f"3\n00:00:01,000 --> 00:00:02,000\n{FONT.format('Home at last.')}"]) + "\n",
}


def make_videomme(root: str | Path, *, videos: bool = True) -> Path:
    """ROOT/videomme/test-00000-of-00001.parquet, ROOT/data/<videoID>.mp4 and ROOT/subtitle/<videoID>.srt
    (subtitle.zip unzipped; two of the three videos have one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    (root / "videomme").mkdir(parents=True, exist_ok=True)
    rows, seen = [], {}
    for v, task, q, opts, ans in VMME_ROWS:
        vid, youtube_id, duration, domain, sub = VMME_VIDEOS[v]
        seen[vid] = seen.get(vid, 0) + 1
        rows.append({"video_id": vid, "duration": duration, "domain": domain, "sub_category": sub,
                     "url": f"https://www.youtube.com/watch?v={youtube_id}", "videoID": youtube_id,
                     "question_id": f"{vid}-{seen[vid]}", "task_type": task, "question": q, "options": opts,
                     "answer": ans})
    cols = [(c, pa.string()) for c in ("video_id", "duration", "domain", "sub_category", "url", "videoID",
                                       "question_id", "task_type", "question")]
    schema = pa.schema(cols + [("options", pa.list_(pa.string())), ("answer", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "videomme" / "test-00000-of-00001.parquet")
    if videos:
        for _vid, youtube_id, *_ in VMME_VIDEOS:
            tiny_mp4(root / "data" / f"{youtube_id}.mp4")
    (root / "subtitle").mkdir(exist_ok=True)
    for youtube_id, text in VMME_SUBTITLES.items():
        (root / "subtitle" / f"{youtube_id}.srt").write_text(text, encoding="utf-8")
    return root


# ---- MVBench -------------------------------------------------------------------------------------------
MVB_ROWS = {  # task -> list of (video, question, candidates, answer, (start, end) | None)
    "action_sequence": [
        ("ZS9XR.mp4", "What happened after the person took the food?",
         ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle.", "Took the box."],
         "Ate the medicine.", (0.5, 1.5)),
        ("4OHY5.mp4", "What happened before the person opened the door?",
         ["Sat on the sofa.", "Took the towel.", "Put down the bag.", "Closed the window."],
         "Put down the bag.", (0.0, 2.0)),
    ],
    "object_existence": [
        ("video_10000.mp4", "Are there any moving green objects when the video ends?",
         ["not sure", "yes", "no"], "no", None),
    ],
    "fine_grained_pose": [
        ("S001C001P001R001A001_rgb.avi", "What is the pose performed by the person?",
         ["drink water", "eat meal", "brush teeth", "sit down"], "drink water", None),
    ],
    "episodic_reasoning": [
        ("castle_s01e01_seg02_clip_00", "What did Castle hold when he entered the room?",
         ["A book.", "A phone.", "A cup of coffee.", "A gun.", "Nothing."], "A cup of coffee.", (1.0, 3.0)),
    ],
}
MVB_FOLDER_FRAMES = 12  # episodic reasoning: 00001.jpg ... 00012.jpg at 3 fps


def folder_frame_level(i: int) -> int:
    """Grey level of frame file i (1-based) of the fixture's frame folder."""
    return 10 + 20 * (i - 1)


def make_mvbench(root: str | Path, *, videos: bool = True) -> Path:
    """ROOT/json/<task>.json and the media at ROOT/video/<prefix>/<video> (a frame folder for tvqa)."""
    from gasp_vlm.bench.mvbench import TASKS

    root = Path(root)
    (root / "json").mkdir(parents=True, exist_ok=True)
    for task, items in MVB_ROWS.items():
        prefix, data_type, _ = TASKS[task]
        rows = []
        for video, q, cands, ans, bound in items:
            row = {"video": video, "question": q, "candidates": cands, "answer": ans}
            if bound is not None:
                row.update(start=bound[0], end=bound[1])
            rows.append(row)
            if not videos:
                continue
            target = root / "video" / prefix / video
            if data_type == "frame":
                target.mkdir(parents=True, exist_ok=True)
                for i in range(1, MVB_FOLDER_FRAMES + 1):
                    arr = np.full((48, 64, 3), folder_frame_level(i), dtype=np.uint8)
                    Image.fromarray(arr).save(target / f"{i:05d}.jpg", quality=95)
            elif not target.exists():
                tiny_mp4(target)
        (root / "json" / f"{task}.json").write_text(json.dumps(rows, indent=1))
    return root


MAKERS = {"videomme": make_videomme, "videomme_w_subtitle": make_videomme, "mvbench": make_mvbench}
