"""Parity with the installed lmms-eval (0.7.3, what `make test-ecosystem` installs): our `lmms_eval` profiles of
VSI-Bench / BLINK / MMSI and the `official` profiles of Video-MME / MVBench against lmms-eval's own task utils.

(a) parsers + scores on a handcrafted battery and seeded random answer-like strings, (b) prompts rendered from
our fixtures' rows (which are the doc dicts lmms-eval's functions take), (c) aggregation on seeded random
per-sample results. Every response first goes through lmms-eval's `strip_reasoning_tags` with the CLI default
tags, as its evaluator does before process_results.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gasp_vlm.bench import get_benchmark, score_samples
from gasp_vlm.bench.lmms_eval_compat import DEFAULT_REASONING_TAGS, extract_mcq_answer, strip_reasoning_tags
from gasp_vlm.bench.records import Media, Sample

pytestmark = pytest.mark.ecosystem

FRAGMENTS = ["A", "B", "C", "D", "E", "F", "a", "b", "e", "(A)", "(B)", "(C)", "(D)", "(E)", "A.", "B.", "C:", "D)",
             "The answer is C.", "Answer: D", "answer is", "the correct answer is", "I choose", "Option", "``B``",
             "`C`", "{D}", "3", "2.5", "-1", ".5", "1,000", "0", "12", "three", "twenty", "one", "hundred", "and",
             "thousand", "Three", "five.", "cats", "It is a dog", "I think", "Best answer:", "<think>", "</think>",
             "<analysis>", "</analysis>", ".", ",", "!", "?", ";", ":", "'", '"', "(", ")", "-", "/", "\n", "\n\n",
             " ", "\t", "答案是", "选"]
BATTERY = ["", " ", "A", "(B)", "The answer is C.", "Answer: D", "B.", "e", "C. Berries.", "Best answer: D",
           "A and B are wrong, so D", "I choose C because A is wrong.", "Cats", "  b  ", "(A) or (C)?",
           "<think>A</think> C", "</think>B", "The correct answer is (B).", "I think the answer is C because",
           "``C``", "`D` is right", "{B}", "A bike is there", "It is a dog", "Option F", "three", "3", "2.5 m",
           "twenty-one chairs", "three hundred and five", ".5", "-.5", "1,000", "I cannot answer this question.",
           "b) right", "A.\nB.", "Answer:\n\nB", "答案是B"]
LETTERS = "ABCD"


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(["", " ", "\n", ", "]) + rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 6)))
            for _ in range(n)]


STRINGS = BATTERY + _random_strings(3000, 0)


def _upstream(task: str) -> Any:
    """lmms_eval.tasks.<task>.utils; videomme's imports cv2 for subtitles only, so a stub stands in if needed."""
    pytest.importorskip("lmms_eval")
    stub = None
    if task == "videomme" and importlib.util.find_spec("cv2") is None:
        stub = sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    try:
        return importlib.import_module(f"lmms_eval.tasks.{task}.utils")
    finally:
        if stub is not None and sys.modules.get("cv2") is stub:
            del sys.modules["cv2"]


def _yaml_kwargs(path: Path) -> dict:
    """lmms_eval_specific_kwargs.default of a task yaml (the `!function` lines dropped, as the utils do)."""
    import yaml

    text = "".join(ln for ln in path.read_text().splitlines(True) if "!function" not in ln)
    return yaml.safe_load(text)["lmms_eval_specific_kwargs"]["default"]


def _upstream_strip(raw: str) -> str:
    from lmms_eval.api.reasoning import strip_reasoning_tags as up

    return up(raw, [list(t) for t in DEFAULT_REASONING_TAGS])


def _mc(bench: str, answer: str, options: list[str], labels: list[str], sid: str = "x", category: str = "c",
        meta: dict | None = None, answer_type: str = "mc") -> Sample:
    return Sample(bench, sid, "test", category, category, answer_type, "q", options, labels, answer,
                  Media("video", ["v.mp4"]), meta or {})


def _old_videomme_rule(s: str) -> str:
    """The older lmms-eval Video-MME parser (prefix stripping, then the first capital A-D): must NOT pass."""
    import re

    s = s.strip()
    for p in ("The best answer is", "The correct answer is", "The answer is", "The answer"):
        s = s.replace(p, "")
    m = re.search("[ABCD]", s)
    return m[0] if m else ""


