"""Instruction media: frame indices chosen first (golden uniform / fps values), only those frames
decoded by seeking (pixels equal a full decode's), resized while decoding, bad files named."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import frame_number, write_clip
from gasp_vlm.train.instructions import (MediaError, VideoOptions, decode_frames, fps_indices, probe_video,
                                         read_media, read_video, uniform_indices)


def full_decode(path, hw=None) -> list[np.ndarray]:
    """Every frame, in order, converted the way the seeking decoder converts its frames."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        h, w = hw or (s.codec_context.height, s.codec_context.width)
        return [f.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray() for f in c.decode(s)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "c.mp4", 90, fps=10, gop=8)  # 9 s, keyframe every 8


def test_golden_indices():
    assert uniform_indices(30, 8) == [1, 5, 9, 13, 16, 20, 24, 28]  # centres of 8 segments
    assert uniform_indices(3, 5) == [0, 0, 1, 2, 2]  # short clips repeat frames
    # qwen-vl-utils rule: 3 s at 10 fps sampled at 2 fps -> 6 frames at round(linspace(0, 29, 6))
    assert fps_indices(30, 10.0, 2.0, 4, 8) == [0, 6, 12, 17, 23, 29]
    assert fps_indices(90, 10.0, 2.0, 4, 8) == [0, 13, 25, 38, 51, 64, 76, 89]  # 18 wanted, capped at 8
    assert fps_indices(10, 10.0, 2.0, 4, 8) == [0, 3, 6, 9]  # 2 wanted, raised to min_frames
    assert fps_indices(90, 10.0, 1.0, 4, 32) == np.round(np.linspace(0, 89, 8)).astype(int).tolist()
    assert len(fps_indices(90, 10.0, 1.1, 4, 32)) == 8  # 9.9 frames -> an even 8 (temporal patch 2)
    with pytest.raises(MediaError, match="no frames"):
        uniform_indices(0, 4)


@pytest.mark.parametrize("sampling,expected", [
    ("uniform", [5, 16, 28, 39, 50, 61, 73, 84]),
    ("fps", [0, 13, 25, 38, 51, 64, 76, 89]),
])
def test_chosen_frames_are_the_expected_ones_and_equal_a_full_decode(clip, sampling, expected):
    assert probe_video(clip) == (90, 10.0)
    frames, idx = read_video(clip, VideoOptions(sampling=sampling, max_frames=8, fps=2.0, max_pixels=None))
    assert idx == expected
    assert [frame_number(f) for f in frames] == expected  # the painted index: really those frames
    full = full_decode(clip)
    assert len(full) == 90
    for f, i in zip(frames, idx):
        assert np.array_equal(f, full[i]), i


def test_seeking_around_keyframes_and_b_frames_is_exact(clip):
    """Frames just before / at / after keyframes (libx264 B-frames: the container index is in decode
    time, so a naive seek lands on the next keyframe), repeats, and continuing vs seeking."""
    wanted = [0, 0, 6, 7, 8, 9, 15, 16, 40, 47, 48, 88, 89]
    frames, idx = decode_frames(clip, wanted, VideoOptions(max_pixels=None))
    assert idx == wanted
    full = full_decode(clip)
    assert all(np.array_equal(f, full[i]) for f, i in zip(frames, wanted))
    with pytest.raises(ValueError, match="ascending"):
        decode_frames(clip, [5, 3], VideoOptions())


def test_frames_are_resized_to_the_pixel_budget_while_decoding(clip):
    frames, idx = read_video(clip, VideoOptions(max_frames=4, max_pixels=1536))  # 64x96 -> 32x48
    assert idx == uniform_indices(90, 4) and {f.shape for f in frames} == {(32, 48, 3)}
    full = full_decode(clip, hw=(32, 48))  # the scaler's own output at that size
    assert all(np.array_equal(f, full[i]) for f, i in zip(frames, idx))


