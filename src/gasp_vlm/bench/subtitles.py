"""Video-MME subtitles: the .srt files of `lmms-lab/Video-MME` (subtitle.zip -> ROOT/subtitle/<videoID>.srt) and
the subtitle text lmms-eval 0.7.3's `videomme_w_subtitle` task puts before the question.

An entry of a Video-MME .srt (blank-line separated)::

    12
    00:01:02,500 --> 00:01:04,000
    <font color="white" size=".72c">what the speaker says</font>

The rule (lmms-eval `videomme_doc_to_text_subtitle` with its default `frame_num: 32`):
- entries keyed by their (start, end) time: a repeated time range keeps its last text at its first place;
  an entry's lines after the time line are joined with spaces;
- times -> frames as int(seconds * fps), with the video's fps and frame count from its header;
- 32 frames sampled by int(linspace(0, total - 1, 32)); an entry is picked when a sampled frame f has
  start <= f < end;
- the picked entries are joined in Python's iteration order of the *set* of their indices (upstream's
  ``list(set(...))``), which is not time order once indices pass the set's table size; the same order is
  kept here so that prompts match token for token;
- an entry's text is the first ``<font color="white" size=".72c">...</font>`` span; entries without one are
  skipped; texts are joined with newlines.
- no .srt file for the video: "No subtitles available".
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from gasp_vlm.bench.media import video_header

FRAME_NUM = 32  # videomme_w_subtitle.yaml, lmms_eval_specific_kwargs.default.frame_num
NO_SUBTITLES = "No subtitles available"
FONT_SPAN = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


class SubtitleError(ValueError):
    """An .srt file that cannot be read (names the file and the entry)."""


def srt_seconds(stamp: str) -> float:
    """"HH:MM:SS,mmm" -> seconds."""
    try:
        hms, ms = stamp.strip().split(",")
        h, m, s = hms.split(":")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000
    except ValueError as e:
        raise SubtitleError(f"not an .srt time stamp: {stamp!r}") from e


def read_srt(path: str | Path) -> dict[tuple[float, float], str]:
    """(start s, end s) -> text of every entry with a time line and at least one text line, in file order."""
    path = Path(path)
    entries: dict[tuple[float, float], str] = {}
    for k, block in enumerate(path.read_text(encoding="utf-8").split("\n\n")):
        lines = block.split("\n")
        if not block.strip() or len(lines) < 3:
            continue
        try:
            start, end = (srt_seconds(t) for t in lines[1].split(" --> "))
        except (SubtitleError, ValueError) as e:
            raise SubtitleError(f"{path}: entry {k + 1}: bad time line {lines[1]!r}") from e
        entries[(start, end)] = " ".join(lines[2:])
    return entries


@functools.lru_cache(maxsize=64)
def subtitle_text(video: str, srt: str, frame_num: int = FRAME_NUM) -> str:
    """The subtitle block of one video's prompt (cached: a video's questions share it)."""
    if not Path(srt).is_file():
        return NO_SUBTITLES
    if not Path(video).is_file():
        raise SubtitleError(f"{video}: no such video; the subtitles of {srt} are picked at its frames")
    # fps and frame count from the header, as lmms-eval's OpenCV reads them (CAP_PROP_FPS, CAP_PROP_FRAME_COUNT)
    total, average, guessed = video_header(video)
    fps = average or guessed or 0.0
    spans = [(int(a * fps), int(b * fps), text) for (a, b), text in read_srt(srt).items()]
    picked = [i for f in np.linspace(0, total - 1, frame_num, dtype=int).tolist()
              for i, (a, b, _) in enumerate(spans) if a <= f < b]
    texts = []
    for i in list(set(picked)):  # upstream's order (see the module docstring)
        m = FONT_SPAN.search(spans[i][2])
        if m:
            texts.append(m.group(1))
    return "\n".join(texts)
