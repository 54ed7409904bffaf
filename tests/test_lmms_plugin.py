"""The lmms-eval plugin: request conversion on hand-built lmms-eval argument tuples (no lmms-eval needed),
and lmms-eval's own CLI running the ``gasp`` model on a local fixture task (skipped without lmms-eval)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gasp_vlm.bench.media import read_video_frames
from gasp_vlm.lmms_plugin.convert import (cut_at_stops, decoding_of, group_choices, loglikelihood_results,
                                          media_frames, run_rounds, to_request)
from tests.conftest import write_clip


def _img(v: int, hw=(56, 84)) -> Image.Image:
    return Image.fromarray(np.full((*hw, 3), v, np.uint8))


# ---- conversion (no lmms-eval) -----------------------------------------------------------------
def test_decoding_greedy_sampling_and_until():
    d = decoding_of({"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
                     "until": "\n\n"}, 128)
    assert (d.max_new_tokens, d.until, d.sampling) == (16, ("\n\n",), ())
    assert decoding_of(None, 64).max_new_tokens == 64
    s = decoding_of({"temperature": 0.7, "top_p": 0.9}, 8)
    assert dict(s.sampling) == {"do_sample": True, "temperature": 0.7, "top_p": 0.9} and s.key() != d.key()
    with pytest.raises(ValueError, match="until"):
        decoding_of({"until": 3}, 8)
    assert cut_at_stops("A. yes\n\nmore", ["\n\n", "Q:"]) == "A. yes"


def test_to_request_images_placeholders_and_pixels():
    ims = [_img(10), _img(200)]
    req = to_request("<image>\n<image>\nWhich is brighter?", ims, 32, {"max_pixels": 3136})
    assert req["prompt"] == "Which is brighter?" and req["video"] is None and req["max_pixels"] == 3136
    assert [np.asarray(a).tolist() for a in req["images"]] == [np.asarray(b).tolist() for b in ims]
    assert media_frames(req) == req["images"]
    text = to_request("just text", None, 32)
    assert text == {"prompt": "just text", "images": None, "video": None} and media_frames(text) == []
    with pytest.raises(ValueError, match="one or the other"):
        to_request("q", [_img(1), "clip.mp4"], 8)
    with pytest.raises(ValueError, match="unsupported visual"):
        to_request("q", [np.zeros((4, 4, 3))], 8)
    with pytest.raises(ValueError, match="not a video"):
        to_request("q", ["photo.jpg"], 8)


def test_to_request_video_uses_gasp_eval_frame_sampling(tmp_path):
    clip = write_clip(tmp_path / "v.mp4", 20)
    req = to_request("<video>\nHow many?", [str(clip)], 5)
    frames, idx, _ = read_video_frames(clip, 5)  # what `gasp eval` feeds (bench/runner.py)
    assert idx == [0, 4, 9, 14, 19] and req["prompt"] == "How many?" and req["images"] is None
    assert [np.asarray(f).tolist() for f in req["video"]] == [np.asarray(f).tolist() for f in frames]


def test_choice_grouping_and_results():
    items = [("d0", "Q0", " yes"), ("d0", "Q0", " no"), ("d1", "Q1", " no"), ("d1", "Q1", " yes"),
             ("d1", "Q1", " maybe")]
    keys, choices, where = group_choices(items)
    assert keys == [("d0", "Q0"), ("d1", "Q1")] and choices == [["yes", "no"], ["no", "yes", "maybe"]]
    assert where == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    res = loglikelihood_results([[-1.0, -2.0], [-3.0, -0.5, -4.0]], where)
    assert res == [(-1.0, True), (-2.0, False), (-3.0, False), (-0.5, True), (-4.0, False)]


def test_multi_round_protocol():
    calls = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        calls.append((list(previous_output), round_idx, previous_round_info))
        return [_img(round_idx)], f"round {round_idx}", round_idx == 3, previous_output, {"r": round_idx}

    seen = []

    def answer(ctx, visuals):
        seen.append((ctx, len(visuals or [])))
        return f"ans:{ctx}"

    out = run_rounds(("first", [_img(0)]), {"doc": 1}, doc_to_text, answer)
    assert out == ["ans:first", "ans:round 1", "ans:round 2"]
    assert seen == [("first", 1), ("round 1", 1), ("round 2", 1)]
    assert calls[0] == (["ans:first"], 1, None) and calls[2][1:] == (3, {"r": 2})
    with pytest.raises(RuntimeError, match="did not terminate"):
        run_rounds(("q", None), {}, lambda d, **k: (None, "again", False, k["previous_output"], None),
                   lambda c, v: "x", max_rounds=2)


# ---- lmms-eval itself ------------------------------------------------------------------------------
UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''

GEN_TASK = """
task: gasp_fixture_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """
task: gasp_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: 0
metric_list:
  - metric: acc
"""


def _fixture_tasks(root: Path, levels: tuple[int, ...] = (30, 220)) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    rows = []
    for i, v in enumerate(levels):
        path = root / f"im{i}.png"
        _img(v).save(path)
        rows.append({"id": i, "image": str(path), "question": f"Is image {i} bright?", "answer": "yes"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "utils.py").write_text(textwrap.dedent(UTILS))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=data))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data))
    return tasks


def _adapter():
    from gasp_vlm.models import load_adapter

    return load_adapter("tiny-qwen2.5-vl", dtype="float32", device="cpu")


