"""lmms-eval requests -> gasp-vlm requests, with no lmms-eval import (unit-tested on hand-built tuples).

lmms-eval hands a "simple" model ``Instance.args`` tuples:
- generate_until:  (context, gen_kwargs, doc_to_visual, doc_id, task, split)
- loglikelihood:   (context, doc_to_target, doc_to_visual, doc_id, task, split)
- generate_until_multi_round: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)
where ``doc_to_visual(doc)`` gives a list of PIL images or video paths. They become the request dicts
``gasp eval`` builds (bench/runner.py): dict(prompt, images=[PIL] | None, video=[PIL] | None, min/max_pixels),
videos sampled with the same uniform K-frame rule (bench/media.py), so a model scored through lmms-eval
sees the pixels and chat format it sees under ``gasp eval``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from gasp_vlm.bench.media import VideoFrameCache

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# lmms-eval's prompts sometimes carry LLaVA-style placeholders; gasp adapters put the media before the text
# themselves (as lmms-eval's own Qwen models strip them)
_PLACEHOLDER = re.compile(r"<image>\n?|<video>\n?")


@dataclass(frozen=True)
class Decoding:
    """What an lmms-eval gen_kwargs dict asks for, in the adapter's ``generate`` terms."""

    max_new_tokens: int
    until: tuple[str, ...]
    sampling: tuple[tuple[str, Any], ...]  # extra generate kwargs (empty: greedy)

    def key(self) -> tuple:
        """Requests with equal keys can share one batched ``generate`` call."""
        return self.max_new_tokens, self.sampling


def decoding_of(gen_kwargs: dict | None, default_max_new_tokens: int) -> Decoding:
    """gen_kwargs -> Decoding: temperature 0 / do_sample false (the benchmark default) is greedy; a positive
    temperature samples with it (and top_p when given). ``until`` may be a string or a list."""
    gk = dict(gen_kwargs or {})
    until = gk.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
    temperature = float(gk.get("temperature") or 0.0)
    sampling: tuple[tuple[str, Any], ...] = ()
    if temperature > 0:
        extra = [("do_sample", True), ("temperature", temperature)]
        if gk.get("top_p") is not None:
            extra.append(("top_p", float(gk["top_p"])))
        sampling = tuple(extra)
    n = int(gk.get("max_new_tokens") or default_max_new_tokens)
    return Decoding(n, tuple(u for u in until if u), sampling)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string (lmms-eval's ``until`` contract)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def clean_context(context: str) -> str:
    return _PLACEHOLDER.sub("", context)


def to_request(context: str, visuals: Sequence[Any] | None, frames: int, pixels: dict[str, int] | None = None,
               videos: VideoFrameCache | None = None) -> dict:
    """One lmms-eval (context, visuals) -> a gasp request. Visuals: PIL images (each its own image) or one
    video path (``frames`` uniform frames, as ``gasp eval`` samples); mixing both, or two videos, is refused
    (no gasp adapter takes it)."""
    visuals = [v for v in (visuals or []) if v is not None]
    paths = [v for v in visuals if isinstance(v, (str, Path))]
    images = [v for v in visuals if isinstance(v, Image.Image)]
    other = [type(v).__name__ for v in visuals if not isinstance(v, (str, Path, Image.Image))]
    if other:
        raise ValueError(f"unsupported visual type(s) {sorted(set(other))}: expected PIL images or video paths")
    if paths and images:
        raise ValueError("a request with both images and a video: gasp adapters take one or the other")
    req: dict[str, Any] = {"prompt": clean_context(context), "images": None, "video": None}
    if paths:
        if len(paths) > 1:
            raise ValueError(f"{len(paths)} videos in one request; gasp adapters take one video")
        if not str(paths[0]).lower().endswith(VIDEO_SUFFIXES):
            raise ValueError(f"{paths[0]}: not a video file ({', '.join(VIDEO_SUFFIXES)}); images must be PIL images")
        req["video"] = (videos or VideoFrameCache(0)).read(paths[0], frames)[0]
    elif images:
        req["images"] = [im.convert("RGB") for im in images]
    if pixels:
        req.update(pixels)
    return req


def media_frames(request: dict) -> list[Image.Image]:
    """The frames a request shows, for ``score_choices`` (one frame list per prompt)."""
    return list(request.get("video") or request.get("images") or [])


def group_choices(items: Sequence[tuple[Any, str, str]]) -> tuple[list[Any], list[list[str]], list[tuple[int, int]]]:
    """Loglikelihood items (group key, context, continuation) -> (one key per distinct (key, context),
    the continuations of each, and for every item its (group, choice) position). Why: lmms-eval sends one
    request per option; ``score_choices`` scores all options of a question in one pass."""
    index: dict[tuple[Any, str], int] = {}
    keys: list[Any] = []
    choices: list[list[str]] = []
    where: list[tuple[int, int]] = []
    for key, context, continuation in items:
        g = index.setdefault((key, context), len(keys))
        if g == len(keys):
            keys.append((key, context))
            choices.append([])
        where.append((g, len(choices[g])))
        choices[g].append(continuation.strip())
    return keys, choices, where


def loglikelihood_results(scores: Sequence[Sequence[float]],
                          where: Sequence[tuple[int, int]]) -> list[tuple[float, bool]]:
    """Per item (log-probability, is_greedy); is_greedy: the option scores highest among its question's
    options (closed-set greedy; free generation is not run for it)."""
    return [(float(scores[g][j]), bool(scores[g][j] >= max(scores[g]))) for g, j in where]


def run_rounds(first: tuple[str, Sequence[Any] | None], doc: Any, doc_to_text: Callable[..., tuple],
               answer: Callable[[str, Sequence[Any] | None], str], max_rounds: int = 32) -> list[str]:
    """lmms-eval's multi-round protocol for one doc: round 0 answers (context, visuals); each later round
    calls ``doc_to_text(doc, previous_output=[...], round_idx=r, previous_round_info=info)`` -> (visuals,
    context, terminal, round_results, info), whose round_results replace the answers so far (as lmms-eval's
    own models keep them), and stops when terminal. Returns the answers of every round."""
    outputs = [answer(*first)]
    info = None
    for r in range(1, max_rounds + 1):
        visuals, context, terminal, results, info = doc_to_text(doc, previous_output=list(outputs), round_idx=r,
                                                                previous_round_info=info)
        outputs = list(results)
        if terminal:
            return outputs
        outputs.append(answer(context, visuals))
    raise RuntimeError(f"multi-round task did not terminate after {max_rounds} rounds")
