"""`gasp eval` end to end with a real (tiny, random) preset model on fixture copies of all four benchmarks.

The answers are nonsense; what is tested is the pipeline: prompts and media reach the adapter, predictions
are written and resumed, run.json records the settings, results.json is produced.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gasp_vlm.bench import get_benchmark
from gasp_vlm.bench.fixtures import make_all_angles, make_blink, make_mmsi, make_vsibench
from gasp_vlm.cli import main

MAKERS = {"vsibench": make_vsibench, "all_angles": make_all_angles, "blink": make_blink, "mmsi": make_mmsi}


def _eval(root, bench, out, model="tiny-qwen2.5-vl", limit=2, output: list | None = None):
    # small pixel bounds keep CPU time low (the official All-Angles/MMSI sizing upscales to >= 1280 tokens/view)
    r = CliRunner().invoke(main, ["eval", "-b", bench, "--data", str(root), "--model", model, "--out", str(out),
                                  "--limit", str(limit), "--max-new-tokens", "3", "--frames", "4", "--no-progress",
                                  "--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    if output is not None:
        output.append(r.output)
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bench,model", [("vsibench", "tiny-qwen2.5-vl"), ("all_angles", "tiny-qwen2.5-vl"),
                                         ("blink", "tiny-qwen2.5-vl"), ("mmsi", "tiny-qwen2.5-vl"),
                                         ("vsibench", "tiny-llava-next-video"), ("vsibench", "tiny-qwen3-vl"),
                                         ("blink", "tiny-qwen3-vl"), ("vsibench", "tiny-internvl"),
                                         ("blink", "tiny-internvl"), ("vsibench", "tiny-llava-onevision"),
                                         ("blink", "tiny-llava-onevision"), ("mmsi", "tiny-llava-onevision")])
def test_gasp_eval_preset_end_to_end(tmp_path, bench, model):
    root = MAKERS[bench](tmp_path / bench)
    out = tmp_path / "out"
    printed: list[str] = []
    preds = _eval(root, bench, out, model, output=printed)
    out_text = printed[0]
    b = get_benchmark(bench)
    samples = b.load(root)[:2]
    assert [p["sample_id"] for p in preds] == [s.sample_id for s in samples]
    assert [p["prompt"] for p in preds] == [b.render_prompt(s) for s in samples]
    assert all(isinstance(p["raw_output"], str) for p in preds)
    if bench == "vsibench":
        assert preds[0]["frame_indices"] == [0, 2, 4, 7]
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == model and run["generation"]["max_new_tokens"] == 3
    assert run["frames"] == (4 if bench == "vsibench" else None) and run["versions"]["transformers"]
    assert run["pixels"] == {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    assert run["model_info"]["preset"] == model
    assert ("do not apply to" in out_text) == (model in ("tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"))
    res = json.loads((out / "results.json").read_text())
    assert res["num_samples"] == 2 and res["num_missing"] == 0 and 0.0 <= res["overall"] <= 100.0


def test_gasp_eval_resumes(tmp_path):
    root = make_blink(tmp_path / "blink")
    out = tmp_path / "out"
    first = _eval(root, "blink", out, limit=2)
    again = _eval(root, "blink", out, limit=2)
    assert again == first  # nothing regenerated or duplicated
    more = _eval(root, "blink", out, limit=3)
    assert more[:2] == first and len(more) == 3


def test_gasp_eval_under_a_launcher_shards_and_rank_0_merges(tmp_path):
    """RANK/WORLD_SIZE as torchrun sets them: rank 1 answers its videos and exits, rank 0 answers the
    rest, merges and scores -- the same predictions as one process."""
    root = make_vsibench(tmp_path / "vsi")
    args = ["eval", "-b", "vsibench", "--data", str(root), "--model", "tiny-qwen2.5-vl", "--limit", "6",
            "--max-new-tokens", "3", "--frames", "4", "--no-progress", "--max-pixels", str(56 * 56)]
    one = tmp_path / "one"
    assert CliRunner().invoke(main, args + ["--out", str(one)]).exit_code == 0
    dp = tmp_path / "dp"
    r = CliRunner().invoke(main, args + ["--out", str(dp)], env={"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert r.exit_code == 0 and "rank 1/2: answered" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--out", str(dp)], env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert r.exit_code == 0, r.output
    read = lambda p: [json.loads(x) for x in (p / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(dp) == read(one)
    res_dp, res_one = (json.loads((p / "results.json").read_text()) for p in (dp, one))
    assert res_dp["num_samples"] == 6 and res_dp["num_missing"] == 0
    assert {k: v for k, v in res_dp.items() if isinstance(v, float)} == \
        {k: v for k, v in res_one.items() if isinstance(v, float)}