@pytest.mark.slow
@pytest.mark.ecosystem  # make test-ecosystem installs lmms-eval
@pytest.mark.parametrize("processes", [1, 2])
def test_lmms_eval_cli_runs_the_gasp_model(tmp_path, processes):
    """``python -m lmms_eval --model gasp`` with the legacy plugin variable and a local --include_path task; and
    ``torchrun --nproc-per-node 2 -m lmms_eval`` (gloo on CPU): each rank answers its share of 3 documents (2 + 1:
    lmms-eval pads the short rank) and rank 0 logs all of them, the same answers as one process gives."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'gasp-vlm[lmms-eval]')")
    levels = (30, 220) if processes == 1 else (30, 220, 120)
    tasks = _fixture_tasks(tmp_path, levels)
    out = tmp_path / "out"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "gasp_vlm.lmms_plugin", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc-per-node", str(processes)]
    cmd = [*launch, "-m", "lmms_eval", "--model", "gasp",
           "--model_args", "pretrained=tiny-qwen2.5-vl,device=cpu,dtype=float32",
           "--tasks", "gasp_fixture_gen", "--include_path", str(tasks),
           "--output_path", str(out), "--log_samples", "--batch_size", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    assert results, log  # lmms-eval logs a failed evaluation and still exits 0
    assert "exact_match,none" in results[0]["results"]["gasp_fixture_gen"]

    # the answers lmms-eval logged are what the adapter gives for the gasp-eval request of the same sample
    adapter = _adapter()
    logged = [json.loads(line) for p in out.rglob("*samples_gasp_fixture_gen*.jsonl") for line in p.open()]
    assert sorted(rec["doc_id"] for rec in logged) == list(range(len(levels)))  # each document once
    for rec in logged:
        i = rec["doc_id"]
        assert rec["input"] == f"Is image {i} bright?"
        req = {"prompt": rec["input"], "images": [Image.open(tmp_path / f"im{i}.png").convert("RGB")], "video": None}
        assert rec["filtered_resps"] == adapter.generate([req], max_new_tokens=6)[0]

@pytest.mark.slow
@pytest.mark.ecosystem  # make test-ecosystem installs lmms-eval
def test_lmms_eval_multiple_choice_instances_score_like_score_choices(tmp_path):
    """lmms-eval's own multiple_choice Instances through ``GaspLMM.loglikelihood``. (Not through its
    evaluator: lmms-eval 0.7.3's ``unwrap_generation_output`` turns every (logprob, is_greedy) result into a
    string, so no model's multiple_choice task scores there.)"""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'gasp-vlm[lmms-eval]')")
    from lmms_eval.tasks import TaskManager, get_task_dict

    from gasp_vlm.lmms_plugin.models.gasp import GaspLMM

    task = get_task_dict(["gasp_fixture_mc"], TaskManager(include_path=str(_fixture_tasks(tmp_path))))
    task = task["gasp_fixture_mc"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    lm = GaspLMM(pretrained="tiny-qwen2.5-vl", device="cpu", dtype="float32", batch_size=2)
    lm.task_dict = {"gasp_fixture_mc": task.dataset}
    got = lm.loglikelihood(task.instances)
    adapter = _adapter()
    assert len(got) == 4
    for inst, (lp, greedy) in zip(task.instances, got):
        doc = task.dataset["test"][inst.doc_id]
        scores = adapter.score_choices([[Image.open(doc["image"]).convert("RGB")]], [doc["question"]],
                                       [["yes", "no"]])[0]
        j = ["yes", "no"].index(inst.args[1].strip())
        assert lp == pytest.approx(scores[j], abs=1e-4) and greedy == (scores[j] >= max(scores))


@pytest.mark.slow
@pytest.mark.ecosystem  # make test-ecosystem installs lmms-eval
def test_gasp_lmm_generate_until_and_multi_round_on_hand_built_instances(tmp_path):
    """Mixed decoding settings (grouped, order kept), ``until`` cuts, a video doc and the multi-round protocol."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'gasp-vlm[lmms-eval]')")
    from lmms_eval.api.instance import Instance

    from gasp_vlm.lmms_plugin.models.gasp import GaspLMM

    clip = write_clip(tmp_path / "v.mp4", 12)
    docs = [{"im": _img(40)}, {"video": str(clip)}, {"im": _img(200)}]
    lm = GaspLMM(pretrained="tiny-qwen2.5-vl", device="cpu", dtype="float32", batch_size=2, max_num_frames=4)
    lm.task_dict = {"t": {"test": docs}}
    to_visual = lambda d: [d["im"]] if "im" in d else [d["video"]]  # noqa: E731
    gks = [{"max_new_tokens": 5}, {"max_new_tokens": 3}, {"max_new_tokens": 5, "until": ["\u0101"]}]
    reqs = [Instance("generate_until", (f"<image>\nQ{i}", gk, to_visual, i, "t", "test"), 0,
                     {"task": "t", "doc_id": i, "repeats": 1}) for i, gk in enumerate(gks)]
    got = lm.generate_until(reqs)
    adapter = _adapter()
    want = [adapter.generate([to_request(f"Q{i}", to_visual(d), 4)], max_new_tokens=gk["max_new_tokens"])[0]
            for i, (d, gk) in enumerate(zip(docs, gks))]
    assert got == [want[0], want[1], cut_at_stops(want[2], ["\u0101"])]

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        return to_visual(doc), f"again {round_idx}", round_idx == 2, previous_output, None

    multi = Instance("generate_until_multi_round", ("Q0", {"max_new_tokens": 4, "until": ["x"]}, to_visual,
                                                    doc_to_text, 0, "t", "test"), 0, {"task": "t", "doc_id": 0,
                                                                                      "repeats": 1})
    rounds = lm.generate_until_multi_round([multi])[0]
    assert rounds == list(adapter.generate([to_request(q, to_visual(docs[0]), 4)], max_new_tokens=4)[0]
                          for q in ("Q0", "again 1"))
