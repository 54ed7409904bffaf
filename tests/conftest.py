"""Shared fixtures: a LLaVA-Video-178K tree in the layout the data set ships (written by the test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ACADEMIC = "0_30_s_academic_v0_1"
YOUTUBE = "1_2_m_youtube_v0_1"


def write_clip(path: Path, n: int, fps: int = 10, hw: tuple[int, int] = (64, 96), gop: int = 8,
               codec: str = "libx264") -> Path:
    """An mp4 whose frame i shows i in base 40 as two flat grey fields (top half) over a fixed pattern
    (bottom half): the frame index can be read back from the pixels (frame_number). libx264 with its default B-frames, a keyframe every ``gop``."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    pattern = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 64) * 4], -1).astype(np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "10"}
        for i in range(n):
            img = pattern.copy()
            img[: h // 2, : w // 2] = 6 * (i % 40)  # the index in base 40, two flat grey fields
            img[: h // 2, w // 2:] = 6 * (i // 40)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def frame_number(frame: np.ndarray) -> int:
    """The index write_clip painted into a decoded frame."""
    h, w = frame.shape[0] // 2 - 2, frame.shape[1] // 2
    lo = float(frame[:h, 2:w - 2].mean()) / 6
    hi = float(frame[:h, w + 2:-2].mean()) / 6
    return int(round(lo)) + 40 * int(round(hi))


def build_llava_tree(root: Path) -> dict:
    """Two subsets as LLaVA-Video-178K ships them (per-subset folder, caption / open-ended / multiple-
    choice JSON files named after the subset, videos relative to the subset folder), with a multi-turn
    record, an image record, a text-only record, one missing and one corrupt video; plus mix.yaml."""
    from PIL import Image

    a, y = root / ACADEMIC, root / YOUTUBE
    write_clip(a / "academic_source/youcook2/101/clip_a.mp4", 30)
    write_clip(a / "academic_source/charades/clip_b.mp4", 24)
    write_clip(y / "liwei_youtube_videos/videos/youtube_video_2024/clip_c.mp4", 40)
    (y / "liwei_youtube_videos/videos/youtube_video_2024/corrupt.mp4").write_bytes(
        b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # an mp4 header over garbage
    Image.fromarray(np.full((60, 80, 3), 120, np.uint8)).save(a / "academic_source/youcook2/101/still.jpg")
    multi = [{"from": "human", "value": "<image>\nWhat is cooked?"}, {"from": "gpt", "value": "Noodles."},
             {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "They are served in a bowl."},
             {"from": "human", "value": "How many bowls?"}, {"from": "gpt", "value": "Two."}]
    files = {
        a / f"{ACADEMIC}_cap_processed.json": [
            {"id": "v_a", "video": "academic_source/youcook2/101/clip_a.mp4", "data_source": "0_30_s_academic_v0_1",
             "conversations": [{"from": "human", "value": "<image>\nDescribe the video in detail."},
                               {"from": "gpt", "value": "A pan heats on a stove."}]},
            {"id": "v_missing", "video": "academic_source/youcook2/101/not_there.mp4",
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Gone."}]}],
        a / f"{ACADEMIC}_oe_qa_processed.json": [
            {"id": "v_b", "video": "academic_source/charades/clip_b.mp4", "conversations": multi},
            {"id": "img", "image": "academic_source/youcook2/101/still.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                               {"from": "gpt", "value": "Grey."}]}],
        y / f"{YOUTUBE}_mc_qa_processed.json": [
            {"id": "v_c", "video": "liwei_youtube_videos/videos/youtube_video_2024/clip_c.mp4",
             "conversations": [{"from": "human", "value": "<image>\nWhich is shown?\nA. cat\nB. dog"},
                               {"from": "gpt", "value": "B."}]},
            {"id": "v_corrupt", "video": "liwei_youtube_videos/videos/youtube_video_2024/corrupt.mp4",
             "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Broken."}]},
            {"id": "text", "conversations": [{"from": "human", "value": "What is 2 + 2?"},
                                             {"from": "gpt", "value": "Four."}]}],
    }
    for path, records in files.items():
        path.write_text(json.dumps(records))
    mix = root / "mix.yaml"
    mix.write_text(f"""datasets:
  - json_path: {ACADEMIC}/{ACADEMIC}_cap_processed.json
    media_root: {ACADEMIC}
    sampling: all
  - json_path: {ACADEMIC}/{ACADEMIC}_oe_qa_processed.json
    media_root: {ACADEMIC}
    weight: 2
  - json_path: {YOUTUBE}/{YOUTUBE}_mc_qa_processed.json
    sampling: all
""")
    return {"root": root, "mix": mix, "multi": multi}


@pytest.fixture(scope="session")
def llava_tree(tmp_path_factory) -> dict:
    return build_llava_tree(tmp_path_factory.mktemp("llava_video_178k"))
