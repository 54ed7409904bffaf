"""Golden scorer + aggregation cases from the official rules (hand-computed expectations)."""

from __future__ import annotations

import pytest

from gasp_vlm.bench import get_benchmark, score_samples
from gasp_vlm.bench.blink import official_parse
from gasp_vlm.bench.fixtures import make_all_angles, make_blink, make_mmsi, make_vsibench
from gasp_vlm.bench.mcq import FORK_2025_04, PR1175, can_infer
from gasp_vlm.bench.mmsi import canonical_category, extract_letter, split_options
from gasp_vlm.bench.records import Sample
from gasp_vlm.bench.registry import LMMS_EVAL_QWEN2_5_VL
from gasp_vlm.bench.vsibench import MRA_THRESHOLDS, extract_number, mean_relative_accuracy


def _sample(bench: str, answer: str, answer_type: str = "mc", options=("left", "right"), category="c") -> Sample:
    return Sample(bench, "x", "test", category, category, answer_type, "q?", list(options),
                  list("ABCDE"[:len(options)]), answer)


# ---- VSI-Bench ----------------------------------------------------------------------------------------

def test_mra_thresholds_are_ten_points():
    assert len(MRA_THRESHOLDS) == 10 and MRA_THRESHOLDS[0] == 0.5 and MRA_THRESHOLDS[-1] == 0.95


@pytest.mark.parametrize("pred,gt,expected", [
    (5, 4, 0.6), (6, 4, 0.1), (11, 10, 0.9), (13, 10, 0.5), (7, 10, 0.5), (12, 10, 0.6), (1.05, 1, 1.0), (2, 1, 0.0),
    (4, 4, 1.0), (float("nan"), 4, 0.0), (float("inf"), 4, 0.0)])
def test_mra_golden(pred, gt, expected):
    assert mean_relative_accuracy(pred, gt) == pytest.approx(expected, abs=1e-12)


VSI = get_benchmark("vsibench")


@pytest.mark.parametrize("raw,expected", [
    ("A", 1.0), ("A.", 1.0), ("a", 1.0), ("(A)", 0.0), ("The answer is (B)", 0.0), ("The answer is A", 0.0),
    ("three", 0.0), ("", 0.0), ("A. left", 1.0), ("B", 0.0)])
def test_vsi_mca_first_word(raw, expected):
    for profile in ("official", "lmms_eval"):
        assert VSI.score(_sample("vsibench", "A"), raw, profile).score == expected


@pytest.mark.parametrize("raw,official,lmms", [
    ("3", 1.0, 1.0), ("3.", 1.0, 1.0), ("3 chairs", 1.0, 1.0), ("three", 0.0, 1.0), ("There are 3 chairs.", 0.0, 1.0),
    ("", 0.0, 0.0), ("(3)", 0.0, 1.0), ("4", 0.4, 0.4), ("3.0", 1.0, 1.0)])
def test_vsi_numeric_official_vs_lmms_eval(raw, official, lmms):
    s = _sample("vsibench", "3", "numeric", options=())
    assert VSI.score(s, raw, "official").score == pytest.approx(official)
    assert VSI.score(s, raw, "lmms_eval").score == pytest.approx(lmms)


def test_extract_number_words():
    assert extract_number("twenty-one") == 21 and extract_number("Seven chairs") == 7
    assert extract_number("about 2.5 meters, maybe three") == 2.5 and extract_number("none") is None


# lmms-eval lmms_eval/tasks/vsibench/utils.py extract_number (read on the 0.7.3 wheel; our function agreed
# with it on 20,000 random strings): digits need a leading digit, so ".5" is read as 5 (not 0.5); a
# number-word run skips "and" and ends at the first other word; hundred / thousand scale; whichever of
# digits and words starts first wins
@pytest.mark.parametrize("raw,value", [
    (".5", 5.0), ("about .5 m", 5.0), ("three hundred", 300.0), ("two thousand five hundred", 2500.0),
    ("one hundred twenty chairs", 120.0), ("twenty-one", 21.0), ("3 chairs, not four", 3.0), ("-2", -2.0),
    ("three hundred and five", 305.0), ("three, four", 7.0), ("one apple, room 2", 1.0),
    ("Someone saw 4", 4.0), ("hundred", 100.0), ("", None), ("no idea", None)])
