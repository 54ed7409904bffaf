"""Pieces of lmms-eval 0.7.3 that several task protocols share, re-implemented rule for rule.

- `strip_reasoning_tags`: lmms-eval/evaluator.py `_process_document_results` passes every response through
  `api/reasoning.py strip_reasoning_tags` before a task's process_results sees it. The CLI default of
  `--reasoning_tags` is [["<think>", "</think>"], ["<analysis>", "</analysis>"]], so a default run strips
  those blocks and, always, the surrounding whitespace.
- `extract_mcq_answer`: `tasks/_task_utils/mcq_extract.py`, the priority-ranked choice-letter extractor that
  Video-MME's `extract_characters_regex` calls in 0.7.3 (older releases used a prefix-stripping regex).

`lmms-eval 0.7.3` is the version `make test-ecosystem` installs; tests/test_bench_lmms_parity.py compares
these functions with the installed package.
"""

from __future__ import annotations

from typing import Sequence

LMMS_EVAL_VERSION = "0.7.3"
DEFAULT_REASONING_TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def strip_reasoning_tags(text: str, tag_pairs: Sequence[Sequence[str]] = DEFAULT_REASONING_TAGS) -> str:
    """Drop every closed <tag>...</tag> block (first start, first end after it), keep the text after a lone
    closing tag (chat templates that prefill the opening tag), then strip whitespace."""
    out = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in out and end_tag in out:
            i = out.find(start_tag)
            j = out.find(end_tag, i)
            if j == -1:  # the only end tag precedes the start tag: leave it
                break
            out = out[:i] + out[j + len(end_tag):]
        if end_tag in out and start_tag not in out:
            out = out.rsplit(end_tag, 1)[-1]
    return out.strip()


DEFAULT_CHOICES = tuple("ABCDEFGH")
# phrases that announce the answer; case-insensitive search, the letter itself is matched case-sensitively
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")  # Korean, Chinese, Japanese
# a higher rank wins; among candidates of one rank the later position wins
FORMAT_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
               "space": 2, "fallback": 0}
# (format, how the letter appears): each is looked up by its LAST occurrence in the padded text
_SUFFIX_FORMATS = (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                   ("space", "{} "))
_EDGE_PUNCT = (",", ".", "!", "?", ";", ":", "'", '"')


def extract_mcq_answer(response: str | None, choices: Sequence[str] | None = None) -> str:
    """The choice letter a response gives, "" if none. Case-sensitive: a lower-case "b" is no answer."""
    if not response or not response.strip():
        return ""
    letters = list(choices) if choices else list(DEFAULT_CHOICES)
    text = response.strip()
    for ch in _EDGE_PUNCT:  # one pass, in this order: "A.)" keeps its ")" because "." is stripped first
        text = text.strip(ch)
    text = f" {text} "  # pads so "A " and "(A)" also match at the edges

    cands: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for fmt, pattern in _SUFFIX_FORMATS:
        for ch in letters:
            pos = text.rfind(pattern.format(ch))
            if pos != -1:
                cands.append((FORMAT_RANK[fmt], pos, ch))
    lower = text.lower()
    for phrase in ANSWER_PHRASES:  # only the first occurrence of each phrase counts
        at = lower.find(phrase)
        if at != -1:
            for ch in letters:
                pos = text.find(ch, at + len(phrase))
                if pos != -1:
                    cands.append((FORMAT_RANK["phrase"], pos, ch))
    core = text.strip()
    for ch in letters:
        # WHY `startswith`, not `core[0] == ch`: upstream allows multi-character choices; kept general
        if core.startswith(ch) and (len(core) == 1 or not core[1].isalpha()):
            cands.append((FORMAT_RANK["start"], 0, ch))
    for ch in letters:
        if core.endswith(ch) and (len(core) == 1 or not core[-2].isalpha()):
            cands.append((FORMAT_RANK["end"], len(text) - 1, ch))
    if not cands:  # last resort: the letter anywhere, even inside a word ("Answer" -> A)
        cands = [(FORMAT_RANK["fallback"], text.rfind(ch), ch) for ch in letters if ch in text]
    if not cands:
        return ""
    # upstream sorts (rank, position) descending with a stable sort: ties keep insertion order
    best = max(cands, key=lambda c: (c[0], c[1]))
    return best[2]