# ---- (a) parsers ------------------------------------------------------------------------------------------
def test_reasoning_strip_and_mcq_extract_parity():
    pytest.importorskip("lmms_eval")
    _upstream("videomme")
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer as up

    for raw in STRINGS:
        assert strip_reasoning_tags(raw) == _upstream_strip(raw), repr(raw)
        assert extract_mcq_answer(raw) == up(raw), repr(raw)
        assert extract_mcq_answer(raw, ["A", "B", "C", "D"]) == up(raw, choices=["A", "B", "C", "D"]), repr(raw)


def test_videomme_parser_and_score_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("videomme"), get_benchmark("videomme"), random.Random(1)
    for raw in STRINGS:
        doc = {"answer": rng.choice(LETTERS), "question_id": "q", "duration": "short", "domain": "Knowledge",
               "sub_category": "Law", "task_type": "OCR Problems", "videoID": "v"}
        theirs = up.videomme_process_results(doc, [_upstream_strip(raw)])["videomme_perception_score"]
        ours = bench.score(_mc("videomme", doc["answer"], [], list(LETTERS)), raw)
        assert (ours.parsed, ours.score) == (theirs["pred_answer"], theirs["score"]), repr(raw)
    # teeth: the old rule this module used to reproduce disagrees with 0.7.3
    assert any(_old_videomme_rule(s) != up.extract_characters_regex(s) for s in BATTERY)


def test_mvbench_score_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("mvbench"), get_benchmark("mvbench"), random.Random(2)
    for raw in STRINGS:
        cands = ["walk", "run", "sit", "jump", "swim"][:rng.randint(2, 5)]
        ans = rng.randrange(len(cands))
        theirs = up.mvbench_process_results({"candidates": cands, "answer": cands[ans]}, [_upstream_strip(raw)])
        sample = _mc("mvbench", "ABCDE"[ans], cands, list("ABCDE"[:len(cands)]))
        assert bench.score(sample, raw).score == theirs["mvbench_accuracy"]["score"], repr(raw)


def test_vsibench_score_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("vsibench"), get_benchmark("vsibench"), random.Random(3)
    for raw in STRINGS:
        if rng.random() < 0.5:
            doc = {"question_type": "route_planning", "ground_truth": rng.choice(LETTERS)}
            sample = _mc("vsibench", doc["ground_truth"], ["A. x", "B. y", "C. z", "D. w"], list(LETTERS))
            key = "accuracy"
        else:
            doc = {"question_type": "object_counting", "ground_truth": rng.choice(["3", "2.5", "12", "1000", "0.5"])}
            sample = _mc("vsibench", doc["ground_truth"], [], [], answer_type="numeric")
            key = "MRA:.5:.95:.05"
        theirs = up.vsibench_process_results(dict(doc), [_upstream_strip(raw)])["vsibench_overall"][key]
        assert bench.score(sample, raw, "lmms_eval").score == pytest.approx(float(theirs)), repr(raw)


def test_blink_parser_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("blink"), get_benchmark("blink"), random.Random(4)
    for raw in STRINGS:
        n = rng.randint(2, 5)
        gold = rng.choice("ABCDE"[:n])
        doc = {"idx": "x", "sub_task": "Counting", "answer": f"({gold})", "choices": [f"o{i}" for i in range(n)]}
        theirs = up.blink_process_results(doc, [_upstream_strip(raw)])["blink_acc"]
        ours = bench.score(_mc("blink", f"({gold})", doc["choices"], list("ABCDE"[:n])), raw, "lmms_eval")
        assert (ours.parsed, ours.score) == (theirs["pred_parsed"], float(theirs["is_correct"])), repr(raw)


def test_mmsi_score_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("mmsi_bench"), get_benchmark("mmsi"), random.Random(5)
    for raw in STRINGS:
        doc = {"id": 0, "question_type": "MSR", "answer": rng.choice(LETTERS)}
        theirs = up.msr_process_results(doc, [_upstream_strip(raw)])["average"]["score"]
        assert bench.score(_mc("mmsi", doc["answer"], [], list(LETTERS)), raw, "lmms_eval").score == theirs, repr(raw)


# ---- (b) prompts on the fixtures' rows ----------------------------------------------------------------------
def _task_dir(task: str) -> Path:
    return Path(_upstream(task).__file__).parent


def test_videomme_prompt_parity(tmp_path):
    pytest.importorskip("lmms_eval")
    from gasp_vlm.bench.fixtures_video import make_videomme
    from gasp_vlm.bench.tables import read_parquet_rows

    up, bench = _upstream("videomme"), get_benchmark("videomme")
    root = make_videomme(tmp_path / "v", videos=False)
    kwargs = _yaml_kwargs(_task_dir("videomme") / "videomme.yaml")
    assert kwargs["post_prompt"] == "\nAnswer with the option's letter from the given choices directly."
    rows = {str(r["question_id"]): r for r in read_parquet_rows(root / "videomme" / "test-00000-of-00001.parquet")}
    samples = bench.load(root)
    assert len(samples) == len(rows) > 0
    for s in samples:
        assert bench.render_prompt(s) == up.videomme_doc_to_text(rows[s.sample_id], kwargs)


