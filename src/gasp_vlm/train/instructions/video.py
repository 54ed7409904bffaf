"""Media for instruction samples: frame indices chosen first, then only those frames decoded.

Videos are decoded with PyAV (optional: ``pip install 'gasp-vlm[video]'``) by seeking: for each wanted
frame (in order) the decoder either continues forward, when the keyframe before that frame is not past
the last decoded frame (seeking would decode the same frames again), or seeks to that keyframe (the
container's index says where keyframes are; an mp4 index is in decode time, shifted to display time).
Each kept frame is converted to RGB and resized to the pixel budget by the decoder's scaler
(``VideoFrame.reformat``) as it is decoded; no other frame is ever converted, so memory is bounded by
the kept frames plus the decoder's reference frames. Exact frames cost every frame from the keyframe
before each wanted one (the lower bound for a frame-exact decode) with two savings that keep every
returned frame equal to a full decode's: H.264/HEVC frames that the bitstream marks as non-reference
(most B-frames) are not decoded while the decoder is fed frames before the wanted one
(``skip_frame = NONREF``; ``skip_nonref=False`` turns it off), and a wanted keyframe the decoder will
not go on from is decoded alone (its packet, then a drain: none of the frames behind it).

Frame selection (``VideoOptions.sampling``):
- ``uniform``: n = max_frames indices at the centres of n equal segments, floor((i + 0.5)·T/n);
- ``fps``: n = T/video_fps·fps frames (clamped to [min_frames, min(max_frames, T)], rounded down to an
  even count as Qwen's temporal patch of 2 wants), at round(linspace(0, T-1, n)) -- the rule of
  qwen-vl-utils (FPS 2, at most FPS_MAX_FRAMES).

Approximate, faster seeking (the indices returned say which frames came out; their pixels are still
a full decode's of those frames):
- ``seek: nearest_key`` moves each wanted frame to the nearest keyframe (either side) when one is at
  most ``seek_tolerance_s`` (1 s) away, else decodes it exactly: with keyframes every <= 2 s (most web
  video) every frame moves, by at most the tolerance;
- ``seek: keyframe`` replaces each wanted frame by the keyframe at or before it, however far (one seek
  + one keyframe decode per frame; repeats possible).
A frame folder is read as its sorted images (same index rule), an image file as a one-frame clip.
Everything that makes a file unusable (missing, empty, undecodable, no frames) raises ``MediaError``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# decoders whose skip_frame=NONREF drops only frames the bitstream marks as never used for prediction
# (H.264 nal_ref_idc 0, HEVC sub-layer non-reference pictures)
NONREF_SAFE_CODECS = ("h264", "hevc")
SAMPLINGS = ("uniform", "fps")  # how frame indices are chosen (module docstring); the config checks these too
SEEK_MODES = ("exact", "nearest_key", "keyframe")


class MediaError(RuntimeError):
    """A media file of a sample is missing, empty or undecodable (the sample can be skipped)."""


@dataclass(frozen=True)
class VideoOptions:
    sampling: str = "uniform"  # uniform | fps
    max_frames: int = 8  # uniform: the frame count; fps: the cap
    fps: float = 2.0
    min_frames: int = 4  # fps sampling only
    max_pixels: int | None = 448 * 448  # per decoded frame, aspect kept (None: original size)
    seek: str = "exact"  # exact | nearest_key | keyframe
    threads: int = 1  # decoder threads (1: one core per loader process; > 1: slice threads, PyAV's default)
    seek_tolerance_s: float = 1.0  # nearest_key: how far (seconds) a wanted frame may move to a keyframe
    skip_nonref: bool = True  # exact frames: the decoder drops non-reference frames it never returns

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"video sampling {self.sampling!r}: choose {' | '.join(SAMPLINGS)}")
        if self.seek not in SEEK_MODES:
            raise ValueError(f"video seek {self.seek!r}: choose {' | '.join(SEEK_MODES)}")
        if self.max_frames < 1 or self.fps <= 0 or self.min_frames < 1 or self.seek_tolerance_s < 0:
            raise ValueError("video options: max_frames and min_frames must be >= 1, fps > 0, "
                             "seek_tolerance_s >= 0")


def uniform_indices(total: int, n: int) -> list[int]:
    """n frame indices at the centres of n equal segments of [0, total) (repeats when total < n)."""
    if total <= 0:
        raise MediaError("video has no frames")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def fps_indices(total: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> list[int]:
    """qwen-vl-utils' rule: total/video_fps·fps frames, clamped, even, spread by round(linspace)."""
    if total <= 0:
        raise MediaError("video has no frames")
    lo = 2 * math.ceil(min_frames / 2)
    hi = 2 * (min(max_frames, total) // 2)
    n = min(max(total / video_fps * fps, lo), hi, total)
    n = max(1, 2 * int(n // 2)) if total >= 2 else 1
    return np.round(np.linspace(0, total - 1, n)).astype(int).tolist()


def choose_indices(total: int, video_fps: float | None, opts: VideoOptions) -> list[int]:
    if opts.sampling == "fps" and video_fps:
        return fps_indices(total, video_fps, opts.fps, opts.min_frames, opts.max_frames)
    return uniform_indices(total, opts.max_frames)


def fit_pixels(h: int, w: int, max_pixels: int | None) -> tuple[int, int]:
    """(h, w) scaled down (aspect kept, even sides for YUV scalers) to at most max_pixels; never up."""
    if not max_pixels or h * w <= max_pixels:
        return h, w
    s = math.sqrt(max_pixels / (h * w))
    return max(2, int(h * s) // 2 * 2), max(2, int(w * s) // 2 * 2)


def _import_av():
    try:
        import av
    except ImportError as e:  # optional dependency; not a bad-media case: every video would fail
        raise ImportError("decoding video files needs PyAV -- pip install 'gasp-vlm[video]' (or av), "
                          "or store clips as folders of frame images") from e
    return av


def probe_video(path: str | Path) -> tuple[int, float]:
    """(frame count, average fps) of a video from its header (frame count from the duration if absent)."""
    av = _import_av()
    with av.open(str(path)) as c:
        return _probe(c.streams.video[0], c)


def _probe(stream, container) -> tuple[int, float]:
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    total = int(stream.frames or 0)
    if total <= 0:
        dur = float(stream.duration * stream.time_base) if stream.duration else \
            (container.duration / 1e6 if container.duration else 0.0)
        total = int(round(dur * fps))
    return total, fps


class _Seeker:
    """Decode frames by index from one open stream (see the module docstring)."""

    def __init__(self, container, stream, fps: float, size_hw: tuple[int, int], skip_nonref: bool = True) -> None:
        self.c, self.s, self.fps = container, stream, fps
        self.tb = float(stream.time_base)
        self.start = stream.start_time or 0
        self.h, self.w = size_hw
        self.keys = self._keyframes(container, stream)
        self.it = None
        self.cur = -1  # index of the last decoded frame
        self.last = None  # that frame
        self._pending = None
        # skip non-reference frames before the wanted one (see _frames); only for codecs whose
        # "non-reference" flag is the bitstream's own (no later frame can depend on a skipped one)
        self.cc = stream.codec_context
        self.can_skip = skip_nonref and self.cc.name in NONREF_SAFE_CODECS
        self.skip_below = -1  # packets of frames before this index may be skipped when non-reference
        self.skipped = False  # a frame was skipped since the last seek
        self._skipping = False

    def _keyframes(self, container, stream) -> list[int]:
        """Frame indices of the keyframes in the container's index. An mp4/mov index holds decode time
        stamps: with B-frames a keyframe is shown a fixed delay later, read from the first keyframe
        packet (pts - dts; the decoder is positioned by a seek before any frame is decoded). Other
        indexes (Matroska cues, read by a first seek) hold presentation time stamps. Only speed and where ``nearest_key``
        moves a frame depend on these: every returned frame is decoded exactly."""
        mov = "mov" in container.format.name.split(",")
        if not mov:  # Matroska reads its cues at the first seek
            try:
                container.seek(self.start, stream=stream)
            except _import_av().error.FFmpegError:
                pass
        if not len(stream.index_entries):
            return []
        shift = 0
        if mov:
            for n, packet in enumerate(container.demux(stream)):
                if packet.is_keyframe and packet.pts is not None and packet.dts is not None:
                    shift = packet.pts - packet.dts
                    break
                if n >= 32:
                    break
        return [self._index(e.timestamp + shift) for e in stream.index_entries if e.is_keyframe]

    def _index(self, pts: int) -> int:
        return int(round((pts - self.start) * self.tb * self.fps))

    def _key_before(self, i: int) -> int | None:
        j = bisect.bisect_right(self.keys, i)
        return self.keys[j - 1] if j else None

    def _seek(self, i: int) -> None:
        self.c.seek(self.start + int(i / self.fps / self.tb), stream=self.s, backward=True, any_frame=False)
        self.it = self._frames()
        self.cur, self.last, self._pending, self.skipped = -1, None, None, False

    def _frames(self):
        """Decoded frames from the demuxer, packet by packet (what ``container.decode`` does), with the
        decoder told to drop non-reference frames (``skip_frame = NONREF``) while it is given packets of
        frames before ``skip_below``: those are never returned (wanted indices ascend) and no other frame
        is predicted from them, so every frame that is decoded has the same pixels as in a full decode."""
        for packet in self.c.demux(self.s):
            if self.can_skip:
                skip = packet.pts is not None and self._index(packet.pts) < self.skip_below
                if skip != self._skipping:
                    self.cc.skip_frame = "NONREF" if skip else "DEFAULT"
                    self._skipping = skip
                self.skipped |= skip
            yield from self.cc.decode(packet)

    def _seek_at_or_before(self, i: int) -> None:
        """Seek so that the next decoded frame is at or before frame i. A container may seek by decode
        time stamps: with B-frames the keyframe after i can then be chosen; back off until it is not."""
        target, back = i, 1
        self.skip_below = -1  # the first frame after a seek is looked at: decode it
        while True:
            self._seek(target)
            frame = self._next()
            if frame is None or self.cur <= i or target == 0:
                self._pending = frame
                return
            target, back = max(0, i - back), back * 4

    def _next(self):
        if self._pending is not None:  # the frame _seek_at_or_before looked at
            frame, self._pending = self._pending, None
            return frame
        frame = next(self.it, None)
        if frame is None:
            return None
        self.cur = self._index(frame.pts) if frame.pts is not None else self.cur + 1
        self.last = frame
        return frame

    def _rgb(self, frame) -> np.ndarray:
        return frame.reformat(width=self.w, height=self.h, format="rgb24", interpolation="AREA").to_ndarray()

    def _key_alone(self, i: int):
        """Seek to the keyframe at or before frame i and decode its packet alone, then drain the
        decoder: the keyframe comes out without the frames after it that the decoder's reordering
        delay (B-frames) would otherwise decode first. The decoder must be sought again afterwards."""
        self._seek(i)
        self.it = None  # drained
        if self._skipping:
            self.cc.skip_frame, self._skipping = "DEFAULT", False
        for packet in self.c.demux(self.s):
            if packet.size and packet.is_keyframe:  # (frames of packets before one would not decode)
                frames = [*self.cc.decode(packet), *self.cc.decode(None)]
                if not frames or frames[0].pts is None:
                    return None
                self.cur, self.last = self._index(frames[0].pts), frames[0]
                return frames[0]
        return None

    def exact(self, i: int, after: int | None = None) -> tuple[np.ndarray, int]:
        """Frame i; ``after``: the next wanted index (None: none), so that a keyframe can be decoded
        alone when the decoder will not go on from it."""
        if self.last is not None and self.cur == i:  # a repeated index
            return self._rgb(self.last), i
        key = self._key_before(i)
        # continue when the decoder is already past the keyframe before i (or no index is known and
        # the gap is short); else seek there
        ahead = self.it is not None and self.cur < i and (key is None and i - self.cur <= 2 * self.fps
                                                         or key is not None and key <= self.cur)
        if not ahead and key == i and (after is None or self._key_before(after) != i):
            frame = self._key_alone(i)
            if frame is not None and self.cur == i:
                return self._rgb(frame), i
        if not ahead:
            self._seek_at_or_before(i)
        self.skip_below = i
        while True:
            prev = self.last if self.cur >= 0 else None
            frame = self._next()
            if frame is None:  # past the end (header over-reports frames): the last frame
                if self.skipped:  # it may have been skipped: decode the tail again, every frame
                    self._seek_at_or_before(i)
                    self.skip_below = -1
                    continue
                if prev is None:
                    raise MediaError(f"no frame decodes at or after index {i}")
                return self._rgb(prev), self.cur
            if self.cur >= i:
                return self._rgb(frame), self.cur

    def snap(self, wanted: list[int], tolerance: float) -> list[int]:
        """Each wanted index moved to the nearest keyframe (either side, ties: the earlier) when one is
        at most ``tolerance`` frames away, else kept. Still ascending: a frame between a wanted frame
        and the keyframe it moved to is even nearer to that keyframe."""
        if not self.keys:
            return list(wanted)
        out = []
        for i in wanted:
            j = bisect.bisect_right(self.keys, i)
            near = [k for k in self.keys[max(0, j - 1): j + 1] if abs(k - i) <= tolerance]
            out.append(min(near, key=lambda k: (abs(k - i), k)) if near else i)
        return out

    def keyframe(self, i: int, after: int | None = None) -> tuple[np.ndarray, int]:
        key = self._key_before(i)
        if key is not None and self.last is not None and key == self.cur:  # the same keyframe again
            return self._rgb(self.last), self.cur
        frame = self._key_alone(i)
        if frame is None:  # no keyframe packet decodes alone: the first frame decoding gives
            self._seek(i)
            frame = self._next()
        if frame is None:
            raise MediaError(f"no frame decodes near index {i}")
        return self._rgb(frame), self.cur


def read_video(path: str | Path, opts: VideoOptions) -> tuple[list[np.ndarray], list[int]]:
    """The chosen frames of a video file (RGB uint8, resized to the budget) and their indices."""
    return decode_frames(path, None, opts)


def decode_frames(path: str | Path, indices: list[int] | None, opts: VideoOptions) -> tuple[list[np.ndarray], list[int]]:
    """Frames ``indices`` (ascending; None: chosen by ``opts``) of a video, decoded by seeking."""
    av = _import_av()
    path = Path(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise MediaError(f"{path}: no video stream")
            s = c.streams.video[0]
            s.thread_count = max(1, opts.threads)
            total, fps = _probe(s, c)
            wanted = choose_indices(total, fps, opts) if indices is None else list(indices)
            if any(b < a for a, b in zip(wanted, wanted[1:])):
                raise ValueError(f"{path}: frame indices must be ascending, got {wanted}")
            seeker = _Seeker(c, s, fps, fit_pixels(s.codec_context.height, s.codec_context.width, opts.max_pixels),
                             skip_nonref=opts.skip_nonref)
            if opts.seek == "nearest_key":
                wanted = seeker.snap(wanted, opts.seek_tolerance_s * fps)
            get = seeker.keyframe if opts.seek == "keyframe" else seeker.exact
            frames, got = [], []
            for n, i in enumerate(wanted):
                f, j = get(i, wanted[n + 1] if n + 1 < len(wanted) else None)
                frames.append(f)
                got.append(j)
            return frames, got
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode video ({e})") from None


def read_media(path: str | Path, kind: str, opts: VideoOptions) -> tuple[list[np.ndarray], list[int]]:
    """Frames + indices of a sample's media: ``kind`` video (file or frame folder) or image."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: media file not found")
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise MediaError(f"{path}: frame folder without images")
            idx = choose_indices(len(files), None, opts)
            return [_load_image(files[i], opts.max_pixels) for i in idx], idx
        if path.stat().st_size == 0:
            raise MediaError(f"{path}: empty file (0 bytes)")
        if kind == "image" or path.suffix.lower() in IMAGE_EXTS:
            return [_load_image(path, opts.max_pixels)], [0]
        return read_video(path, opts)
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"{path}: unreadable ({e})") from None


def _load_image(path: Path, max_pixels: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        h, w = fit_pixels(im.height, im.width, max_pixels)
        if (h, w) != (im.height, im.width):
            im = im.resize((w, h), resample=Image.BICUBIC)
        return np.asarray(im)