def test_keyframe_seek_returns_the_keyframe_at_or_before_each_wanted_frame(clip):
    frames, idx = read_video(clip, VideoOptions(max_frames=8, seek="keyframe", max_pixels=None))
    want = uniform_indices(90, 8)
    assert idx == [w // 8 * 8 for w in want]  # keyframes every 8 frames
    assert [frame_number(f) for f in frames] == idx
    full = full_decode(clip)  # each keyframe decoded alone (decoder drained): a full decode's pixels
    assert all(np.array_equal(f, full[i]) for f, i in zip(frames, idx))


def test_frame_folders_images_and_bad_files(tmp_path, clip):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(10):
        Image.fromarray(np.full((8, 12, 3), 20 * k, np.uint8)).save(folder / f"{k:03d}.png")
    frames, idx = read_media(folder, "video", VideoOptions(max_frames=4))
    assert idx == [1, 3, 6, 8] and [int(f[0, 0, 0]) for f in frames] == [20, 60, 120, 160]
    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(tmp_path / "im.png")
    (f,), _ = read_media(tmp_path / "im.png", "image", VideoOptions(max_pixels=800))
    assert f.shape == (20, 40, 3)  # aspect kept within 800 px
    with pytest.raises(MediaError, match="not_there.mp4: media file not found"):
        read_media(tmp_path / "not_there.mp4", "video", VideoOptions())
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty.mp4: empty file"):
        read_media(tmp_path / "empty.mp4", "video", VideoOptions())
    (tmp_path / "junk.mp4").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(MediaError, match="junk.mp4: cannot decode video"):
        read_media(tmp_path / "junk.mp4", "video", VideoOptions())
    truncated = tmp_path / "truncated.mp4"  # the moov atom (index) is at the end: cut it off
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated.mp4"):
        read_media(truncated, "video", VideoOptions())
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(MediaError, match="bad.jpg: unreadable"):
        read_media(tmp_path / "bad.jpg", "image", VideoOptions())


def test_missing_pyav_is_a_clear_error_not_bad_media(clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match="needs PyAV"):
        read_media(clip, "video", VideoOptions())


def _count_decoded(monkeypatch):
    """Count the frames the seeking decoder gets out of the decoder."""
    import gasp_vlm.train.instructions.video as V

    n, orig = [0], V._Seeker._frames

    def frames(self):
        for f in orig(self):
            n[0] += 1
            yield f

    monkeypatch.setattr(V._Seeker, "_frames", frames)
    return n


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_skipping_non_reference_frames_keeps_the_pixels_of_a_full_decode(tmp_path, codec, monkeypatch):
    """skip_frame=NONREF is set only while the decoder is fed frames before the wanted one: B-frames
    nothing refers to are dropped, every returned frame (next to skipped ones, repeats, past the end)
    equals a full decode's."""
    av = pytest.importorskip("av")
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        pytest.skip(f"PyAV without {codec}")
    clip = write_clip(tmp_path / f"{codec}.mp4", 90, fps=10, gop=30, codec=codec)  # B-frames, keyframe every 30
    full = full_decode(clip)
    wanted = [2, 3, 11, 11, 17, 29, 30, 31, 58, 66, 88, 89]
    n = _count_decoded(monkeypatch)
    got = {}
    for skip in (True, False):
        n[0] = 0
        frames, idx = decode_frames(clip, wanted, VideoOptions(max_pixels=None, skip_nonref=skip))
        assert idx == wanted and [frame_number(f) for f in frames] == wanted
        assert all(np.array_equal(f, full[i]) for f, i in zip(frames, idx)), skip
        got[skip] = n[0]
    assert got[True] < got[False]  # frames were really skipped
    # a frame past the end (header over-reporting): the last frame, even when skipping dropped it at first
    frames, idx = decode_frames(clip, [70, 95], VideoOptions(max_pixels=None))
    assert idx == [70, 89] and np.array_equal(frames[1], full[89])


def test_nearest_key_moves_frames_to_keyframes_within_the_tolerance(clip):
    """Keyframes every 8 frames at 10 fps, tolerance 0.3 s = 3 frames: uniform [5, 16, 28, 39, 50, 61,
    73, 84] -> the nearest keyframe where one is <= 3 frames away (ties at 4 stay), the pixels those
    frames' in a full decode (the index of an mp4 with B-frames is in decode time: shifted to pts)."""
    frames, idx = read_video(clip, VideoOptions(max_frames=8, seek="nearest_key", seek_tolerance_s=0.3,
                                                max_pixels=None))
    assert idx == [8, 16, 28, 40, 48, 64, 72, 84]
    assert [frame_number(f) for f in frames] == idx
    full = full_decode(clip)
    assert all(np.array_equal(f, full[i]) for f, i in zip(frames, idx))
    _, idx0 = read_video(clip, VideoOptions(max_frames=8, seek="nearest_key", seek_tolerance_s=0, max_pixels=None))
    assert idx0 == uniform_indices(90, 8)
    with pytest.raises(ValueError, match="exact | nearest_key | keyframe"):
        VideoOptions(seek="nearest")


def test_decoder_threads_give_the_same_pixels(clip):
    wanted = [3, 9, 30, 47, 48, 89]
    frames, idx = decode_frames(clip, wanted, VideoOptions(max_pixels=None, threads=3))
    full = full_decode(clip)
    assert idx == wanted and all(np.array_equal(f, full[i]) for f, i in zip(frames, idx))


def test_benchmark_video_reports_cpu_wall_and_memory(clip):
    from gasp_vlm.train.bench_instructions import benchmark_video

    r = benchmark_video(clip, VideoOptions(max_frames=4), samples=1)
    assert r["indices"] == uniform_indices(90, 4)
    assert r["decode_cpu_s_per_sample"] > 0 and r["decode_s_per_sample"] > 0 and r["peak_rss_over_baseline_mib"] >= 0


def test_matroska_cues_are_read_so_frames_are_sought_and_exact(clip, tmp_path, monkeypatch):
    """A Matroska index (cues) is read by a first seek and holds presentation times: nearest_key lands
    on keyframes and exact frames are sought instead of decoded from the start."""
    import av

    mkv = tmp_path / "c.mkv"
    with av.open(str(clip)) as src, av.open(str(mkv), "w") as dst:
        si = src.streams.video[0]
        so = dst.add_stream_from_template(si)
        for p in src.demux(si):
            if p.dts is not None:
                p.stream = so
                dst.mux(p)
    full = full_decode(mkv)
    n = _count_decoded(monkeypatch)
    frames, idx = decode_frames(mkv, [5, 85, 86], VideoOptions(max_pixels=None, skip_nonref=False))
    assert idx == [5, 85, 86] and all(np.array_equal(f, full[i]) for f, i in zip(frames, idx))
    assert n[0] < 30  # 0..5, then a seek to the keyframe at 80 (not on from 5: 87 frames)
    frames, idx = read_video(mkv, VideoOptions(max_frames=8, seek="nearest_key", seek_tolerance_s=0.3, max_pixels=None))
    assert idx == [8, 16, 28, 40, 48, 64, 72, 84] and all(np.array_equal(f, full[i]) for f, i in zip(frames, idx))
