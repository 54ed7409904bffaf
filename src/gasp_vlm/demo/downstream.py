"""Stage "downstream": held-out spatial QA, scored closed-set by answer likelihood and open by exact match.

The questions (data/scene_tasks.py: camera motion, which object is closer, objects counted across
views, same surface across views) come from the held-out rooms only; no model was trained on those
rooms, and GASP's fine-tuning saw no spatial question at all. Each model answers with the tokenisation
it was trained with (the adapter's frame mode: models/base.py), twice:

- **closed-set** (the headline, as lmms-eval scores multiple choice by ``loglikelihood``): the candidate
  answer of highest summed log-probability among the record's ``choices``. A tiny model that has not
  learned to *say* "left" may still rank it above "right"; this measures what it knows.
- **generated**: greedy generation (batched, left padding), exact match after ``normalize_answer``.

Accuracy per task, their mean ("overall"), and the answer prior (always the set's most frequent answer)
as the floor a model must beat.

Output: ``downstream/<model>.jsonl`` (one record per question; written once, reused on a rerun).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gasp_vlm.data.scene_tasks import SPATIAL_TASKS, load_task_set, normalize_answer
from gasp_vlm.io import write_jsonl_atomic


def answer_questions(adapter: Any, tasks_json: Path, out_file: Path, batch_size: int = 8) -> list[dict]:
    """Answer every question of ``tasks_json`` both ways (batches of one task: equal frame counts); returns
    (and writes) the records. Room to generate: the set's longest answer + 2 tokens."""
    from gasp_vlm.train.instructions.dataset import InstructionSet

    if out_file.exists():
        return [json.loads(line) for line in out_file.read_text().splitlines() if line.strip()]
    recs = load_task_set(tasks_json)
    reader = InstructionSet(tasks_json)  # frames and prompt exactly as the trainer reads a record
    max_new = 2 + max(len(adapter.tokenizer.encode(r["answer"], add_special_tokens=False)) for r in recs)
    by_task: dict[str, list[int]] = {}
    for i, rec in enumerate(recs):
        by_task.setdefault(rec["task"], []).append(i)
    out = []
    for rows in by_task.values():
        for start in range(0, len(rows), batch_size):
            ids = rows[start:start + batch_size]
            chunk = [recs[i] for i in ids]
            items = [reader.sample(i, num_frames=len(recs[i]["frames"])) for i in ids]
            questions = [it["prompt"] for it in items]
            frames = [it["frames"] for it in items]
            preds = adapter.generate_frames(frames, questions, max_new_tokens=max_new)
            logps = adapter.score_choices(frames, questions, [r["choices"] for r in chunk])
            for r, q, p, lp in zip(chunk, questions, preds, logps):
                choice = r["choices"][int(np.argmax(lp))]
                out.append({"id": r["id"], "task": r["task"], "question": q, "answer": r["answer"],
                            "choices": r["choices"], "logprobs": [round(x, 4) for x in lp], "choice": choice,
                            "correct": choice == r["answer"], "prediction": p,
                            "generated_correct": normalize_answer(p) == normalize_answer(r["answer"])})
    write_jsonl_atomic(out_file, out)
    return out


def score(records: list[dict], field: str = "correct") -> dict[str, Any]:
    """Accuracy of ``field`` per task (with its binomial standard error), overall = the mean over tasks."""
    res: dict[str, Any] = {"tasks": {}}
    for task in SPATIAL_TASKS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        acc = float(np.mean([r[field] for r in rows]))
        res["tasks"][task] = {"n": len(rows), "accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / len(rows))}
    accs = [t["accuracy"] for t in res["tasks"].values()]
    res["overall"] = float(np.mean(accs)) if accs else None
    return res


def answer_prior(tasks_json: Path) -> dict[str, Any]:
    """Accuracy of always giving each task's most frequent held-out answer (an optimistic blind guess)."""
    recs = load_task_set(tasks_json)
    fake = []
    for task in SPATIAL_TASKS:
        rows = [r for r in recs if r["task"] == task]
        if rows:
            top = Counter(normalize_answer(r["answer"]) for r in rows).most_common(1)[0][0]
            fake += [{"task": task, "correct": normalize_answer(r["answer"]) == top} for r in rows]
    return score(fake)


def evaluate_models(out: Path, model_paths: dict[str, Any], tasks_json: Path) -> dict[str, dict]:
    """{model: closed-set score + ``generated`` (the exact-match score)} of every model on the held-out
    spatial QA, plus ``answer prior``."""
    from gasp_vlm.models import load_adapter

    scores = {}
    for name, spec in model_paths.items():
        adapter = spec() if callable(spec) else load_adapter(str(spec))
        recs = answer_questions(adapter, tasks_json, out / "downstream" / f"{name}.jsonl")
        scores[name] = {**score(recs), "generated": score(recs, "generated_correct")}
        del adapter
    scores["answer prior"] = answer_prior(tasks_json)
    return scores
