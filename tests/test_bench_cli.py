"""`gasp score` / `gasp eval --compare` through the real click group, on fixture copies."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gasp_vlm.bench.fixtures import make_all_angles, make_blink, make_mmsi, make_vsibench
from gasp_vlm.cli import main


def _write_preds(path, preds: dict, extra_lines=()):
    with path.open("w") as f:
        for sid, raw in preds.items():
            f.write(json.dumps({"sample_id": sid, "raw_output": raw}) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def _score_cli(bench, root, predictions, out, *extra):
    """`gasp score` on a predictions file (ours, or another harness's with --from)."""
    return CliRunner().invoke(main, ["score", "--benchmark", bench, "--data", str(root), "--predictions",
                                     str(predictions), "--out", str(out), *extra])


def _score(tmp_path, bench, root, preds, *extra):
    p = _write_preds(tmp_path / f"{bench}.jsonl", preds)
    out = tmp_path / f"out_{bench}"
    r = _score_cli(bench, root, p, out, *extra)
    assert r.exit_code == 0, r.output
    return json.loads((out / "results.json").read_text()), out


def test_score_all_four_benchmarks(tmp_path):
    # VSI: ids 0..10 (see fixtures.VSI_ROWS); numeric ids as ints in the file must work too
    vsi_preds = {"0": "5", "10": "13", "1": "2.5", "2": "", "4": "B.", "5": "A", "6": "(C)", "7": "d",
                 "8": "The answer is A", "9": "A"}
    res, out = _score(tmp_path, "vsibench", make_vsibench(tmp_path / "vsi", videos=False), vsi_preds)
    assert set(res) >= {"benchmark", "profile", "overall", "categories", "num_samples", "num_missing"}
    assert res["benchmark"] == "vsibench" and res["profile"] == "official"
    assert res["overall"] == pytest.approx(100 * (0.55 + 1 + 0 + 0 + 1 + 2 / 3 + 0 + 1) / 8)
    assert res["num_missing"] == 1 and res["num_samples"] == 11
    scored = [json.loads(x) for x in (out / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["parsed"] == "5" and scored[0]["score"] == pytest.approx(0.6)

    res, _ = _score(tmp_path, "blink", make_blink(tmp_path / "blink"),
                    {"val_Multi-view_Reasoning_1": "A", "val_Multi-view_Reasoning_2": "(A)",
                     "val_Multi-view_Reasoning_3": "A", "val_Multi-view_Reasoning_4": "(B)",
                     "val_Relative_Depth_1": "B", "val_Relative_Depth_2": "A", "val_Counting_1": "(C)",
                     "val_Art_Style_1": "B"})
    assert res["overall"] == pytest.approx(56.25) and res["multi_view_reasoning"] == pytest.approx(75.0)

    res, _ = _score(tmp_path, "all_angles", make_all_angles(tmp_path / "aa"),
                    {"0": "B", "1": "A.", "2": "(A)", "3": "left", "4": "The answer is (B)", "5": "C", "7": "three"})
    assert res["overall"] == pytest.approx(62.5) and res["num_missing"] == 1 and res["judge_unavailable"] == 1

    res, _ = _score(tmp_path, "mmsi", make_mmsi(tmp_path / "mmsi"),
                    {"0": "A", "1": "``B``", "2": "The answer is C.", "3": "A bike", "4": "{D}"})
    assert res["overall"] == pytest.approx(80.0)


def test_score_lmms_eval_profile(tmp_path):
    res, _ = _score(tmp_path, "vsibench", make_vsibench(tmp_path / "vsi", videos=False),
                    {"0": "four", "10": "There are ten lamps."}, "--profile", "lmms_eval")
    assert res["profile"] == "lmms_eval" and res["categories"]["object_counting"] == pytest.approx(100.0)


def test_score_does_not_open_media(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)  # no videos at all: scoring must still work
    res, _ = _score(tmp_path, "vsibench", root, {})
    assert res["overall"] == 0.0 and res["num_missing"] == 11


def test_malformed_predictions_line_is_named(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    p = _write_preds(tmp_path / "p.jsonl", {"0": "4"}, extra_lines=['{"sample_id": "1", "raw_output": 3}',
                                                                   '{"sample_id": 2'])
    r = _score_cli("vsibench", root, p, tmp_path / "o")
    assert r.exit_code != 0 and "p.jsonl:2: 'raw_output' must be a string" in r.output
    p.write_text('{"sample_id": "0", "raw_output": "4"}\n\nnot json\n')
    r = _score_cli("vsibench", root, p, tmp_path / "o")
    assert r.exit_code != 0 and "p.jsonl:3: not valid JSON" in r.output


def test_cli_data_errors(tmp_path):
    p = _write_preds(tmp_path / "p.jsonl", {})
    r = _score_cli("vsibench", tmp_path, p, tmp_path / "o")
    assert r.exit_code != 0 and "no test.jsonl" in r.output
    r = _score_cli("nope", tmp_path, p, tmp_path / "o")
    assert r.exit_code != 0 and "unknown benchmark 'nope'" in r.output
    r = CliRunner().invoke(main, ["eval", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "missing --benchmark, --data, --model" in r.output


def test_eval_missing_video_errors_before_model_load(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    r = CliRunner().invoke(main, ["eval", "-b", "vsibench", "--data", str(root), "--model", "does-not-matter",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "vsibench sample 0: video file not found" in r.output


def test_compare_writes_table_and_png(tmp_path):
    root = make_blink(tmp_path / "blink")
    base, _ = _score(tmp_path, "blink", root, {"val_Multi-view_Reasoning_1": "A", "val_Counting_1": "(C)"})
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "results.json").write_text(json.dumps(base))
    new, _ = _score(tmp_path, "blink", root, {f"val_Multi-view_Reasoning_{i}": a for i, a in
                                              zip(range(1, 5), "AABB")})
    (tmp_path / "gasp").mkdir()
    (tmp_path / "gasp" / "results.json").write_text(json.dumps(new))
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["eval", "--compare", str(tmp_path / "base" / "results.json"),
                                  str(tmp_path / "gasp" / "results.json"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "compare.md").read_text()
    assert "| multi_view_reasoning | 25.00 | 100.00 | +75.00 |" in md
    assert "| Counting | 100.00 | 0.00 | -100.00 |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text())["rows"][0]["name"] == "overall"


def test_conflicting_duplicate_ids_fail_and_write_nothing(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    # id 0 answered twice differently (once as an int id); id 1 repeated identically is not the problem
    p = _write_preds(tmp_path / "p.jsonl", {"0": "4", "1": "2.5"},
                     extra_lines=['{"sample_id": "1", "raw_output": "2.5"}', '{"sample_id": 0, "raw_output": "5"}'])
    out = tmp_path / "o"
    r = _score_cli("vsibench", root, p, out)
    assert r.exit_code != 0
    assert f"{p}: 1 sample_id(s) appear more than once with different raw_output: '0' (lines 1, 4)" in r.output
    assert "Traceback" not in r.output and not out.exists()


def test_identical_duplicate_ids_warn_and_score_once(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    preds = {"0": "4", "1": "2.5", "4": "A", "5": "A"}
    clean, _ = _score(tmp_path, "vsibench", root, preds)
    assert clean["duplicate_ids"] == 0 and clean["duplicate_lines"] == 0
    # an appended/resumed log: id 0 three times, id 4 twice, all with the same answer
    repeats = [json.dumps({"sample_id": s, "raw_output": preds[s]}) for s in ("0", "4", "0")]
    p = _write_preds(tmp_path / "dup.jsonl", preds, extra_lines=repeats)
    out = tmp_path / "o"
    r = _score_cli("vsibench", root, p, out)
    assert r.exit_code == 0, r.output
    warning = f"warning: {p}: 2 sample_id(s) repeated with identical raw_output (3 extra line(s) ignored)"
    assert warning in r.stderr and warning not in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["duplicate_ids"] == 2 and res["duplicate_lines"] == 3
    drop = ("duplicate_ids", "duplicate_lines", "predictions")
    assert {k: v for k, v in res.items() if k not in drop} == {k: v for k, v in clean.items() if k not in drop}
    assert len((out / "scored.jsonl").read_text().splitlines()) == res["num_samples"]


def test_compare_refuses_runs_scored_under_different_settings(tmp_path):
    """Base and GASP must be scored alike: frames (results.json) or frame mode / dtype (run.json) differing
    is refused with the differences named and nothing written; --allow-mismatch compares and flags it."""
    root = make_blink(tmp_path / "blink")
    res, _ = _score(tmp_path, "blink", root, {"val_Multi-view_Reasoning_1": "A"})
    runs = {}
    for name, frames, mode in (("base", 8, "video_dup"), ("gasp", 16, "pair")):
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(json.dumps({**res, "frames": frames}))
        (d / "run.json").write_text(json.dumps({"model_info": {"frame_mode": mode, "dtype": "bfloat16"}}))
        runs[name] = d / "results.json"
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["eval", "--compare", str(runs["base"]), str(runs["gasp"]), "--out", str(out)])
    assert r.exit_code != 0
    assert "scored under different settings (frames 8 vs 16; frame_mode \"video_dup\" vs \"pair\")" in r.output
    assert "--allow-mismatch" in r.output and "Traceback" not in r.output and not out.exists()
    r = CliRunner().invoke(main, ["eval", "--compare", str(runs["base"]), str(runs["gasp"]), "--out", str(out),
                                  "--allow-mismatch"])
    assert r.exit_code == 0, r.output
    assert "warning: settings differ: frames 8 vs 16" in r.output
    assert (out / "compare.md").read_text().startswith("**Warning: the two runs were scored under different settings**")
    summary = json.loads((out / "compare.json").read_text())
    assert summary["settings_differ"] == {"frames": [8, 16], "frame_mode": ["video_dup", "pair"]}
    assert summary["settings"]["base"]["dtype"] == summary["settings"]["gasp"]["dtype"] == "bfloat16"
    # the same settings on both sides: no warning
    (tmp_path / "gasp" / "results.json").write_text(json.dumps({**res, "frames": 8}))
    (tmp_path / "gasp" / "run.json").write_text(json.dumps({"model_info": {"frame_mode": "video_dup"}}))
    r = CliRunner().invoke(main, ["eval", "--compare", str(runs["base"]), str(runs["gasp"]), "--out", str(out)])
    assert r.exit_code == 0 and "warning" not in r.output, r.output


def test_bench_eval_prints_speed_with_and_without_the_video_cache():
    r = CliRunner().invoke(main, ["bench", "eval", "--limit", "6", "--frames", "4", "--video-frames", "40",
                                  "--video-size", "160x96", "--max-new-tokens", "1"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    # 6 questions over the fixture's 3 videos: 6 decodes without the cache, 3 with it
    assert (res["no_cache"]["video_decodes"], res["no_cache"]["video_cache_hits"]) == (6, 0)
    assert (res["cache"]["video_decodes"], res["cache"]["video_cache_hits"]) == (3, 3)
    for run in ("no_cache", "cache"):
        assert res[run]["questions"] == 6 and res[run]["questions_per_s"] > 0
        assert res[run]["prepare_s_per_question"] >= 0 and res[run]["generate_s_per_question"] > 0
    r = CliRunner().invoke(main, ["bench", "eval", "--video-size", "big"])
    assert r.exit_code != 0 and "--video-size 'big': expected WxH" in r.output



def _lmms_eval_log(path, rows, gz=False):
    """lmms-eval --log_samples lines: doc_id, doc (the dataset row), target, arguments, resps, filtered_resps,
    plus the task's metric key, as its evaluator writes them."""
    import gzip

    lines = "".join(json.dumps({"doc_id": i, "doc": doc, "target": doc.get("ground_truth", doc.get("answer")),
                                "arguments": [["<prompt>", {"max_new_tokens": 16}]], "resps": [[text]],
                                "filtered_resps": [text], "doc_hash": f"h{i}", "prompt_hash": "p",
                                "vsibench_score": {"prediction": text}}) + "\n" for i, (doc, text) in enumerate(rows))
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_score_from_an_lmms_eval_log_equals_our_own_predictions(tmp_path, gz):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    answers = {0: "5", 1: "2.5", 4: "B.", 5: "A", 6: "(C)", 9: "A", 10: "13"}
    rows = [json.loads(x) for x in (root / "test.jsonl").read_text().splitlines()]  # the dataset rows = lmms docs
    docs = [r for r in rows if int(r["id"]) in answers]
    name = "samples_vsibench_2026-12-04T03-00-00.jsonl" + (".gz" if gz else "")
    log = _lmms_eval_log(tmp_path / name, [(d, answers[int(d["id"])]) for d in docs], gz=gz)
    r = _score_cli("vsibench", root, log, tmp_path / "from_log", "--from", "lmms-eval")
    assert r.exit_code == 0, r.output
    ours = _write_preds(tmp_path / "ours.jsonl", {str(k): v for k, v in answers.items()})
    r2 = _score_cli("vsibench", root, ours, tmp_path / "ours_out")
    assert r2.exit_code == 0, r2.output
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("from_log", "ours_out"))
    assert a["overall"] == pytest.approx(b["overall"]) and a["categories"] == b["categories"]
    assert a["source"] == "lmms-eval" and a["num_missing"] == b["num_missing"] == 11 - len(answers)
    conv = [json.loads(x) for x in (tmp_path / "from_log" / "predictions.jsonl").read_text().splitlines()]
    assert {c["sample_id"] for c in conv} == {str(k) for k in answers}


def test_score_from_lmms_eval_refuses_another_benchmarks_log(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    log = _lmms_eval_log(tmp_path / "samples_blink.jsonl", [({"idx": "val_Counting_1", "answer": "(A)"}, "(A)")])
    r = _score_cli("vsibench", root, log, tmp_path / "o", "--from", "lmms-eval")
    assert r.exit_code == 1 and "none of its documents is a vsibench sample" in r.output
    (tmp_path / "bad.jsonl").write_text(json.dumps({"sample_id": "0", "raw_output": "5"}) + "\n")
    r = _score_cli("vsibench", root, tmp_path / "bad.jsonl", tmp_path / "o", "--from", "lmms-eval")
    assert r.exit_code == 1 and "not an lmms-eval --log_samples file" in r.output


def test_score_from_lmms_eval_without_docs_uses_doc_id_positions(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    log = tmp_path / "samples_vsibench.jsonl"
    log.write_text("".join(json.dumps({"doc_id": i, "resps": [["4"]], "filtered_resps": ["4"]}) + "\n" for i in (0, 3)))
    r = _score_cli("vsibench", root, log, tmp_path / "o", "--from", "lmms-eval")
    assert r.exit_code == 0, r.output
    conv = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [c["sample_id"] for c in conv] == ["0", "3"] and [c["source_doc_id"] for c in conv] == [0, 3]
    log.write_text(json.dumps({"doc_id": 99, "filtered_resps": ["4"]}) + "\n")
    r = _score_cli("vsibench", root, log, tmp_path / "o2", "--from", "lmms-eval")
    assert r.exit_code == 1 and "doc_id 99" in r.output


@pytest.mark.parametrize("fmt", ["xlsx", "tsv"])
def test_score_from_a_vlmevalkit_table_equals_our_own_predictions(tmp_path, fmt):
    """VLMEvalKit's <model>_<dataset>.xlsx: the benchmark TSV's columns + prediction (Excel turns the
    integer index into floats); scored by our All-Angles scorer exactly as our own predictions file."""
    import csv

    import openpyxl

    root = make_all_angles(tmp_path / "aa")
    rows = json.loads((root / "data.json").read_text())
    preds = {0: "B", 1: "A.", 2: "(A)", 3: "left", 4: "The answer is (B)", 5: "C", 7: "three"}
    cols = ["index", "question", "A", "B", "C", "answer", "category", "prediction"]
    table = [[float(r["index"]) if fmt == "xlsx" else r["index"], r["question"], r["A"], r["B"], r["C"], r["answer"],
              r["category"], preds[r["index"]]] for r in rows if r["index"] in preds]
    path = tmp_path / f"Qwen2.5-VL-7B-Instruct_AllAngles.{fmt}"
    if fmt == "xlsx":
        wb = openpyxl.Workbook()
        wb.active.append(cols)
        for t in table:
            wb.active.append(t)
        wb.save(path)
    else:
        with path.open("w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(cols)
            w.writerows(table)
    r = _score_cli("all_angles", root, path, tmp_path / "vlm", "--from", "vlmevalkit")
    assert r.exit_code == 0, r.output
    ours = _write_preds(tmp_path / "ours.jsonl", {str(k): v for k, v in preds.items()})
    assert _score_cli("all_angles", root, ours, tmp_path / "ours_out").exit_code == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("vlm", "ours_out"))
    assert a["overall"] == pytest.approx(b["overall"]) == pytest.approx(62.5)
    assert a["categories"] == b["categories"] and a["source"] == "vlmevalkit"
    # a table of another benchmark is refused by name
    (tmp_path / "other.tsv").write_text("index\tprediction\n12345\tA\n")
    r = _score_cli("all_angles", root, tmp_path / "other.tsv", tmp_path / "o", "--from", "vlmevalkit")
    assert r.exit_code == 1 and "not a all_angles sample" in r.output


def test_score_refuses_predictions_of_another_benchmark(tmp_path):
    root = make_vsibench(tmp_path / "vsi", videos=False)
    p = tmp_path / "blink_preds.jsonl"
    p.write_text(json.dumps({"sample_id": "val_Counting_1", "raw_output": "(A)"}) + "\n")
    r = _score_cli("vsibench", root, p, tmp_path / "o")
    assert r.exit_code == 1 and "none of its 1 sample_ids is a vsibench sample" in r.output
    assert not (tmp_path / "o" / "results.json").exists()
    p.write_text(json.dumps({"sample_id": "0", "raw_output": "4"}) + "\n" + json.dumps({"sample_id": "x9", "raw_output": "1"}) + "\n")
    r = _score_cli("vsibench", root, p, tmp_path / "o")
    assert r.exit_code == 0 and "1 predictions name samples that are not in this vsibench copy" in r.output