def test_videomme_subtitle_prompt_parity(tmp_path, monkeypatch):
    """videomme_w_subtitle against upstream's videomme_doc_to_text_subtitle, which reads fps and frame counts with
    OpenCV itself: the fixture's subtitles (repeated time range, two-line entry, entry without a font span, a
    video without .srt) plus a 20-s 30-fps video with 200 entries, whose picked entries upstream joins in set
    order, not time order."""
    pytest.importorskip("lmms_eval")
    pytest.importorskip("cv2")
    from gasp_vlm.bench.fixtures import tiny_mp4
    from gasp_vlm.bench.fixtures_video import FONT, make_videomme
    from gasp_vlm.bench.subtitles import FRAME_NUM, subtitle_text
    from gasp_vlm.bench.tables import read_parquet_rows

    up, bench = _upstream("videomme"), get_benchmark("videomme_w_subtitle")
    root = make_videomme(tmp_path / "v")
    long_id = "Kb7Qm2xZ_0s"  # the fixture's third video: made long, with many short entries
    tiny_mp4(root / "data" / f"{long_id}.mp4", n_frames=600, fps=30)
    stamp = lambda t: f"00:00:{int(t):02d},{round(t % 1 * 1000):03d}"  # noqa: E731
    (root / "subtitle" / f"{long_id}.srt").write_text("\n\n".join(
        f"{i + 1}\n{stamp(i * 0.1)} --> {stamp(i * 0.1 + 0.1)}\n{FONT.format(f'line {i}')}" for i in range(200)) + "\n")
    monkeypatch.setattr(up, "base_cache_dir", str(tmp_path))
    monkeypatch.setattr(up, "cache_name", "v")
    kwargs = _yaml_kwargs(_task_dir("videomme") / "videomme_w_subtitle.yaml")
    assert kwargs["frame_num"] == FRAME_NUM
    rows = {str(r["question_id"]): r for r in read_parquet_rows(root / "videomme" / "test-00000-of-00001.parquet")}
    subtitle_text.cache_clear()
    samples = bench.load(root)
    assert len(samples) == len(rows) == 6
    for s in samples:
        assert bench.render_prompt(s) == up.videomme_doc_to_text_subtitle(rows[s.sample_id], kwargs)
    lines = subtitle_text(str(root / "data" / f"{long_id}.mp4"), str(root / "subtitle" / f"{long_id}.srt")).split("\n")
    assert len(lines) == 32 and lines != sorted(lines, key=lambda x: int(x.split()[1]))  # set order exercised


def test_mvbench_prompt_and_layout_parity(tmp_path):
    pytest.importorskip("lmms_eval")
    from gasp_vlm.bench.fixtures_video import make_mvbench
    from gasp_vlm.bench.mvbench import LMMS_EVAL_FOLDERS, POST_PROMPTS, TASKS

    up, bench, d = _upstream("mvbench"), get_benchmark("mvbench"), _task_dir("mvbench")
    kwargs = {t: _yaml_kwargs(d / f"mvbench_{t}.yaml") for t in TASKS}
    assert {t: k["post_prompt"] for t, k in kwargs.items()} == POST_PROMPTS  # all 20 tasks
    assert LMMS_EVAL_FOLDERS == up.DATA_LIST
    root = make_mvbench(tmp_path / "m", videos=False)
    samples = bench.load(root)
    assert samples
    for s in samples:
        task, i = s.category, int(s.sample_id.rsplit("_", 1)[1])
        doc = json.loads((root / "json" / f"{task}.json").read_text())[i]
        assert bench.render_prompt(s) == up.mvbench_doc_to_text(doc, kwargs[task])


def test_vsibench_prompt_parity(tmp_path):
    pytest.importorskip("lmms_eval")
    from gasp_vlm.bench.fixtures import make_vsibench

    up, bench = _upstream("vsibench"), get_benchmark("vsibench")
    kwargs = _yaml_kwargs(_task_dir("vsibench") / "_default_template_yaml")  # vsibench.yaml includes it
    root = make_vsibench(tmp_path / "v", videos=False)
    rows = {str(json.loads(ln)["id"]): json.loads(ln) for ln in (root / "test.jsonl").read_text().splitlines() if ln}
    samples = bench.load(root)
    assert {s.answer_type for s in samples} == {"mc", "numeric"}
    for s in samples:
        assert bench.render_prompt(s, "lmms_eval") == up.vsibench_doc_to_text(rows[s.sample_id], kwargs)