def test_extract_number_upstream_rules(raw, value):
    assert extract_number(raw) == value


def test_vsi_lmms_eval_scores_number_words_and_leading_dot():
    three_hundred = _sample("vsibench", "300", "numeric", options=())
    assert VSI.score(three_hundred, "three hundred chairs", "lmms_eval").score == 1.0
    five = _sample("vsibench", "5", "numeric", options=())
    assert VSI.score(five, ".5", "lmms_eval").score == 1.0  # read as 5
    assert VSI.score(five, ".5", "official").score == 0.0   # official float(".5") = 0.5: |0.5-5|/5 = 0.9


def test_vsi_aggregation_macro_over_tasks_with_rel_direction_rollup(tmp_path):
    samples = VSI.load(make_vsibench(tmp_path / "vsi", videos=False))
    by_type = {}
    for s in samples:
        by_type.setdefault(s.category, []).append(s.sample_id)
    preds = {
        by_type["object_counting"][0]: "5",        # gt 4 -> 0.6
        by_type["object_counting"][1]: "13",       # gt 10 -> 0.5
        by_type["object_abs_distance"][0]: "2.5",  # 1.0
        by_type["object_size_estimation"][0]: "",  # 0
        # room_size_estimation: missing -> 0
        by_type["object_rel_distance"][0]: "B.",   # 1
        by_type["object_rel_direction_easy"][0]: "A",     # 1
        by_type["object_rel_direction_medium"][0]: "(C)",  # 0
        by_type["object_rel_direction_hard"][0]: "d",     # 1
        by_type["route_planning"][0]: "The answer is A",   # 0
        by_type["obj_appearance_order"][0]: "A",           # 1
    }
    res, _ = score_samples(VSI, samples, preds)
    cats = res["categories"]
    assert list(cats) == ["object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
                          "object_rel_distance", "object_rel_direction", "route_planning", "obj_appearance_order"]
    assert cats["object_counting"] == pytest.approx(55.0)
    assert cats["object_rel_direction"] == pytest.approx(200 / 3)
    # overall = mean of the 8 task scores (not of the 11 questions, which would be 6.1/11 = 55.45)
    assert res["overall"] == pytest.approx(100 * (0.55 + 1 + 0 + 0 + 1 + 2 / 3 + 0 + 1) / 8)
    assert res["subcategories"]["object_rel_direction_medium"] == 0.0
    assert res["num_missing"] == 1 and res["num_samples"] == 11
    assert res["headline"] == {"object_counting": pytest.approx(55.0)}


# ---- BLINK ---------------------------------------------------------------------------------------------

BLINK = get_benchmark("blink")


@pytest.mark.parametrize("raw,parsed,judge", [
    ("A", "(A)", False), ("(A)", "(A)", False), ("A.", None, True), ("The answer is (B)", "(B)", False),
    ("three", None, True), ("", None, True), ("(A) or (B)", None, True), ("(C)", "(C)", False),
    ("I think (A).\n\nFinal: (B)", "(B)", False), ("(A) hmm (B)\n\nso (B)", "(B)", False)])
def test_blink_official_parser(raw, parsed, judge):
    assert official_parse(raw, 2) == parsed
    r = BLINK.score(_sample("blink", "(A)"), raw, "official")
    assert r.judge_unavailable == judge
    assert r.score == (1.0 if parsed == "(A)" else 0.0)


# lmms-eval 0.7.3, lmms_eval/tasks/blink/utils.py, _extract_answer_letter (via blink_process_results, which
# accepts only the question's own letters; here two options: A, B). Older lmms-eval read "The answer..." as "T".
@pytest.mark.parametrize("raw,letter", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("a", "A"), ("b) right", "B"), ("", ""), ("three", ""),
    ("The answer is (B)", "B"), ("The correct answer is (B).", "B"), ("Answer: b", "B"),
    ("I pick (C) not (B)", "B"),              # last "(X)" among the valid letters; C is not an option
    ("I think the answer is C because", ""),  # C is not an option; nothing else qualifies
    ("Both (A) and B", "A"), ("<think>B</think>\n(A)", "A")])
def test_blink_lmms_eval_extract_answer_letter(raw, letter):
    r = BLINK.score(_sample("blink", "(A)"), raw, "lmms_eval")
    assert r.parsed == letter and r.score == (1.0 if letter == "A" else 0.0)


