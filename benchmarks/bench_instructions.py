"""Instruction loading at LLaVA-Video-178K scale: a 3-minute 1280x720 30 fps clip sampled to 32 frames.

Writes the clip with PyAV (libx264 ultrafast, a keyframe every 250 frames, as web video) and a one-entry
mixture in the real per-subset layout into a temp dir, then runs `gasp bench instructions` logic for
exact and keyframe seeking. Targets (issue 12): < 300 MiB peak RSS over the baseline, < 1 s per sample
per core.

    python benchmarks/bench_instructions.py [--samples 4] [--model tiny-qwen2.5-vl] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_720p_clip(path: Path, seconds: int = 180, fps: int = 30, gop: int = 250) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = 720, 1280
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx // 40 + yy // 40) % 2 * 160, xx * 255 // w, yy * 255 // h], -1).astype(np.uint8)
    shifts = [np.roll(base, 8 * k, axis=1) for k in range(60)]  # moving content, 60 distinct images
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        for i in range(seconds * fps):
            img = shifts[i % 60].copy()
            img[:40, :200] = i % 256  # every frame differs
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--keep", type=Path, default=None, help="Reuse / keep the generated tree here.")
    args = ap.parse_args()
    from gasp_vlm.train.bench_instructions import benchmark_instructions
    from gasp_vlm.train.config import config_from_dict

    root = args.keep or Path(tempfile.mkdtemp(prefix="gasp-bench-instr-"))
    try:
        sub = root / "2_3_m_youtube_v0_1"
        clip = sub / "liwei_youtube_videos/videos/youtube_video_2024/long_720p.mp4"
        if not clip.is_file():
            t = time.perf_counter()
            write_720p_clip(clip)
            print(f"wrote {clip} ({clip.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        (sub / "2_3_m_youtube_v0_1_cap_processed.json").write_text(json.dumps([{
            "id": "long", "video": str(clip.relative_to(sub)),
            "conversations": [{"from": "human", "value": "<image>\nDescribe the video."},
                              {"from": "gpt", "value": "A moving checkerboard."}]}]))
        mix = root / "mix.yaml"
        mix.write_text("- json_path: 2_3_m_youtube_v0_1/2_3_m_youtube_v0_1_cap_processed.json\n")
        summary = {}
        for seek in ("exact", "keyframe"):
            cfg = config_from_dict({"data": {"geometry": ["toy"], "instruction_frames": 32, "video_seek": seek}}).data
            res = benchmark_instructions(cfg, mix, model=args.model, samples=args.samples)
            res.pop("per_sample")
            summary[seek] = res
        print(json.dumps(summary, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
