"""Video-MME and MVBench: golden parsers, prompts, loaders on the fixture layouts, frame sampling, aggregation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gasp_vlm.bench import get_benchmark
from gasp_vlm.bench.fixtures import make_fixture
from gasp_vlm.bench.fixtures_video import MVB_FOLDER_FRAMES, folder_frame_level, make_mvbench, make_videomme
from gasp_vlm.bench.media import VideoFrameCache, check_media_exists
from gasp_vlm.bench.mvbench import POST_PROMPTS, TASKS, bounded_indices, mcq_process
from gasp_vlm.bench.records import Media, Prediction, Sample
from gasp_vlm.bench.registry import available_benchmarks, score_samples
from gasp_vlm.bench.runner import build_request
from gasp_vlm.bench.tables import BenchmarkDataError
from gasp_vlm.bench.videomme import extract_characters_regex


@pytest.fixture(scope="module")
def vmme_root(tmp_path_factory):
    return make_videomme(tmp_path_factory.mktemp("videomme"))


@pytest.fixture(scope="module")
def mvb_root(tmp_path_factory):
    return make_mvbench(tmp_path_factory.mktemp("mvbench"))


def test_both_registered():
    assert {"videomme", "mvbench"} <= set(available_benchmarks())
    assert get_benchmark("Video-MME").name == "videomme" and get_benchmark("mv-bench").name == "mvbench"
    for b in ("videomme", "mvbench"):
        bench = get_benchmark(b)
        assert bench.media_kind == "video" and bench.default_frames == 32
        assert bench.generation_config() == {"max_new_tokens": 16, "do_sample": False}


# ---- Video-MME: lmms-eval 0.7.3, lmms_eval/tasks/videomme/utils.py, extract_characters_regex, which calls
# lmms_eval/tasks/_task_utils/mcq_extract.py, extract_mcq_answer(s, choices=["A", "B", "C", "D"]) ------------------
@pytest.mark.parametrize("out,parsed", [
    ("A", "A"), ("(B)", "B"), ("The answer is C.", "C"), ("", ""), ("C. Berries.", "C"),
    ("I'm sorry, I cannot determine that from the video.", ""),     # refusal: no capital A-D
    ("The best answer is D", "D"), ("  b  ", ""),                    # lower-case letters never match
    ("Answer: C", "C"),               # 0.7.3: a standalone final letter ("end") outranks the "A" of "Answer"
    ("Best answer: D", "D"),          # (older lmms-eval's prefix-stripping rule read these two as "A" and "B")
    ("A and B are wrong, so D", "A"),  # "start" (rank 10) beats "end" (rank 9)
    ("I choose C because A is wrong.", "A"),  # every letter after an answer phrase counts; the last one wins
    ("(A) or (C)?", "C"), ("Cats", "C"),  # last "(X)"; fallback: any capital, even inside a word
    ("<think>A</think> B", "B"),       # the evaluator strips reasoning tags first (only in score())
    ("this clip is about people playing a sport outside on a nice sunny day", ""),
])
def test_videomme_extract_characters_regex_golden(out, parsed):
    from gasp_vlm.bench.lmms_eval_compat import strip_reasoning_tags

    assert extract_characters_regex(strip_reasoning_tags(out)) == parsed


def test_videomme_score_and_prompt(vmme_root):
    b = get_benchmark("videomme")
    s = b.load(vmme_root)[0]  # answer C
    assert [b.score(s, o).score for o in ("C", "(C)", "The answer is C.", "", "A")] == [1, 1, 1, 0, 0]
    assert b.render_prompt(s) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "Which kind of the decoration has the largest number?\nA. Apples.\nB. Candles.\nC. Berries.\n"
        "D. The three kinds are of the same number.\n\n"
        "Answer with the option's letter from the given choices directly.")
    paper = b.render_prompt(s, "paper")
    assert paper.startswith("Select the best answer to the following multiple-choice question based on the video. ")
    assert paper.endswith("D. The three kinds are of the same number.\nThe best answer is:")


def test_videomme_subtitle_prompts_by_hand(vmme_root):
    """videomme_w_subtitle: 8-frame 4-fps fixture videos, frames int(linspace(0, 7, 32)) = every frame; an entry
    [a, b) s covers frames int(4a) <= f < int(4b). The first video: entries 1 (f 0-1), 2 (f 2-4, two text lines:
    the first font span only), 3 (f 5, no font span: skipped), 4 (f 6-7); the second: entry 2 has entry 1's
    time range and replaces it; the third has no .srt."""
    b = get_benchmark("videomme-subtitles")
    assert b.name == "videomme_w_subtitle" and b.generation_config() == {"max_new_tokens": 16, "do_sample": False}
    ss = b.load(vmme_root)
    tail = ("\nSelect the best answer to the following multiple-choice question based on the video and the subtitles. "
            "Respond with only the letter (A, B, C, or D) of the correct option.\n")
    assert b.render_prompt(ss[0]) == (
        "This video's subtitles are listed below: \nWelcome to the history hour.\nToday we decorate the tree\n"
        "The star goes on top." + tail + "Which kind of the decoration has the largest number?\nA. Apples.\n"
        "B. Candles.\nC. Berries.\nD. The three kinds are of the same number.\nThe best answer is:")
    assert b.render_prompt(ss[2]).startswith(
        "This video's subtitles are listed below: \nIt runs home.\nHome at last." + tail + "Why does the rabbit")
    assert b.render_prompt(ss[4]).startswith(
        "This video's subtitles are listed below: \nNo subtitles available" + tail + "What is the score")
    # questions, parser and aggregation are Video-MME's own
    plain = get_benchmark("videomme").load(vmme_root)
    assert [(s.sample_id, s.answer, s.media.paths) for s in ss] == [(s.sample_id, s.answer, s.media.paths)
                                                                     for s in plain]


def test_subtitle_errors_name_the_file(tmp_path):
    from gasp_vlm.bench.subtitles import SubtitleError, read_srt, subtitle_text

    bad = tmp_path / "x.srt"
    bad.write_text("1\n00:00:01 --> 00:00:02\nhello\n")
    with pytest.raises(SubtitleError, match=r"x\.srt: entry 1: bad time line"):
        read_srt(bad)
    with pytest.raises(SubtitleError, match=r"nope\.mp4: no such video"):
        subtitle_text(str(tmp_path / "nope.mp4"), str(bad))


def test_videomme_loader(vmme_root):
    b = get_benchmark("videomme")
    ss = b.load(vmme_root)
    assert [s.sample_id for s in ss] == ["001-1", "001-2", "301-1", "301-2", "601-1", "601-2"]
    s = ss[0]
    assert (s.category, s.agg_group, s.answer, s.option_labels) == ("Counting Problem", "short", "C", list("ABCD"))
    assert s.meta["domain"] == "Knowledge" and s.meta["sub_category"] == "Humanity & History"
    assert s.media.paths == [str(vmme_root / "data" / "fFjv93ACGo8.mp4")]
    check_media_exists(ss)
    assert [s.sample_id for s in b.load(vmme_root, split="long")] == ["601-1", "601-2"]
    # the parquet itself as --data: videos still found at ROOT/data
    assert b.load(vmme_root / "videomme" / "test-00000-of-00001.parquet")[0].media.paths == s.media.paths


def test_videomme_mkv_fallback_and_layout_errors(tmp_path):
    root = make_videomme(tmp_path / "v")
    (root / "data" / "N1cdUjctpG8.mp4").rename(root / "data" / "N1cdUjctpG8.mkv")
    ss = get_benchmark("videomme").load(root)
    assert ss[2].media.paths[0].endswith("N1cdUjctpG8.mkv")  # lmms-eval: .mp4, then .MP4, then .mkv
    with pytest.raises(BenchmarkDataError, match=r"videomme/test-00000-of-00001\.parquet.*data/<videoID>\.mp4"):
        get_benchmark("videomme").load(tmp_path)  # no parquet: names the expected layout
    import pyarrow.parquet as pq

    p = root / "videomme" / "test-00000-of-00001.parquet"
    pq.write_table(pq.read_table(p).drop(["task_type"]), p)
    with pytest.raises(BenchmarkDataError, match="test-00000-of-00001.parquet.*task_type"):
        get_benchmark("videomme").load(root)


def test_videomme_aggregation_by_hand(vmme_root):
    b = get_benchmark("videomme")
    ss = b.load(vmme_root)
    # answers C A | B D | A B ; right: 001-1, 001-2, 301-1, 601-2 -> 4/6
    raw = {"001-1": "C", "001-2": "A", "301-1": "(B)", "301-2": "A", "601-1": "", "601-2": "The answer is B."}
    res, preds = score_samples(b, ss, raw)
    assert [p.score for p in preds] == [1, 1, 1, 0, 0, 1]
    assert res["overall"] == pytest.approx(400 / 6)  # micro over questions
    assert res["durations"] == {"short": 100.0, "medium": 50.0, "long": 50.0}
    assert res["domains"] == {"Knowledge": 100.0, "Film & Television": 50.0, "Sports Competition": 50.0}
    assert res["categories"]["Temporal Perception"] == 0.0 and res["categories"]["Counting Problem"] == 100.0
    # lmms-eval's TASK_CATEGORIES order
    assert list(res["categories"])[:3] == ["Temporal Perception", "Object Recognition", "OCR Problems"]
    assert res["sub_categories"]["Animation"] == 50.0 and res["category_counts"]["OCR Problems"] == 1


# ---- MVBench: lmms-eval 0.7.3, lmms_eval/tasks/mvbench/utils.py, mcq_acc (its inner `process` on both sides) --
@pytest.mark.parametrize("out,parsed", [
    ("A", "A"), ("(B)", "B"), ("The answer is C.", "C"), ("", ""), ("B. walking", "B"), ("(C) running", "C"),
    ("a", "A"), ("A.", "A"), ("D)", "D"),
    ("I cannot answer this question.", "i cannot answer this question"),  # refusal: kept as text, wrong
    ("It is a dog", "A"),             # upstream quirk: the article "a" is a standalone a-e letter
    ("Option F", "option f"),         # only A-E are letters
])
def test_mvbench_mcq_process_golden(out, parsed):
    assert mcq_process(out) == parsed


def test_mvbench_score_and_prompt(mvb_root):
    b = get_benchmark("mvbench")
    ss = {s.sample_id: s for s in b.load(mvb_root)}
    s = ss["action_sequence_0"]  # answer "Ate the medicine." = A
    assert [b.score(s, o).score for o in ("A", "(A)", "The answer is A.", "", "I don't know", "It is a cat")] \
        == [1, 1, 1, 0, 0, 1]
    assert b.render_prompt(s) == ("Question:What happened after the person took the food?\nOption:\n"
                                  "(A) Ate the medicine.\n(B) Tidied up the blanket.\n"
                                  "(C) Put down the cup/glass/bottle.\n(D) Took the box.\n"
                                  "Only give the best option.\n")
    assert b.render_prompt(ss["episodic_reasoning_0"]).endswith("(E) Nothing.\nOnly give the best option.\n")
    # lmms-eval 0.7.3, lmms_eval/tasks/mvbench/mvbench_<task>.yaml: all 20 post_prompts are the same
    assert set(POST_PROMPTS) == set(TASKS) and len(TASKS) == 20
    assert set(POST_PROMPTS.values()) == {"Only give the best option.\n"}


def test_mvbench_loader(mvb_root):
    b = get_benchmark("mvbench")
    ss = b.load(mvb_root)
    assert [s.sample_id for s in ss] == ["action_sequence_0", "action_sequence_1", "object_existence_0",
                                         "fine_grained_pose_0", "episodic_reasoning_0"]  # paper's task order
    s = ss[0]
    assert (s.category, s.answer, s.meta["answer_text"], s.meta["bound"]) == \
        ("action_sequence", "A", "Ate the medicine.", [0.5, 1.5])
    assert s.media.paths == [str(mvb_root / "video" / "star" / "Charades_v1_480" / "ZS9XR.mp4")]
    assert ss[2].answer == "C" and "bound" not in ss[2].meta
    assert ss[4].media.paths[0].endswith("tvqa/frames_fps3_hq/castle_s01e01_seg02_clip_00")
    check_media_exists(ss)  # a frame folder counts as the video
    assert [s.sample_id for s in b.load(mvb_root, split="object_existence")] == ["object_existence_0"]
    assert len(b.load(mvb_root / "json" / "action_sequence.json")) == 2


def test_mvbench_lmms_eval_video_revision_folders(tmp_path):
    # lmms-eval 0.7.3, lmms_eval/tasks/mvbench/utils.py, DATA_LIST / mvbench_doc_to_visual: the `video` revision
    # keeps pre-cut clips (e.g. star/Charades_segment); those are sampled whole, so no bound is applied
    from gasp_vlm.bench.fixtures import tiny_mp4
    from gasp_vlm.bench.mvbench import LMMS_EVAL_FOLDERS

    root = make_mvbench(tmp_path / "m", videos=False)
    assert LMMS_EVAL_FOLDERS["action_sequence"] == "star/Charades_segment" and len(LMMS_EVAL_FOLDERS) == 20
    tiny_mp4(root / "star" / "Charades_segment" / "ZS9XR.mp4")
    ss = {s.sample_id: s for s in get_benchmark("mvbench").load(root)}
    s = ss["action_sequence_0"]
    assert s.media.paths == [str(root / "star" / "Charades_segment" / "ZS9XR.mp4")] and "bound" not in s.meta
    _, idx = build_request(get_benchmark("mvbench"), s, "official", 4, None, VideoFrameCache(0))
    assert idx == [0, 2, 4, 7]  # uniform over the whole (pre-cut) clip
    assert "bound" in ss["episodic_reasoning_0"].meta  # no tvqa/video_fps3_hq_segment here: main layout


def test_mvbench_layout_errors(tmp_path):
    b = get_benchmark("mvbench")
    with pytest.raises(BenchmarkDataError, match=r"json.*ROOT/json/<task>\.json"):
        b.load(tmp_path)
    root = make_mvbench(tmp_path / "m", videos=False)
    rows = json.loads((root / "json" / "action_sequence.json").read_text())
    del rows[1]["start"]
    (root / "json" / "action_sequence.json").write_text(json.dumps(rows))
    with pytest.raises(BenchmarkDataError, match=r"action_sequence\.json: row 1.*start"):
        b.load(root)
    rows[1]["start"] = 0.0
    rows[0]["answer"] = "Danced."
    (root / "json" / "action_sequence.json").write_text(json.dumps(rows))
    with pytest.raises(BenchmarkDataError, match="row 0: answer 'Danced.' is not among the candidates"):
        b.load(root)


def test_mvbench_bounded_indices():
    # official get_index window: start=max(first, round(s*fps)), end=min(round(e*fps), max_frame)
    assert bounded_indices(8, 4.0, (0.5, 1.5), 4) == [2, 3, 4, 6]
    assert bounded_indices(8, 4.0, None, 4) == [0, 2, 4, 7]
    assert bounded_indices(12, 3, (1.0, 3.0), 4, first_idx=1) == [3, 5, 7, 9]   # frame files count from 1
    assert bounded_indices(12, 3, (0.0, 99.0), 2, first_idx=1) == [1, 12]
    assert bounded_indices(8, 4.0, (50.0, 60.0), 2) == [0, 7]  # bound past the end: whole clip


def test_mvbench_frames_follow_bounds_and_folders(mvb_root):
    b = get_benchmark("mvbench")
    ss = {s.sample_id: s for s in b.load(mvb_root)}
    req, idx = build_request(b, ss["action_sequence_0"], "official", 4, None, VideoFrameCache(0))
    assert idx == [2, 3, 4, 6] and len(req["video"]) == 4
    from gasp_vlm.bench.fixtures import frame_level

    got = [req["video"][i].getpixel((5, 5))[0] for i in range(4)]
    assert all(abs(g - frame_level(i)) <= 8 for g, i in zip(got, idx))  # the decoded frames are those frames
    req, idx = build_request(b, ss["episodic_reasoning_0"], "official", 4, None, VideoFrameCache(0))
    assert idx == [3, 5, 7, 9] and MVB_FOLDER_FRAMES == 12
    got = [im.getpixel((5, 5))[0] for im in req["video"]]
    assert all(abs(g - folder_frame_level(i)) <= 4 for g, i in zip(got, idx))
    _, idx = build_request(b, ss["object_existence_0"], "official", 4, None, VideoFrameCache(0))
    assert idx == [0, 2, 4, 7]  # unbounded: uniform over the whole video, as for VSI-Bench


def test_mvbench_aggregation_by_hand():
    b = get_benchmark("mvbench")

    def smp(i, task):
        return Sample("mvbench", f"{task}_{i}", "test", task, task, "mc", "q", ["x", "y"], ["A", "B"], "A",
                      Media("video", ["v.mp4"]), {"task": task})

    ss = [smp(i, "action_sequence") for i in range(4)] + [smp(i, "moving_count") for i in range(2)]
    # lmms-eval 0.7.3, lmms_eval/tasks/mvbench/utils.py, mvbench_aggregate_results: pred_answer == "" leaves the
    # denominator; pred_answer is the response after the evaluator's strip_reasoning_tags (whitespace too)
    raw = {"action_sequence_0": "A", "action_sequence_1": "B", "action_sequence_2": " <think>A</think>\n",
           "action_sequence_3": "(A)", "moving_count_0": "B"}  # moving_count_1 missing
    res, _ = score_samples(b, ss, raw)
    # action_sequence: the blank answer leaves the denominator (upstream), 2/3; moving_count: missing = 0, 0/2
    assert res["categories"] == {"action_sequence": pytest.approx(200 / 3), "moving_count": 0.0}
    assert res["overall"] == pytest.approx(100 / 3)  # unweighted mean of the tasks
    assert res["num_empty_excluded"] == 1 and res["num_missing"] == 1
    assert res["category_counts"] == {"action_sequence": 4, "moving_count": 2}


def test_make_fixture_dispatches(tmp_path):
    assert (make_fixture("videomme", tmp_path / "a") / "videomme" / "test-00000-of-00001.parquet").is_file()
    assert (make_fixture("mvbench", tmp_path / "b") / "json" / "episodic_reasoning.json").is_file()
    shutil.rmtree(tmp_path / "a")


# ---- `gasp eval` end to end with the tiny random preset (the pattern of test_bench_e2e.py) ------------------
@pytest.mark.parametrize("bench,limit", [("videomme", 3), ("videomme_w_subtitle", 3), ("mvbench", 5)])
def test_gasp_eval_end_to_end(tmp_path, bench, limit):
    from click.testing import CliRunner

    from gasp_vlm.cli import main

    root = make_fixture(bench, tmp_path / bench)
    out = tmp_path / "out"

    def run(n: int, out_dir: Path, batch: int) -> list[dict]:
        r = CliRunner().invoke(main, ["eval", "-b", bench, "--data", str(root), "--model", "tiny-qwen2.5-vl",
                                      "--out", str(out_dir), "--limit", str(n), "--max-new-tokens", "3", "--frames",
                                      "4", "--batch-size", str(batch), "--no-progress", "--min-pixels",
                                      str(56 * 56), "--max-pixels", str(112 * 112)])
        assert r.exit_code == 0, r.output + repr(r.exception)
        return [json.loads(x) for x in (out_dir / "predictions.jsonl").read_text().splitlines()]

    first = run(limit - 1, out, batch=2)  # batched (left-padded), then resumed for the last sample
    preds = run(limit, out, batch=2)
    assert preds[:-1] == first  # resume: the answered samples are kept, not regenerated
    one_by_one = run(limit, tmp_path / "one", batch=1)
    assert [p["raw_output"] for p in preds] == [p["raw_output"] for p in one_by_one]  # batching changes nothing
    b = get_benchmark(bench)
    samples = b.load(root)[:limit]
    assert [p["sample_id"] for p in preds] == [s.sample_id for s in samples]
    assert [p["prompt"] for p in preds] == [b.render_prompt(s) for s in samples]
    assert all(isinstance(p["raw_output"], str) for p in preds)
    if bench == "mvbench":  # bounded clip, whole videos, frame folder
        assert [p["frame_indices"] for p in preds] == [[2, 3, 4, 6], [0, 2, 4, 7], [0, 2, 4, 7], [0, 2, 4, 7],
                                                       [3, 5, 7, 9]]
    run = json.loads((out / "run.json").read_text())
    assert run["frames"] == 4 and run["generation"]["max_new_tokens"] == 3 and run["benchmark"] == bench
    assert ("bound" in run["frame_sampling"]) == (bench == "mvbench")
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == limit and res["num_missing"] == 0 and 0.0 <= res["overall"] <= 100.0
    assert set(res["categories"]) == {s.category for s in samples}


def test_lmms_eval_logs_map_to_our_samples(tmp_path, mvb_root, vmme_root):
    """lmms-eval --log_samples: Video-MME docs by question_id; MVBench (one log per task, doc_id restarting at 0,
    no id in the doc) by content; an MVBench row without its doc is refused rather than mapped by position."""
    from gasp_vlm.bench.external_logs import read_lmms_eval_samples

    mvb = get_benchmark("mvbench").load(mvb_root)
    rows = json.loads((mvb_root / "json" / "object_existence.json").read_text())
    log = [{"doc_id": 0, "doc": rows[0], "target": rows[0]["answer"], "filtered_resps": ["(C)"]}]
    recs = read_lmms_eval_samples(_write_log(tmp_path / "a.jsonl", log), mvb, "mvbench")
    assert [(r["sample_id"], r["raw_output"]) for r in recs] == [("object_existence_0", "(C)")]  # not position 0
    with pytest.raises(BenchmarkDataError, match="without its `doc`"):
        read_lmms_eval_samples(_write_log(tmp_path / "b.jsonl", [{"doc_id": 0, "filtered_resps": ["A"]}]),
                               mvb, "mvbench")
    vm = get_benchmark("videomme").load(vmme_root)
    log = [{"doc_id": 0, "doc": {"question_id": "301-2", "videoID": "N1cdUjctpG8"}, "filtered_resps": ["D"]}]
    recs = read_lmms_eval_samples(_write_log(tmp_path / "c.jsonl", log), vm, "videomme")
    assert [r["sample_id"] for r in recs] == ["301-2"]


def _write_log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