def test_blink_macro_vs_micro(tmp_path):
    samples = BLINK.load(make_blink(tmp_path / "blink"))
    ids = {}
    for s in samples:
        ids.setdefault(s.category, []).append(s.sample_id)
    mvr = ids["Multi-view_Reasoning"]  # gold (A) (A) (B) (B)
    preds = {mvr[0]: "A", mvr[1]: "(A)", mvr[2]: "A", mvr[3]: "(B)",          # 3/4
             ids["Relative_Depth"][0]: "B", ids["Relative_Depth"][1]: "A",    # 1/2 (gold B, B)
             ids["Counting"][0]: "(C)",                                        # 1/1
             ids["Art_Style"][0]: "B"}                                         # 0/1
    official, _ = score_samples(BLINK, samples, preds, "official")
    assert official["overall"] == pytest.approx(100 * (0.75 + 0.5 + 1 + 0) / 4)  # 56.25: macro over subtasks
    assert official["micro_overall"] == pytest.approx(62.5)
    assert official["multi_view_reasoning"] == pytest.approx(75.0)
    vlmeval, _ = score_samples(BLINK, samples, preds, "vlmevalkit")
    assert vlmeval["overall"] == pytest.approx(62.5)  # VLMEvalKit's Overall is micro


def test_blink_vlmevalkit_is_one_version_with_qwen_sizing():
    # VLMEvalKit after PR #1175 throughout: Qwen2VLChat (Qwen2.5-VL config) decoding + image sizing, and
    # matching_util.can_infer with the letter-near-the-end rule
    assert BLINK.generation_config("vlmevalkit") == {"max_new_tokens": 2048, "do_sample": False}
    assert BLINK.pixel_config("vlmevalkit") == {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}
    assert BLINK.pixel_config("official") is None
    s = _sample("blink", "(A)")
    r = BLINK.score(s, "(A) is correct since the camera moves left around the object", "vlmevalkit")
    assert (r.parsed, r.judge_unavailable) == ("Z", True)  # letter is token 0 of 11; text too long (> 2 * 9)
    assert BLINK.score(s, "The answer is (A)", "vlmevalkit").score == 1.0


@pytest.mark.parametrize("name", ["vsibench", "blink", "mmsi"])
def test_lmms_eval_profiles_carry_lmms_eval_qwen2_5_vl_defaults(name):
    # lmms-eval lmms_eval/models/simple/qwen2_5_vl.py Qwen2_5_VL.__init__: min_pixels=256*28*28, max_pixels=1605632,
    # max_num_frames=32, system_prompt="You are a helpful assistant."
    b = get_benchmark(name)
    cfg = b.model_config("lmms_eval")
    assert cfg == LMMS_EVAL_QWEN2_5_VL and cfg["max_num_frames"] == 32
    assert cfg["system_prompt"] == "You are a helpful assistant."
    assert b.pixel_config("lmms_eval") == {"min_pixels": 200704, "max_pixels": 1605632}
    assert b.model_config("official") is None


# ---- All-Angles (VLMEvalKit can_infer) ------------------------------------------------------------------

CH = {"A": "two", "B": "three", "C": "four"}


@pytest.mark.parametrize("raw,expected", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("The answer is (B)", "B"), ("three", "B"), ("", None),
    ("A or B", None), ("Cannot determine the answer", "Z"), ("Z", "Z"), ("**C**: four", "C"),
    ("two or three", None), ("B) three", "B")])
def test_can_infer(raw, expected):
    assert can_infer(raw, dict(CH)) == expected


# open-compass/VLMEvalKit vlmeval/utils/matching_util.py can_infer_option / can_infer_text, two versions:
# before PR #1175 (the All-Angles fork, Chenyu-Wang567/All-Angles-Bench VLMEvalkit/) there is no length limit
# on the option-text match and a lone option letter counts anywhere; after PR #1175 the text match refuses
# answers longer than 2x the total option length (here 2 * 12) and the letter must be among the last 5 tokens
# (splits.index(ch) > len(splits) - 5).
@pytest.mark.parametrize("raw,fork,pr1175", [
    ("well, I would finally say three is right", "B", None),  # 41 chars > 24: only the fork reads "three"
    ("B is correct because the views show the chair on the left side", "B", None),  # B is token 0 of 13
    ("The answer is B", "B", "B"), ("three", "B", "B"), ("A", "A", "A"), ("A or B", None, None)])
