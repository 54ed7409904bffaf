"""LLaVA-Video-178K as shipped: a mixture YAML over per-subset folders, whole conversations with labels on
exactly the assistant turns, bad media skipped deterministically, exact resume, `gasp train` on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ACADEMIC, YOUTUBE, build_llava_tree
from gasp_vlm.models import load_adapter
from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.instructions import (InstructionFormatError, InstructionSet, MediaError, VideoOptions, load_mixture,
                                         select)
from gasp_vlm.train.stream import StepBatches, prepare_conversations, robust_instruction_sample

torch.set_num_threads(1)
SMALL = {"num_hidden_layers": 2}
END = {"tiny-qwen2.5-vl": "<|im_end|>", "tiny-qwen3-vl": "<|im_end|>", "tiny-internvl": "<|im_end|>", "tiny-llava-onevision": "<|im_end|>", "tiny-llava-next-video": "</s>"}


def test_mixture_resolves_the_real_layout(llava_tree):
    entries = load_mixture(llava_tree["mix"])
    root = llava_tree["root"]
    assert [e.json_path for e in entries] == [root / ACADEMIC / f"{ACADEMIC}_cap_processed.json",
                                              root / ACADEMIC / f"{ACADEMIC}_oe_qa_processed.json",
                                              root / YOUTUBE / f"{YOUTUBE}_mc_qa_processed.json"]
    assert [e.media_root for e in entries] == [root / ACADEMIC, root / ACADEMIC, root / YOUTUBE]  # default: JSON folder
    assert [e.weight for e in entries] == [1.0, 2.0, 1.0]
    ds = InstructionSet(llava_tree["mix"])
    # 2 captions + 2 QA records at weight 2 (each twice) + 3 youtube records
    assert len(ds) == 9
    assert [ds.locate(i)[1].record_id for i in range(9)] == \
        ["v_a", "v_missing", "v_b", "img", "v_b", "img", "v_c", "v_corrupt", "text"]
    s = ds.sample(2)
    assert s["media"] == str(root / ACADEMIC / "academic_source/charades/clip_b.mp4")
    assert len(s["frames"]) == 8 and s["frame_indices"] == [1, 4, 7, 10, 13, 16, 19, 22]
    assert s["turns"] == [("user", "What is cooked?"), ("assistant", "Noodles."), ("user", "And then?"),
                          ("assistant", "They are served in a bowl."), ("user", "How many bowls?"),
                          ("assistant", "Two.")]
    assert len(ds.sample(3)["frames"]) == 1 and ds.sample(8)["frames"] == []  # image, text only
    with pytest.raises(MediaError, match="not_there.mp4: media file not found"):
        ds.sample(1)
    with pytest.raises(MediaError, match="corrupt.mp4: cannot decode"):
        ds.sample(7)


def test_sampling_specs_and_weights(tmp_path):
    assert select(10, "all", 0) == list(range(10))
    assert select(10, "first:3", 0) == [0, 1, 2] and select(10, "end:2", 0) == [8, 9]
    assert select(10, "first:50%", 0) == [0, 1, 2, 3, 4]
    r = select(100, "random:5", 3)
    assert r == select(100, "random:5", 3) and r != select(100, "random:5", 4)  # seeded
    assert len(set(r)) == 5 and r == sorted(r) and r != [0, 1, 2, 3, 4]
    assert len(select(100, "25%", 1)) == 25 and select(100, "25%", 1) == select(100, "random:25%", 1)
    for bad in ("some:3", "first:x", "first:-1", "150%"):
        with pytest.raises(InstructionFormatError):
            select(10, bad, 0)
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(10)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.json").write_text(json.dumps(recs))
    (tmp_path / "m.yaml").write_text("- {json_path: d/t.json, sampling: 'first:4', weight: 0.5}\n"
                                     "- {json_path: d/t.json, sampling: 'end:2', weight: 1.5}\n")
    ds = InstructionSet(tmp_path / "m.yaml")
    ids = [ds.locate(i)[1].record_id for i in range(len(ds))]
    # 0.5 x 4 -> 2 slots, a fixed seeded subset of records 0-3; 1.5 x 2 -> 3 slots: 8, 9, 8
    assert len(ds) == 5 and set(ids[:2]) < {"0", "1", "2", "3"} and len(set(ids[:2])) == 2
    assert ids[2:] == ["8", "9", "8"]
    for text, msg in [("- {json_path: nope.json}", "nope.json does not exist"),
                      ("- {json_path: d/t.json, weight: 0}", "weight must be a number > 0"),
                      ("- {json_path: d/t.json, sampling: 'every:2'}", "sampling 'every:2'"),
                      ("- {json_path: d/t.json, media: x}", "unknown key 'media'"),
                      ("- {json_path: d/t.json, media_root: missing}", "media_root .*missing is not a folder"),
                      ("{}", "expected a list of entries")]:
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(InstructionFormatError, match=msg) as e:
            InstructionSet(tmp_path / "bad.yaml")
        assert "bad.yaml" in str(e.value)
    (tmp_path / "d" / "x.json").write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(InstructionFormatError, match=r"x.json: record 0 .*turn 0 is 'gpt' but a user turn"):
        InstructionSet(tmp_path / "d" / "x.json")


def _labelled_runs(ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    runs, cur = [], []
    for t, l in zip(ids.tolist(), labels.tolist()):
        if l != -100:
            assert l == t  # a label is the token itself
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_labels_cover_exactly_the_assistant_turns(llava_tree, preset):
    ad = load_adapter(preset, overrides=SMALL)
    ds = InstructionSet(llava_tree["mix"])
    end = END[preset]
    for index in (2, 3, 8, 0):  # multi-turn video, image, text only, caption
        item = ds.sample(index)
        b = prepare_conversations(ad, [item])
        ids, labels = b.inputs["input_ids"][0], b.labels[0]
        runs = [ad.tokenizer.decode(r) for r in _labelled_runs(ids, labels)]
        answers = [t for r, t in item["turns"] if r == "assistant"]
        if preset != "tiny-llava-next-video":  # ChatML families
            assert runs == [a + end for a in answers]
        else:
            assert runs == [f" {a}{end}" for a in answers]
        lay = b.layouts[0]
        assert (labels[lay.positions] == -100).all()
        n_visual = {2: 8, 3: 1, 8: 0, 0: 8}[index] * lay.tokens_per_slot if lay.num_frames else 0
        assert lay.num_visual == n_visual and (index == 8) == (lay.num_visual == 0)
        unlabelled = ad.tokenizer.decode(ids[labels == -100])
        assert all(t in unlabelled for r, t in item["turns"] if r == "user")  # user turns: present, no labels
    # the single prompt/answer form is the one-pair conversation
    media = {"tiny-llava-next-video": 4, "tiny-internvl": [("Frame1: ", 4)]}.get(preset, [("video_pad", 4, "")])
    if preset == "tiny-llava-onevision":
        media = [ad.ids["video"]] * 4
    assert ad._chat_ids(media, "q?", "a.") == \
        ad._chat_ids(media, None, None,
                     turns=[("user", "q?"), ("assistant", "a.")])


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_mixed_batches_give_each_sample_its_own_loss(llava_tree, preset):
    """A video, an image and a text-only sample in one batch: the per-token answer losses equal those of
    each sample alone (the frames' tokens land in the right sample)."""
    ad = load_adapter(preset, overrides=SMALL)
    ds = InstructionSet(llava_tree["mix"])
    items = [ds.sample(2), ds.sample(3), ds.sample(8)]

    def token_losses(batch):
        rows = torch.zeros(len(batch.layouts), 1, dtype=torch.long)  # as in training: no visual rows needed
        cap = ad.forward_capture(batch, what=(), rows=rows)
        keep = batch.labels[:, 1:] != -100
        return torch.nn.functional.cross_entropy(cap.logits.float(), batch.labels[:, 1:][keep], reduction="none")

    with torch.no_grad():
        together = token_losses(prepare_conversations(ad, items))
        alone = torch.cat([token_losses(prepare_conversations(ad, [it])) for it in items])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_too_long_samples_lose_trailing_turns_never_visual_tokens(llava_tree, caplog):
    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    item = InstructionSet(llava_tree["mix"]).sample(2)
    full = prepare_conversations(ad, [item])
    n = full.inputs["input_ids"].shape[1]
    stats: dict = {}
    short = prepare_conversations(ad, [item], max_length=n - 1, stats=stats)
    assert stats == {"turns_dropped": 2, "samples_shortened": 1, "samples_over_length": 0}
    assert "dropped its last 2 turns" in caplog.text
    ids, labels = short.inputs["input_ids"][0], short.labels[0]
    assert [ad.tokenizer.decode(r) for r in _labelled_runs(ids, labels)] == \
        ["Noodles.<|im_end|>", "They are served in a bowl.<|im_end|>"]
    assert short.layouts[0].num_visual == full.layouts[0].num_visual
    tiny: dict = {}
    kept = prepare_conversations(ad, [item], max_length=10, stats=tiny)  # not even one pair fits: kept whole
    assert tiny["samples_over_length"] == 1 and kept.layouts[0].num_visual == full.layouts[0].num_visual


def _mix_data(mix: Path, **over) -> dict:
    d = {"geometry": ["toy"], "toy_sequences": 6, "frames_min": 2, "frames_max": 3, "instructions": str(mix),
         "instruction_ratio": 1.0, "instruction_frames": 2, "max_bad_media_fraction": 0.5}
    d.update(over)
    return d


def test_bad_media_is_replaced_by_a_fixed_sequence(llava_tree):
    ds = InstructionSet(llava_tree["mix"], video=None)
    seen_bad = set()
    for pos in range(27):  # three passes
        item, bad = robust_instruction_sample(ds, pos, seed=1000)
        again, bad2 = robust_instruction_sample(ds, pos, seed=1000)
        assert item["id"] == again["id"] and bad == bad2  # a pure function of the position
        assert item["id"] not in ("v_missing", "v_corrupt")
        for r in bad:
            assert r["pos"] == pos and ds.locate(r["index"])[1].record_id in ("v_missing", "v_corrupt")
            seen_bad.add(Path(r["file"]).name)
    assert seen_bad == {"not_there.mp4", "corrupt.mp4"}
    cfg = config_from_dict({"data": _mix_data(llava_tree["mix"])}).data
    batches = [StepBatches(cfg)[s] for s in range(9)]
    again = [StepBatches(cfg)[s] for s in range(9)]
    assert [b["bad_media"] for b in batches] == [b["bad_media"] for b in again]
    assert sum(len(b["bad_media"]) for b in batches) >= 1


def _tiny_cfg(mix: Path, *overrides: str, **data):
    return config_from_dict({
        "model": {"name": "tiny-qwen2.5-vl", "overrides": SMALL},
        "lora": {"r": 4, "alpha": 8}, "gasp": {"d_hidden": 32, "d_out": 16, "calib_tokens": 64},
        "optim": {"lr": 1e-3, "max_steps": 6, "warmup_steps": 1},
        "data": _mix_data(mix, instruction_ratio=0.5, **data), "save_every": 100, "report_to": [],
    }, list(overrides))


def _bad_steps(cfg) -> list[int]:
    sb = StepBatches(cfg.data)
    return [s for s in range(cfg.optim.max_steps) if sb[s]["bad_media"]]


def test_resume_after_a_skipped_bad_sample_is_exact(tmp_path):
    from gasp_vlm.train.recipe import GaspRecipe, train

    tree = build_llava_tree(tmp_path / "data")
    cfg = _tiny_cfg(tree["mix"], seed=14)
    bad_steps = _bad_steps(cfg)
    assert bad_steps and bad_steps[0] < 3  # a bad sample is met before the interruption
    straight = GaspRecipe(cfg, tmp_path / "a", progress=False)
    straight.run()
    train(cfg, tmp_path / "b", progress=False, stop_at=3)
    log_b = tmp_path / "b" / "logs" / "bad_media.jsonl"
    # crash debris: a record written for step 4 before the job died (step 4 runs again on resume)
    log_b.open("a").write(json.dumps({"step": 4, "file": "x", "error": "y", "index": 0, "pos": 0}) + "\n")
    resumed = GaspRecipe(cfg, tmp_path / "b", resume=True, progress=False)
    resumed.run()
    for k, v in straight.gasp_model.named_parameters():
        if v.requires_grad:
            torch.testing.assert_close(v, dict(resumed.gasp_model.named_parameters())[k], rtol=0, atol=1e-6, msg=k)
    la = [json.loads(l) for l in (tmp_path / "a" / "logs" / "bad_media.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in log_b.read_text().splitlines()]
    assert la == lb and len(la) >= 1  # same records, none twice, the debris gone
    assert sorted({r["step"] for r in la}) == sorted({s + 1 for s in bad_steps})
    assert all(Path(r["file"]).name in ("not_there.mp4", "corrupt.mp4") and r["error"] for r in la)
    train_a = [json.loads(l) for l in (tmp_path / "a" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["bad_media"] > 0 for r in train_a] == [s in bad_steps for s in range(6)]
    assert sum(r["lm"] > 0 for r in train_a) == 3  # ratio 0.5: 3 of 6 steps carry an instruction part


def test_too_much_bad_media_stops_the_run_with_a_clear_error(tmp_path):
    from gasp_vlm.train.recipe import train

    tree = build_llava_tree(tmp_path / "data")
    cfg = _tiny_cfg(tree["mix"], seed=14, max_bad_media_fraction=0.01, bad_media_min_tries=1)
    with pytest.raises(InstructionFormatError, match=r"bad_media.jsonl: 2 of 3 instruction samples tried so far "
                                                     r"have bad media, more than data.max_bad_media_fraction = 0.01"):
        train(cfg, tmp_path / "run", progress=False)
    assert len((tmp_path / "run" / "logs" / "bad_media.jsonl").read_text().splitlines()) == 2
    # with the default minimum of 100 tries, the first bad file does not stop the run
    train(_tiny_cfg(tree["mix"], seed=14, max_bad_media_fraction=0.01), tmp_path / "run2", progress=False)


def test_gasp_train_on_a_real_layout_mixture(tmp_path, llava_tree):
    from click.testing import CliRunner

    from gasp_vlm.cli import main

    res = CliRunner().invoke(main, [
        "train", "--set", "model.name=tiny-llava-next-video", "--set", "model.overrides={num_hidden_layers: 1}",
        "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "gasp.d_hidden=32", "--set", "gasp.d_out=16",
        "--set", "gasp.calib_tokens=64", "--set", "optim.max_steps=3", "--set", "data.geometry=[toy]",
        "--set", "data.toy_sequences=4", "--set", "data.frames_min=2", "--set", "data.frames_max=2",
        "--set", f"data.instructions={llava_tree['mix']}", "--set", "data.instruction_ratio=1.0",
        "--set", "data.instruction_frames=4", "--set", "data.video_sampling=fps", "--set", "data.batch_size=2",
        "--set", "data.max_bad_media_fraction=0.5", "--set", "report_to=[]",
        "--out", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(l) for l in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["kinds"] for r in recs] == ["gi"] * 3 and all(r["lm"] > 0 and np.isfinite(r["lm"]) for r in recs)
    assert "final checkpoint" in res.output


def test_bench_instructions_reports_per_sample_figures(llava_tree):
    from click.testing import CliRunner

    from gasp_vlm.cli import main

    res = CliRunner().invoke(main, ["bench", "instructions", "--data", str(llava_tree["mix"]), "--samples", "3",
                                    "--set", "data.seed=14", "--set", "data.instruction_frames=4"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    ds = InstructionSet(llava_tree["mix"], video=VideoOptions(max_frames=4))
    expect = [robust_instruction_sample(ds, pos, 14 + 1000) for pos in range(3)]
    assert [p["media"] for p in out["per_sample"]] == [it["media"] for it, _ in expect]
    assert out["bad_media_skipped"] == sum(len(b) for _, b in expect) == 2  # seed 14: two bad at position 0
    assert [p["frames"] for p in out["per_sample"]] == [len(it["frames"]) for it, _ in expect]
    assert all(p["decode_s"] > 0 and p["peak_rss_over_baseline_mib"] >= 0 for p in out["per_sample"])
    assert out["samples_per_s"] > 0 and out["video"]["max_frames"] == 4
    res = CliRunner().invoke(main, ["bench", "instructions", "--data", str(llava_tree["mix"]), "--set", "optim.lr=1"])
    assert res.exit_code != 0 and "only data.* keys" in res.output
