"""Media decoding for benchmark runs: uniform video frame sampling (PyAV) and image decoding.

Frame sampling follows the official VSI-Bench runs (llava_vid / LLaVA-OneVision): K indices
`np.linspace(0, N-1, K, dtype=int)` over all N decoded frames (repeats allowed when N < K).
"""

from __future__ import annotations

import io
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


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        # container without a frame count: count video packets (one per frame for the codecs used here)
        return sum(1 for p in c.demux(stream) if p.size)


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
        total = _count_frames(path)
        for _attempt in range(2):
            idx = uniform_frame_indices(total, k)
            wanted = set(idx)
            got: dict[int, Image.Image] = {}
            n = 0
            with av.open(str(path)) as c:
                stream = c.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in c.decode(stream):
                    if n in wanted:
                        got[n] = frame.to_image().convert("RGB")
                    n += 1
                    if n > idx[-1]:
                        break
            if all(i in got for i in wanted):
                return [got[i] for i in idx], idx, total
            total = n  # header over-reported the frame count: resample on what actually decodes
        raise MediaError(f"{path}: could not decode frames {sorted(wanted - set(got))}")
    except av.error.FFmpegError as e:  # type: ignore[attr-defined]
        raise MediaError(f"cannot decode video {path}: {e}") from None


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
            if not Path(p).is_file():
                kind = "video" if s.media.kind == "video" else "image"
                raise MediaError(f"{s.benchmark} sample {s.sample_id}: {kind} file not found: {p}")