def test_can_infer_versions(raw, fork, pr1175):
    assert can_infer(raw, dict(CH)) == fork  # default: the fork's (pre-#1175) rules
    assert can_infer(raw, dict(CH), FORK_2025_04) == fork
    assert can_infer(raw, dict(CH), PR1175) == pr1175


def test_all_angles_official_is_the_fork_and_vlmevalkit_is_pr1175():
    aa = get_benchmark("all_angles")
    s = _sample("all_angles", "B", options=("two", "three", "four"))
    long = "well, I would finally say three is right"
    r = aa.score(s, long, "official")  # fork can_infer_text: no length limit -> "B"
    assert (r.parsed, r.score, r.judge_unavailable) == ("B", 1.0, False)
    r = aa.score(s, long, "vlmevalkit")  # PR #1175: too long for the text match -> judge -> "Z"
    assert (r.parsed, r.score, r.judge_unavailable) == ("Z", 0.0, True)
    assert aa.pixel_config("vlmevalkit") == aa.pixel_config("official") == {"min_pixels": 1003520,
                                                                              "max_pixels": 12845056}


def test_all_angles_micro_average(tmp_path):
    aa = get_benchmark("all_angles")
    samples = aa.load(make_all_angles(tmp_path / "aa"))
    gold = [s.answer for s in samples]
    assert gold == ["B", "A", "C", "A", "B", "C", "A", "C"]
    preds = {"0": "B", "1": "A.", "2": "(A)", "3": "left", "4": "The answer is (B)", "5": "C", "7": "three"}
    res, scored = score_samples(aa, samples, preds)
    assert [p.score for p in scored] == [1, 1, 0, 1, 1, 1, 0, 0]
    assert res["overall"] == pytest.approx(62.5)  # micro; the category macro would be 72.2
    assert res["categories"]["camera_pose_estimation"] == pytest.approx(100 / 3)
    assert res["num_missing"] == 1 and res["judge_unavailable"] == 1
    assert res["judge_unavailable_by_category"] == {samples[7].category: 1}
    assert scored[7].parsed == "Z" and scored[7].judge_unavailable


# ---- MMSI ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,letter", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("The answer is (B)", "B"), ("three", None), ("", None),
    ("``C``", "C"), ("`D` is right", "D"), ("{B}", "B"), ("A bike is there", None), ("a", None),
    ("I pick ``B``, not A", "B")])
def test_mmsi_official_extraction(raw, letter):
    assert extract_letter(raw) == letter


def test_mmsi_profiles_and_en_dash(tmp_path):
    mmsi = get_benchmark("mmsi")
    assert canonical_category("Positional Relationship (Cam.-Obj.)") == "Positional Relationship (Cam.\u2013Obj.)"
    samples = mmsi.load(make_mmsi(tmp_path / "mmsi"))
    assert samples[0].category == "Positional Relationship (Cam.\u2013Obj.)"
    preds = {"0": "A", "1": "``B``", "2": "The answer is C.", "3": "A bike", "4": "{D}"}
    res, scored = score_samples(mmsi, samples, preds)
    assert res["overall"] == pytest.approx(80.0) and res["judge_unavailable"] == 1
    assert res["categories"] == {"Positional Relationship (Cam.\u2013Obj.)": 100.0, "Motion (Cam.)": 100.0,
                                 "Attribute (Meas.)": 0.0, "MSR": 100.0}
    lm = mmsi.score(samples[0], "a", "lmms_eval")  # lmms-eval: case-insensitive, A-F
    assert lm.score == 1.0 and lm.parsed == "A"
    assert mmsi.score(samples[0], "a", "official").score == 0.0


