"""Deterministic step batches, the geometry/instruction interleave, exact toy targets, instruction labels."""

import numpy as np
import pytest
import torch

from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.stream import StepBatches, build_instructions, is_instruction_step, prepare_step

torch.set_num_threads(1)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_interleave_ratio_is_exact(ratio):
    kinds = [is_instruction_step(i, ratio) for i in range(400)]
    assert sum(kinds) == int(400 * ratio)
    if 0 < ratio < 1:  # spread evenly, never two windows of 1/ratio steps without one
        period = round(1 / ratio)
        assert all(any(kinds[i:i + period]) for i in range(0, 400 - period, period))


def _data_cfg(**over):
    d = {"geometry": ["toy"], "toy_sequences": 8, "frames_min": 2, "frames_max": 5, "frame_hw": [112, 112]}
    d.update(over)
    return config_from_dict({"data": d}).data


def test_batches_are_a_pure_function_of_step_and_rank():
    cfg = _data_cfg(batch_size=2)
    a, b = StepBatches(cfg), StepBatches(cfg)
    for step in (0, 3, 11):
        (x,), (y,) = a[step]["parts"], b[step]["parts"]
        assert x["kind"] == y["kind"] == "geo" and len(x["items"]) == 2
        for i, j in zip(x["items"], y["items"]):
            assert all(np.array_equal(f, g) for f, g in zip(i["frames"], j["frames"]))
    (r0,), (r1,) = StepBatches(cfg, rank=0, world=2)[4]["parts"], StepBatches(cfg, rank=1, world=2)[4]["parts"]
    # ranks agree on the parts and frame count (same module calls) but see different sequences
    assert r0["kind"] == r1["kind"] and len(r0["items"][0]["frames"]) == len(r1["items"][0]["frames"])
    assert not np.array_equal(r0["items"][0]["frames"][0], r1["items"][0]["frames"][0])
    counts = {len(StepBatches(cfg)[s]["parts"][0]["items"][0]["frames"]) for s in range(30)}
    assert counts <= set(range(2, 6)) and len(counts) > 1


def test_toy_targets_are_exact_correspondences():
    from gasp_vlm.models import load_adapter

    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 1})
    ds = StepBatches(_data_cfg(frames_min=4, frames_max=4))
    prepared, targets, rows = prepare_step(ad, ds[0]["parts"][0], ds.geometry, "Describe.")
    tg, lay, item = targets[0], prepared.layouts[0], ds[0]["parts"][0]["items"][0]
    assert rows is None and tg.num_pairs > 0
    s, (_, gw), px = lay.tokens_per_slot, lay.grid_hw, lay.token_px
    for m in range(tg.anchor_tokens.numel()):
        a = int(tg.anchor_tokens[m])
        ar, ac = divmod(a % s, gw)
        for t in range(tg.target_frames.numel()):
            if not tg.valid[m, t]:
                continue
            v = int(tg.target_tokens[m, t])
            slot, (r, c) = v // s, divmod(v % s, gw)
            f = int(tg.target_frames[t])
            assert slot == lay.slot_of_frame(f)
            block_a = item["frames"][0][ar * px:(ar + 1) * px, ac * px:(ac + 1) * px]
            block_t = item["frames"][f][r * px:(r + 1) * px, c * px:(c + 1) * px]
            assert np.array_equal(block_a, block_t)  # the same scene patch, moved with the camera
            assert float(tg.target_depth[m, t]) > 0


