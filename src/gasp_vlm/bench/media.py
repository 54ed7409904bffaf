"""Media decoding for benchmark runs: uniform video frame sampling (PyAV) and image decoding.

Frame sampling follows the official VSI-Bench runs (llava_vid / LLaVA-OneVision): K indices
`np.linspace(0, N-1, K, dtype=int)` over all N decoded frames (repeats allowed when N < K).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from gasp_vlm.bench.records import Sample


class MediaError(RuntimeError):
    """A media file needed for a sample is missing or undecodable; the message names sample and file."""


def uniform_frame_indices(num_frames: int, k: int) -> list[int]:
    if num_frames <= 0:
        raise ValueError("video has no frames")
    if k <= 0:
        raise ValueError("frames must be >= 1")
    return np.linspace(0, num_frames - 1, k, dtype=int).tolist()


def video_header(path: str | Path) -> tuple[int, float | None, float | None]:
    """(frame count, average fps, guessed fps) of the first video stream, in one open; a rate the container
    does not give is None."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        average = float(stream.average_rate) if stream.average_rate else None
        guessed = float(stream.guessed_rate) if stream.guessed_rate else None
        if stream.frames:
            return int(stream.frames), average, guessed
        # container without a frame count: count video packets (one per frame for the codecs used here)
        return sum(1 for p in c.demux(stream) if p.size), average, guessed


def count_frames(path: str | Path) -> int:
    return video_header(path)[0]


def decode_at(path: str | Path, idx: Sequence[int]) -> tuple[dict[int, Image.Image], int, Image.Image | None]:
    """Decode from the start up to max(idx), keeping only the frames at ``idx`` (memory: those frames).
    Returns (RGB frame by index, frames decoded, the last decoded frame); an index past the real end (a header
    that over-reports frames) is missing from the dict. PyAV errors propagate."""
    import av

    wanted, got, n, last = set(idx), {}, 0, None
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in c.decode(stream):
            if n in wanted:
                got[n] = frame.to_image().convert("RGB")
            last, n = frame, n + 1
            if n > max(idx):
                break
    return got, n, (last.to_image().convert("RGB") if last is not None else None)


def read_video_frames(path: str | Path, k: int) -> tuple[list[Image.Image], list[int], int]:
    """Decode the K uniformly spaced frames of a video; return (frames RGB, indices, total frames).

    Decodes sequentially and keeps only the wanted frames, so memory stays at K frames. If the header's
    frame count was wrong (fewer frames decode), indices are recomputed on the true count.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    try:
        total = count_frames(path)
        for _attempt in range(2):
            idx = uniform_frame_indices(total, k)
            got, n, _ = decode_at(path, idx)
            if all(i in got for i in idx):
                return [got[i] for i in idx], idx, total
            total = n  # header over-reported the frame count: resample on what actually decodes
        raise MediaError(f"{path}: could not decode frames {sorted(set(idx) - set(got))}")
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise MediaError(f"cannot decode video {path}: {e}") from None


class VideoFrameCache:
    """The decoded frames of recently used videos, shared by all their questions (VSI-Bench asks ~18 per
    video, each of which would otherwise decode it again). LRU, bounded by the decoded RGB bytes (default
    1 GiB, ~12 videos of 32 frames at 720p); ``max_bytes=0`` turns it off. Keyed by path, frame count,
    mtime and size, so a file replaced on disk is decoded again. The PIL frames are shared: read-only."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, tuple[list[Image.Image], list[int], int, int]] = OrderedDict()
        self._bytes = 0
        self.decodes = 0
        self.hits = 0

    def read(self, path: str | Path, k: int) -> tuple[list[Image.Image], list[int], int]:
        """``read_video_frames(path, k)``, from the cache when the same video was read with the same k."""
        p = Path(path)
        st = p.stat() if p.is_file() else None
        key = (str(p.resolve()), int(k), st.st_mtime_ns, st.st_size) if st else None
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            frames, idx, total, _ = self._items[key]
            return frames, idx, total
        frames, idx, total = read_video_frames(p, k)
        self.decodes += 1
        size = sum(im.width * im.height * 3 for im in frames)
        if key is not None and size <= self.max_bytes:
            self._items[key] = (frames, idx, total, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                *_, old = self._items.popitem(last=False)[1]
                self._bytes -= old
        return frames, idx, total


def decode_image(src: bytes | str | Path) -> Image.Image:
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
        else:
            if not Path(src).is_file():
                raise MediaError(f"image not found: {src}")
            img = Image.open(src)
        return img.convert("RGB")
    except MediaError:
        raise
    except Exception as e:  # PIL raises several types for corrupt data
        raise MediaError(f"cannot decode image {src if not isinstance(src, (bytes, bytearray)) else '<bytes>'}: {e}") from None


def sample_images(sample: Sample) -> list[Image.Image]:
    """All images of an image-kind sample, in order (in-memory blobs first choice, else files)."""
    m = sample.media
    srcs: Sequence = m.blobs if m.blobs is not None else m.paths
    out = []
    for i, s in enumerate(srcs):
        try:
            out.append(decode_image(s))
        except MediaError as e:
            raise MediaError(f"{sample.benchmark} sample {sample.sample_id} image {i + 1}: {e}") from None
    return out


def check_media_exists(samples: Sequence[Sample]) -> None:
    """Fail early, before loading a model, when a referenced video/image file is missing."""
    for s in samples:
        if s.media.blobs is not None:
            continue
        for p in s.media.paths:
            if not (Path(p).is_file() or (s.media.kind == "video" and Path(p).is_dir())):  # dir: frame folder
                kind = "video" if s.media.kind == "video" else "image"
                raise MediaError(f"{s.benchmark} sample {s.sample_id}: {kind} file not found: {p}")