def test_blink_and_mmsi_prompt_parity(tmp_path):
    pytest.importorskip("lmms_eval")
    from gasp_vlm.bench.fixtures import make_blink, make_mmsi
    from gasp_vlm.bench.tables import read_parquet_rows

    blink, up_b = get_benchmark("blink"), _upstream("blink")
    kwargs = _yaml_kwargs(_task_dir("blink") / "_default_template_yaml")
    root = make_blink(tmp_path / "b")
    rows = {str(r["idx"]): r for p in sorted(root.glob("*/val-*.parquet"))
            for r in read_parquet_rows(p, ["idx", "choices", "prompt"])}
    for s in blink.load(root):
        assert blink.render_prompt(s, "lmms_eval") == up_b.blink_doc_to_text(rows[s.sample_id], kwargs)
    mmsi, up_m = get_benchmark("mmsi"), _upstream("mmsi_bench")
    kwargs = _yaml_kwargs(_task_dir("mmsi_bench") / "msr_bench.yaml")
    path = make_mmsi(tmp_path / "m") / "MMSI_Bench.parquet"
    rows = {str(r["id"]): r for r in read_parquet_rows(path, ["id", "question"])}
    for s in mmsi.load(path):
        assert mmsi.render_prompt(s, "lmms_eval") == up_m.msr_doc_to_text(rows[s.sample_id], kwargs)
        s.question = f"  {s.question}\n"  # msr_doc_to_text strips the question
        assert mmsi.render_prompt(s, "lmms_eval") == up_m.msr_doc_to_text({"question": s.question}, kwargs)


# ---- (c) aggregation on seeded random results ---------------------------------------------------------------
def _answers(rng: random.Random, n: int) -> list[str]:
    pool = _random_strings(n, rng.randint(0, 10**6))
    return [rng.choice(LETTERS) if rng.random() < 0.5 else pool[i] for i in range(n)]


def test_videomme_aggregation_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("videomme"), get_benchmark("videomme"), random.Random(6)
    samples, raw, results = [], {}, []
    for i, out in enumerate(_answers(rng, 400)):
        doc = {"question_id": str(i), "duration": rng.choice(up.VIDEO_TYPE), "domain": rng.choice(up.CATEGORIES),
               "sub_category": rng.choice(up.SUB_CATEGORIES), "task_type": rng.choice(up.TASK_CATEGORIES),
               "answer": rng.choice(LETTERS), "videoID": "v"}
        results.append(up.videomme_process_results(doc, [_upstream_strip(out)])["videomme_perception_score"])
        samples.append(_mc("videomme", doc["answer"], [], list(LETTERS), str(i), doc["task_type"],
                           {k: doc[k] for k in ("duration", "domain", "sub_category")}))
        raw[str(i)] = out
    res, _ = score_samples(bench, samples, raw)
    assert res["overall"] == pytest.approx(up.videomme_aggregate_results(results))
    for dur in up.VIDEO_TYPE:  # lmms-eval logs these: correct / answered per duration
        rs = [r for r in results if r["duration"] == dur]
        assert res["durations"][dur] == pytest.approx(100 * sum(r["pred_answer"] == r["answer"] for r in rs) / len(rs))


def test_mvbench_aggregation_parity():
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.metrics import aggregate_subtask_metrics

    up, bench, rng = _upstream("mvbench"), get_benchmark("mvbench"), random.Random(7)
    samples, raw, per_task = [], {}, {}
    for i, out in enumerate(_answers(rng, 300)):
        task = rng.choice(["action_sequence", "moving_count", "episodic_reasoning"])
        out = rng.choice([out, "", "  ", "<think>x</think>"]) if rng.random() < 0.2 else out
        cands = ["p", "q", "r", "s"]
        ans = rng.randrange(4)
        r = up.mvbench_process_results({"candidates": cands, "answer": cands[ans]}, [_upstream_strip(out)])
        per_task.setdefault(task, []).append(r["mvbench_accuracy"])
        samples.append(_mc("mvbench", "ABCD"[ans], cands, list("ABCD"), f"{task}_{i}", task))
        raw[f"{task}_{i}"] = out
    res, _ = score_samples(bench, samples, raw)
    theirs = {t: up.mvbench_aggregate_results(rs) for t, rs in per_task.items()}
    assert res["categories"] == pytest.approx(theirs)
    # no group score upstream; ours is the plain mean of the task scores (aggregate_subtask_metrics, unweighted)
    assert res["overall"] == pytest.approx(aggregate_subtask_metrics(list(theirs.values()), [1] * len(theirs), False))


