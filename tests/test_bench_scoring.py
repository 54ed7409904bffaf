"""Golden scorer + aggregation cases from the official rules (hand-computed expectations)."""

from __future__ import annotations

import pytest

from gasp_vlm.bench import get_benchmark, score_samples
from gasp_vlm.bench.blink import official_parse
from gasp_vlm.bench.fixtures import make_all_angles, make_blink, make_mmsi, make_vsibench
from gasp_vlm.bench.mcq import can_infer
from gasp_vlm.bench.mmsi import canonical_category, extract_letter
from gasp_vlm.bench.records import Sample
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


@pytest.mark.parametrize("raw,letter", [("A", "A"), ("A.", "A"), ("(A)", "A"), ("The answer is (B)", "T"),
                                         ("three", "T"), ("", ""), ("b) right", "B")])
def test_blink_lmms_eval_first_letter(raw, letter):
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


# ---- All-Angles (VLMEvalKit can_infer) ------------------------------------------------------------------

CH = {"A": "two", "B": "three", "C": "four"}


@pytest.mark.parametrize("raw,expected", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("The answer is (B)", "B"), ("three", "B"), ("", None),
    ("A or B", None), ("Cannot determine the answer", "Z"), ("Z", "Z"), ("**C**: four", "C"),
    ("two or three", None), ("B) three", "B")])
def test_can_infer(raw, expected):
    assert can_infer(raw, dict(CH)) == expected


def test_can_infer_text_length_guard():
    # longer than 2x the total option length (2 * 12 chars): no option-text guessing
    assert can_infer("well, I would finally say three is right", dict(CH)) is None


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


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="no profile 'nope'"):
        score_samples(VSI, [], {}, "nope")
