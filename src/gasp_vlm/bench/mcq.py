"""VLMEvalKit multiple-choice answer matching (`can_infer`), re-implemented from its rules per version.

Two real versions of `vlmeval/utils/matching_util.py` (open-compass/VLMEvalKit) differ in ways that move scores:

- ``FORK_2025_04``: the matching of VLMEvalKit before PR #1175, which is what the All-Angles fork
  (Chenyu-Wang567/All-Angles-Bench, VLMEvalkit/, released April 2025) ships. `can_infer_option`: replace
  the characters .()[],:;!*#{} with spaces and split; exactly one option letter among the tokens -> that
  letter; a refusal string -> "Z"; no option letter but a lone "Z" token -> "Z". `can_infer_text`: exactly
  one option text occurs (case-insensitive substring) -> that letter, with NO length limit.
- ``PR1175``: VLMEvalKit after PR #1175 ("Improve can_infer_option and can_infer_text", July 2025). The
  single option letter must also sit among the last five tokens (`splits.index(ch) > len(splits) - 5`,
  first occurrence), and `can_infer_text` refuses answers longer than twice the total option length.

Step 3 (GPT judge) is not available offline: the caller records it as `judge_unavailable` and the answer
as "Z" (wrong), which is what VLMEvalKit's exact-matching mode does.
"""

from __future__ import annotations

FORK_2025_04 = "fork-2025-04"  # pre-#1175 rules (All-Angles fork)
PR1175 = "pr1175"  # VLMEvalKit main after PR #1175
VERSIONS = (FORK_2025_04, PR1175)

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = ".()[],:;!*#{}"


def _check(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"unknown VLMEvalKit matching version {version!r}; use one of {VERSIONS}")
    return version


def infer_option_letter(answer: str, choices: dict[str, str], version: str = FORK_2025_04) -> str | None:
    """VLMEvalKit `can_infer_option` (its VERBOSE-only 'A as a quantifier' check is off by default)."""
    _check(version)
    if _API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    for ch in _SEPARATORS:
        answer = answer.replace(ch, " ")
    tokens = answer.split()
    present = [c for c in choices if c in tokens]
    if len(present) == 1:
        ch = present[0]
        # WHY: PR #1175 trusts a lone letter only near the end ("... so the answer is B")
        if version == PR1175 and not tokens.index(ch) > len(tokens) - 5:
            return None
        return ch
    if not present and "Z" in tokens:
        return "Z"
    return None


def infer_option_text(answer: str, choices: dict[str, str], version: str = FORK_2025_04) -> str | None:
    """VLMEvalKit `can_infer_text`: exactly one option text as a lower-case substring."""
    answer = answer.lower()
    if _check(version) == PR1175 and len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None  # WHY (PR #1175): a long ramble mentions option texts; leave it to the judge
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: dict[str, str], version: str = FORK_2025_04) -> str | None:
    """Return the inferred option letter, "Z" for a refusal, or None when a judge would be needed."""
    answer = str(answer)
    return infer_option_letter(answer, choices, version) or infer_option_text(answer, choices, version)