def test_vsibench_aggregation_parity():
    pytest.importorskip("lmms_eval")
    up, bench, rng = _upstream("vsibench"), get_benchmark("vsibench"), random.Random(8)
    types_ = up.MCA_QUESTION_TYPES + up.NA_QUESTION_TYPES
    samples, raw, docs = [], {}, []
    for i, out in enumerate(_answers(rng, 400)):
        qt = types_[i % len(types_)]
        if qt in up.MCA_QUESTION_TYPES:
            gt = rng.choice(LETTERS)
            s = _mc("vsibench", gt, ["A. x", "B. y", "C. z", "D. w"], list(LETTERS), str(i), qt)
            out = rng.choice([gt, out])
        else:
            gt = rng.choice(["3", "2.5", "12", "0.8"])
            s = _mc("vsibench", gt, [], [], str(i), qt, answer_type="numeric")
            out = rng.choice([gt, str(float(gt) * rng.uniform(0.4, 1.6)), out])
        s.agg_group = "object_rel_direction" if qt.startswith("object_rel_direction") else qt
        docs.append(up.vsibench_process_results({"question_type": qt, "ground_truth": gt},
                                                [_upstream_strip(out)])["vsibench_overall"])
        samples.append(s)
        raw[str(i)] = out
    res, _ = score_samples(bench, samples, raw, "lmms_eval")
    assert res["overall"] / 100 == pytest.approx(up.vsibench_aggregate_overall(docs), abs=1e-6)
    for task in ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation"):
        fn = getattr(up, f"vsibench_aggregate_{task}_mra")
        assert res["categories"][task] / 100 == pytest.approx(fn(docs), abs=1e-6)
    for task in ("object_rel_distance", "object_rel_direction", "route_planning", "obj_appearance_order"):
        fn = getattr(up, f"vsibench_aggregate_{task}_accuracy")
        assert res["categories"][task] / 100 == pytest.approx(fn(docs), abs=1e-6)


def test_blink_and_mmsi_aggregation_parity():
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.metrics import aggregate_subtask_metrics

    rng = random.Random(9)
    blink, up_b = get_benchmark("blink"), _upstream("blink")
    samples, raw, per_task = [], {}, {}
    for i, out in enumerate(_answers(rng, 300)):
        task, gold = rng.choice(["Counting", "Jigsaw", "Multi-view_Reasoning"]), rng.choice("AB")
        doc = {"idx": str(i), "sub_task": task, "answer": f"({gold})", "choices": ["x", "y"]}
        per_task.setdefault(task, []).append(up_b.blink_process_results(doc, [_upstream_strip(out)])["blink_acc"])
        samples.append(_mc("blink", f"({gold})", ["x", "y"], ["A", "B"], str(i), task))
        raw[str(i)] = out
    res, _ = score_samples(blink, samples, raw, "lmms_eval")
    theirs = {t: up_b.blink_aggregate_results(rs) for t, rs in per_task.items()}
    assert {t: v / 100 for t, v in res["categories"].items()} == pytest.approx(theirs)
    # the `blink` group: aggregate_metric_list blink_acc, mean, weight_by_size False
    assert res["overall"] / 100 == pytest.approx(aggregate_subtask_metrics(list(theirs.values()), [1] * 3, False))

    mmsi, up_m = get_benchmark("mmsi"), _upstream("mmsi_bench")
    samples, raw, results = [], {}, []
    cats = ["MSR", "Motion (Cam.)", "Attribute (Meas.)", "Positional Relationship (Cam.\u2013Obj.)"]
    for i, out in enumerate(_answers(rng, 300)):
        doc = {"id": i, "question_type": rng.choice(cats), "answer": rng.choice(LETTERS)}
        results.append(up_m.msr_process_results(doc, [_upstream_strip(out)])["average"])
        samples.append(_mc("mmsi", doc["answer"], [], list(LETTERS), str(i), doc["question_type"]))
        raw[str(i)] = out
    res, _ = score_samples(mmsi, samples, raw, "lmms_eval")
    assert res["overall"] / 100 == pytest.approx(up_m.msr_aggregate_results(results))
    for c in cats:
        assert res["categories"][c] / 100 == pytest.approx(
            up_m.msr_aggregate_results([r for r in results if r["l2_category"] == c]))
