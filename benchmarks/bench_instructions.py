"""Instruction loading at LLaVA-Video-178K scale: a 3-minute 1280x720 30 fps clip sampled to 32 frames.

Writes the clip with PyAV (libx264, a keyframe every GOP frames) and a one-entry mixture in the real
per-subset layout into a temp dir. For each GOP setting (default: a keyframe every 250 frames without
B-frames, as the first figures of issue 12; every 250 and every 60 frames = 2 s, as most web uploads,
with B-frames) it prints, per seek mode, CPU and wall seconds per sample and peak RSS over the
baseline (each decode in a forked child), plus what one frame costs to decode here and the lower
bound for exact frames (frames that must be decoded x that cost). Then `gasp bench instructions`
logic (the whole loader) for exact and keyframe seeking on the first setting. Targets (issue 12):
< 300 MiB peak RSS over the baseline, < 1 s per sample per core.

    python benchmarks/bench_instructions.py [--samples 3] [--settings 250:0,250:3,60:3]
        [--content checker|textured] [--model tiny-qwen2.5-vl] [--keep DIR]

``--content checker`` (default): a moving checkerboard, ~0.3 Mbit/s, very cheap frames; ``textured``:
panned multi-scale noise + grain at crf 23, ~2 Mbit/s, about what a 720p web upload costs to decode.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

MODES = {  # name -> VideoOptions overrides
    "exact (no frame skipping)": {"seek": "exact", "skip_nonref": False},
    "exact": {"seek": "exact"},
    "nearest_key (1 s)": {"seek": "nearest_key", "seek_tolerance_s": 1.0},
    "keyframe": {"seek": "keyframe"},
}


def write_720p_clip(path: Path, seconds: int = 180, fps: int = 30, gop: int = 250, bframes: int = 0,
                    content: str = "checker") -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = 720, 1280
    rng = np.random.default_rng(0)
    if content == "checker":
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx // 40 + yy // 40) % 2 * 160, xx * 255 // w, yy * 255 // h], -1).astype(np.uint8)
        shifts = [np.roll(base, 8 * k, axis=1) for k in range(60)]  # moving content, 60 distinct images
    else:  # multi-scale noise panned like a camera, plus grain
        tex = np.zeros((h + 400, w + 800, 3), np.float32)
        for sc, amp in ((64, 90), (16, 50), (4, 25), (1, 12)):
            small = rng.random(((h + 400) // sc + 2, (w + 800) // sc + 2, 3), dtype=np.float32)
            tex += amp * np.kron(small, np.ones((sc, sc, 1), np.float32))[: h + 400, : w + 800]
        tex = np.clip(tex, 0, 255)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast" if content == "checker" else "veryfast", "g": str(gop),
                     "keyint_min": str(gop), "sc_threshold": "0"}
        if content != "checker":
            s.options["crf"] = "23"
        # as most web encoders with B-frames: the middle one of a run is a reference (b-pyramid)
        s.options["x264-params"] = f"bframes={bframes}:b-pyramid=normal:b-adapt=0" if bframes else "bframes=0"
        for i in range(seconds * fps):
            if content == "checker":
                img = shifts[i % 60].copy()
                img[:40, :200] = i % 256  # every frame differs
            else:
                y, x = int(200 + 150 * np.sin(i / 40)), int(i * 2.5) % 800
                img = np.clip(tex[y:y + h, x:x + w] + rng.normal(0, 4, (h, w, 1)).astype(np.float32), 0, 255)
                img = img.astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def decode_cost(path: Path) -> dict:
    """CPU ms per frame of a full single-thread decode (all frames; reference frames only), and the
    frames the exact 32-frame plan must decode (each wanted frame from its keyframe, or from the
    last decoded frame when that is later) -- their product is the lower bound without skipping."""
    import av

    from gasp_vlm.train.instructions.video import _probe, _Seeker, uniform_indices

    out = {}
    for skip in ("DEFAULT", "NONREF"):
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_count = 1
            st.codec_context.skip_frame = skip
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            n = sum(1 for _ in c.decode(st))
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        out[skip] = (n, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime))
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        total, fps = _probe(st, c)
        keys = _Seeker(c, st, fps, (2, 2)).keys
    need, cur = 0, -1
    for i in uniform_indices(total, 32):
        k = max(x for x in keys if x <= i)
        need += i - cur if k <= cur else i - k + 1
        cur = i
    (n, t), (n_ref, t_ref) = out["DEFAULT"], out["NONREF"]
    return {"frames": n, "mbit_per_s": path.stat().st_size * 8 / (n / fps) / 1e6,
            "ms_per_frame": 1e3 * t / n, "reference_frames": n_ref, "frames_exact_must_decode": need,
            "lower_bound_cpu_s": need * t / n,
            "lower_bound_with_skipping_cpu_s": need * t_ref / n  # the plan's share of a reference-only decode
            }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--settings", default="250:0,250:3,60:3", help="GOP:B-frames,... (keyframe interval)")
    ap.add_argument("--content", choices=("checker", "textured"), default="checker")
    ap.add_argument("--model", default=None)
    ap.add_argument("--keep", type=Path, default=None, help="Reuse / keep the generated tree here.")
    ap.add_argument("--no-loader", action="store_true", help="Skip the whole-loader run.")
    args = ap.parse_args()
    from gasp_vlm.train.bench_instructions import _in_child, benchmark_instructions, benchmark_video
    from gasp_vlm.train.config import config_from_dict
    from gasp_vlm.train.instructions import VideoOptions

    root = args.keep or Path(tempfile.mkdtemp(prefix="gasp-bench-instr-"))
    try:
        sub = root / "2_3_m_youtube_v0_1"
        clips = {}
        for setting in args.settings.split(","):
            gop, bf = (int(x) for x in setting.split(":"))
            name = f"long_720p_{args.content}_g{gop}_b{bf}.mp4"
            clip = sub / "liwei_youtube_videos/videos/youtube_video_2024" / name
            if not clip.is_file():
                t = time.perf_counter()  # in a child: the encoder's memory stays out of the RSS baseline
                _in_child(lambda: write_720p_clip(clip, gop=gop, bframes=bf, content=args.content) and {})
                print(f"wrote {clip} ({clip.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s",
                      flush=True)
            clips[f"keyframe every {gop}, {bf} B-frames"] = clip
        summary = {}
        print(f"{'setting':28s} {'mode':27s} {'CPU s/sample':>12s} {'wall s/sample':>13s} {'peak RSS MiB':>12s}")
        for label, clip in clips.items():
            cost = decode_cost(clip)
            summary[label] = {"decode_cost": cost}
            print(f"{label:28s} {cost['mbit_per_s']:.1f} Mbit/s, {cost['ms_per_frame']:.2f} ms/frame, "
                  f"{cost['reference_frames']}/{cost['frames']} reference frames; exact must decode "
                  f"{cost['frames_exact_must_decode']} frames: lower bound {cost['lower_bound_cpu_s']:.2f} s "
                  f"({cost['lower_bound_with_skipping_cpu_s']:.2f} s skipping non-reference frames)", flush=True)
            for mode, over in MODES.items():
                r = benchmark_video(clip, VideoOptions(max_frames=32, **over), samples=args.samples)
                summary[label][mode] = {k: v for k, v in r.items() if k != "indices"}
                print(f"{label:28s} {mode:27s} {r['decode_cpu_s_per_sample']:12.2f} {r['decode_s_per_sample']:13.2f} "
                      f"{r['peak_rss_over_baseline_mib']:12.0f}", flush=True)
        if not args.no_loader:  # the whole loader (JSON, record, media), first setting
            clip = next(iter(clips.values()))
            (sub / "2_3_m_youtube_v0_1_cap_processed.json").write_text(json.dumps([{
                "id": "long", "video": str(clip.relative_to(sub)),
                "conversations": [{"from": "human", "value": "<image>\nDescribe the video."},
                                  {"from": "gpt", "value": "A moving checkerboard."}]}]))
            mix = root / "mix.yaml"
            mix.write_text("- json_path: 2_3_m_youtube_v0_1/2_3_m_youtube_v0_1_cap_processed.json\n")
            for seek in ("exact", "keyframe"):
                cfg = config_from_dict({"data": {"geometry": ["toy"], "instruction_frames": 32,
                                                 "video_seek": seek}}).data
                res = benchmark_instructions(cfg, mix, model=args.model, samples=args.samples)
                res.pop("per_sample")
                summary[f"loader, {next(iter(clips))}, {seek}"] = res
        print(json.dumps(summary, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
