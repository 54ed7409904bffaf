"""VLMEvalKit-style multiple-choice answer matching (`can_infer`), re-implemented from its documented rules.

Step 1 (option letter): replace the characters .()[],:;!*#{} with spaces, split on whitespace; if
exactly one option letter occurs among the tokens, that is the answer. Known refusal strings map to
"Z"; a lone "Z" token (and no option letter) also maps to "Z".
Step 2 (option text): if the output is not longer than twice the total option length, and exactly
one option's text occurs in it (case-insensitive substring), that option is the answer.
Step 3 (GPT judge) is not available offline: the caller records it as `judge_unavailable` and the
answer as "Z" (wrong), which is what VLMEvalKit's exact-matching mode does.
"""

from __future__ import annotations

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = ".()[],:;!*#{}"


def infer_option_letter(answer: str, choices: dict[str, str]) -> str | None:
    if _API_FAILURE in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    for ch in _SEPARATORS:
        answer = answer.replace(ch, " ")
    tokens = answer.split()
    present = [c for c in choices if c in tokens]
    if len(present) == 1:
        return present[0]
    if not present and "Z" in tokens:
        return "Z"
    return None


def infer_option_text(answer: str, choices: dict[str, str]) -> str | None:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None  # WHY: a long ramble mentions many option texts; VLMEvalKit refuses to guess
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def can_infer(answer: str, choices: dict[str, str]) -> str | None:
    """Return the inferred option letter, "Z" for a refusal, or None when a judge would be needed."""
    answer = str(answer)
    return infer_option_letter(answer, choices) or infer_option_text(answer, choices)