def test_mmsi_circular_all_four_rotations_must_be_right(tmp_path):
    # InternRobotics/MMSI-Bench VLMEvalKit fork, vlmeval/dataset/mmsi_bench.py MMSIBenchCircular: orders
    # ABCD/BCDA/CDAB/DABC, variant index = index + i * 10^6, circular hit = all variants right,
    # vanilla = variant 0 (the headline stays vanilla)
    mmsi = get_benchmark("mmsi")
    samples = mmsi.load(make_mmsi(tmp_path / "mmsi"), split="circular")
    assert len(samples) == 20 and [s.sample_id for s in samples[:4]] == ["0", "1000000", "2000000", "3000000"]
    # gold A -> [A, D, C, B]; gold B -> [B, A, D, C]; gold C -> [C, B, A, D] (the answer follows its text)
    assert [s.answer for s in samples[:12]] == list("ADCB" "BADC" "CBAD")
    assert samples[1].question.endswith("\nOptions: A: front-right, B: behind, C: directly ahead, D: front-left")
    preds = {s.sample_id: s.answer for s in samples[:12]}   # q0, q1, q2 all right ...
    preds["3000001"] = "A"                                  # ... but q1's last rotation wrong (gold C)
    preds.update({"3": "A", "1000003": "A", "2000003": "D", "3000003": "C"})  # q3: rotation 0 wrong (gold B)
    res, _ = score_samples(mmsi, samples, preds)             # q4: unanswered
    assert res["overall"] == res["vanilla_overall"] == pytest.approx(60.0)  # q0, q1, q2
    assert res["circular_overall"] == pytest.approx(40.0)                   # q0, q2
    assert res["circular_questions"] == 5
    assert res["circular_categories"]["Positional Relationship (Cam.\u2013Obj.)"] == pytest.approx(50.0)
    assert res["categories"]["Positional Relationship (Cam.\u2013Obj.)"] == pytest.approx(100.0)


def test_mmsi_tsv_option_columns(tmp_path):
    # VLMEvalKit / EASI TSV: options in columns A..D; a question without an "Options:" line gets the fork's
    # "Options: A: x, B: y" line; a missing column (D) is no option; circular rotates the columns
    mmsi = get_benchmark("mmsi")
    tsv = tmp_path / "MMSI_bench.tsv"
    tsv.write_text("index\timage\tquestion\tanswer\tcategory\tA\tB\tC\tD\n"
                   "7\t[]\tWhich way?\tC\tMSR\tleft\tright\tup\t\n")
    (s,) = mmsi.load(tsv)
    assert s.options == ["left", "right", "up"] and s.option_labels == ["A", "B", "C"]
    assert mmsi.render_prompt(s).startswith("Which way?\nOptions: A: left, B: right, C: up\nAnswer with")
    rot = mmsi.load(tsv, split="circular")
    assert rot[1].question == "Which way?\nOptions: A: right, B: up, D: left" and rot[1].answer == "B"
    assert split_options("Q?\nOptions: A: 1.2 m, B: 2.0 m, C: 3 m, D: 0.8 m")[1] == {
        "A": "1.2 m", "B": "2.0 m", "C": "3 m", "D": "0.8 m"}


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="no profile 'nope'"):
        score_samples(VSI, [], {}, "nope")


def test_lmms_eval_profiles_strip_reasoning_and_mmsi_prompt():
    # lmms-eval 0.7.3, lmms_eval/evaluator.py, _process_document_results -> api/reasoning.py strip_reasoning_tags
    # (CLI default tags <think>, <analysis>) runs before every process_results, and strips whitespace
    mmsi, vsi = get_benchmark("mmsi"), get_benchmark("vsibench")
    assert VSI.score(_sample("vsibench", "B"), " B", "lmms_eval").score == 1.0   # fuzzy_matching(" B") would be ""
    assert VSI.score(_sample("vsibench", "B"), " B", "official").score == 0.0
    assert vsi.score(_sample("vsibench", "3", "numeric"), "<think>5?</think> 3", "lmms_eval").score == 1.0
    assert mmsi.score(_sample("mmsi", "B"), "<think>A</think>``B``", "lmms_eval").parsed == "B"
    # lmms-eval 0.7.3, lmms_eval/tasks/mmsi_bench/utils.py, msr_doc_to_text: doc["question"].strip() + post_prompt
    s = _sample("mmsi", "A")
    s.question = "  Which? Options: A: x, B: y \n"
    assert mmsi.render_prompt(s, "lmms_eval") == ("Which? Options: A: x, B: y\nAnswer with the option's letter "
                                                  "from the given choices directly. Enclose the option's letter "
                                                  "within ``.")