def test_generated_instructions_label_only_answers(tmp_path):
    from gasp_vlm.models import load_adapter

    cfg = _data_cfg(instructions="generated", instruction_ratio=1.0, generated_instructions=3, instruction_frames=2)
    assert build_instructions(cfg, tmp_path) is not None
    assert (tmp_path / "instructions" / "instructions.json").is_file()
    ds = StepBatches(cfg, work_dir=tmp_path)  # reuses the set written above
    geo, batch = ds[0]["parts"]  # ratio 1: every micro-batch adds an instruction part to its geometry part
    assert geo["kind"] == "geo" and batch["kind"] == "instr"
    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 1})
    prepared, targets, rows = prepare_step(ad, batch, ds.geometry, "unused")
    assert targets is None and rows.shape == (1, 1)
    labels = prepared.labels[0]
    answer = ad.tokenizer.decode(labels[labels != -100])
    # the whole conversation is one sample: both assistant turns carry labels, each with its <|im_end|>
    item = batch["items"][0]
    assistant = [t for r, t in item["turns"] if r == "assistant"]
    assert len(assistant) == 2 and assistant[0] == item["answer"]
    assert answer == "".join(a + "<|im_end|>" for a in assistant)
    assert (labels != -100).sum() < labels.numel() // 2  # the prompt and the video carry no labels


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_every_micro_batch_has_geometry_and_instructions_join_it(tmp_path, ratio):
    """Instruction parts are added to the geometry part (never replace it), at the configured rate, the
    same on every rank; the instruction and geometry streams each advance by their own count."""
    cfg = _data_cfg(instructions="generated", instruction_ratio=ratio, generated_instructions=4, instruction_frames=2)
    r0, r1 = StepBatches(cfg, rank=0, world=2, work_dir=tmp_path), StepBatches(cfg, rank=1, world=2, work_dir=tmp_path)
    kinds = [[p["kind"] for p in r0[s]["parts"]] for s in range(8)]
    assert kinds == [[p["kind"] for p in r1[s]["parts"]] for s in range(8)]
    assert all(k[0] == "geo" for k in kinds)
    assert sum("instr" in k for k in kinds) == int(8 * ratio)
    answers = [r0[s]["parts"][1]["items"][0]["answer"] for s in range(8) if len(r0[s]["parts"]) == 2]
    assert len(answers) == int(8 * ratio)
    control = StepBatches(cfg, work_dir=tmp_path, geometry_parts=False)  # the LM-only control: no geometry
    assert [[p["kind"] for p in control[s]["parts"]] for s in range(8)] == [k[1:] for k in kinds]


def test_the_stream_is_a_fresh_permutation_every_epoch():
    from gasp_vlm.train.stream import _stream_index, shuffled_index

    for n in (1, 2, 3, 7, 100, 1001, 4096):
        for key in range(4):
            assert sorted(shuffled_index(i, n, key) for i in range(n)) == list(range(n)), (n, key)
    n = 97
    epochs = [[_stream_index(e * n + i, n, seed=5) for i in range(n)] for e in range(3)]
    assert all(sorted(ep) == list(range(n)) for ep in epochs)  # each epoch visits every item once
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    assert epochs[0] == [_stream_index(i, n, seed=5) for i in range(n)]  # a pure function
    assert epochs[0] != [_stream_index(i, n, seed=6) for i in range(n)]
    # roughly uniform: where item 0 lands over many keys
    firsts = np.bincount([shuffled_index(0, 10, k) for k in range(5000)], minlength=10)
    assert firsts.min() > 400 and firsts.max() < 600


def test_workers_build_the_same_ready_batches_without_the_model():
    """PreparedSteps in DataLoader workers (tokens, pixels, targets made there) == built in-line, and the
    workers' adapter copy carries no weights."""
    from gasp_vlm.models import load_adapter
    from gasp_vlm.train.stream import PreparedSteps

    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 1})
    light = ad.preparer()
    assert light.model is None and ad.model is not None
    steps = PreparedSteps(StepBatches(_data_cfg(frames_min=3, frames_max=4)), light, "Describe.")
    inline = [steps[s] for s in range(4)]
    loader = torch.utils.data.DataLoader(steps, batch_size=None, sampler=range(4), num_workers=2,
                                         collate_fn=lambda x: x, prefetch_factor=2)
    for a, b in zip(inline, loader):
        assert a["step"] == b["step"] and b["load_s"] >= 0 and b["prep_s"] > 0
        for pa, pb in zip(a["parts"], b["parts"]):
            assert pa["kind"] == pb["kind"]
            for k, v in pa["batch"].inputs.items():
                assert torch.equal(v, pb["batch"].inputs[k]), k
            for ta, tb in zip(pa["targets"], pb["targets"]):
                assert torch.equal(ta.target_tokens, tb.target_tokens) and torch.equal(ta.valid, tb.valid)
    # the copy prepares exactly what the full adapter does
    frames = steps.steps[0]["parts"][0]["items"][0]["frames"]
    full = ad.prepare_frames([frames], prompt="Describe.")
    assert torch.equal(full.inputs["input_ids"], inline[0]["parts"][0]["batch"].inputs["input_ids"])
