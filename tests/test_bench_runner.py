"""run_eval with a fake generator: prompts, frames, recorded settings, crash + resume, clear errors."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from gasp_vlm.bench.fixtures import make_all_angles, make_blink, make_mmsi, make_vsibench
from gasp_vlm.bench.media import MediaError
from gasp_vlm.bench.runner import run_eval


class FakeGenerator:
    """Answers "A" to everything; can be told to crash on its n-th call."""

    def __init__(self, crash_on_call: int | None = None, answer: str = "A"):
        self.calls: list[list[dict]] = []
        self.crash_on_call = crash_on_call
        self.answer = answer

    def __call__(self, requests):
        self.calls.append(requests)
        if self.crash_on_call is not None and len(self.calls) == self.crash_on_call:
            raise RuntimeError("simulated crash")
        return [self.answer for _ in requests]


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_vsibench_requests_frames_and_run_json(tmp_path):
    root = make_vsibench(tmp_path / "vsi")
    gen = FakeGenerator()
    res = run_eval("vsibench", root, gen, tmp_path / "out", model_name="fake", frames=4, batch_size=3, progress=False)
    reqs = [r for call in gen.calls for r in call]
    assert [len(c) for c in gen.calls] == [3, 3, 3, 2]
    assert reqs[0]["images"] is None and len(reqs[0]["video"]) == 4
    assert all(isinstance(f, Image.Image) for f in reqs[0]["video"])
    assert reqs[0]["prompt"].startswith("These are frames of a video.\nHow many chair(s)")
    preds = _lines(tmp_path / "out" / "predictions.jsonl")
    assert preds[0]["frame_indices"] == [0, 2, 4, 7] and preds[0]["prompt"] == reqs[0]["prompt"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["frames"] == 4 and run["generation"] == {"max_new_tokens": 16, "do_sample": False}
    assert {"transformers", "torch", "av"} <= set(run["versions"]) and run["num_generated"] == 11
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == res and res["num_missing"] == 0 and res["frames"] == 4
    # "A" is right for rel_direction_easy and route_planning and appearance order; numeric answers score 0
    assert res["categories"]["route_planning"] == 100.0 and res["categories"]["object_counting"] == 0.0


def test_default_frames_is_32(tmp_path):
    root = make_vsibench(tmp_path / "vsi")
    gen = FakeGenerator()
    run_eval("vsibench", root, gen, tmp_path / "out", limit=1, progress=False)
    assert len(gen.calls[0][0]["video"]) == 32
    assert json.loads((tmp_path / "out" / "run.json").read_text())["frames"] == 32


def test_crash_then_resume_with_truncated_line(tmp_path):
    root = make_blink(tmp_path / "blink")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval("blink", root, FakeGenerator(crash_on_call=3), out, batch_size=2, progress=False)
    pred_path = out / "predictions.jsonl"
    assert len(_lines(pred_path)) == 4
    with pred_path.open("a") as f:  # what a kill mid-write leaves behind
        f.write('{"sample_id": "val_Counting_1", "raw_out')
    gen = FakeGenerator()
    res = run_eval("blink", root, gen, out, batch_size=2, progress=False)
    assert sum(len(c) for c in gen.calls) == 4  # only the 4 unanswered samples
    ids = [r["sample_id"] for r in _lines(pred_path)]
    assert len(ids) == len(set(ids)) == 8 and res["num_missing"] == 0 and res["duplicate_ids"] == 0
    assert json.loads((out / "run.json").read_text())["resumed_with_done"] == 4
    # a third run has nothing left to generate and reproduces the same scores
    gen3 = FakeGenerator()
    assert run_eval("blink", root, gen3, out, progress=False) == res and gen3.calls == []


def test_resume_with_other_settings_is_refused(tmp_path):
    root = make_vsibench(tmp_path / "vsi")
    run_eval("vsibench", root, FakeGenerator(), tmp_path / "out", frames=2, limit=1, progress=False)
    with pytest.raises(ValueError, match="different settings.*frames: 2 -> 4"):
        run_eval("vsibench", root, FakeGenerator(), tmp_path / "out", frames=4, limit=1, progress=False)


def test_missing_video_fails_before_generation(tmp_path):
    root = make_vsibench(tmp_path / "vsi")
    (root / "scannet" / "scene0011_00.mp4").unlink()
    gen = FakeGenerator()
    with pytest.raises(MediaError, match=r"vsibench sample 1: video file not found: .*scannet/scene0011_00.mp4"):
        run_eval("vsibench", root, gen, tmp_path / "out", progress=False)
    assert gen.calls == []


@pytest.mark.parametrize("name,maker,n_images", [("all_angles", make_all_angles, 2), ("mmsi", make_mmsi, 2),
                                                 ("blink", make_blink, 3)])
def test_image_benchmarks_feed_all_views_in_order(tmp_path, name, maker, n_images):
    root = maker(tmp_path / name)
    gen = FakeGenerator(answer="``A``" if name == "mmsi" else "A")
    res = run_eval(name, root, gen, tmp_path / "out", limit=1, progress=False)
    req = gen.calls[0][0]
    assert req["video"] is None and len(req["images"]) == n_images
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" for i in req["images"])
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert res["num_samples"] == 1 and run["frames"] is None
    # VLMEvalKit's Qwen sizing is official for All-Angles/MMSI; BLINK leaves sizing to the model
    official_px = {"min_pixels": 1280 * 28 * 28, "max_pixels": 16384 * 28 * 28}
    expected = None if name == "blink" else official_px
    assert run["pixels"] == expected and {k: req[k] for k in official_px if k in req} == (expected or {})


def _write_lines(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_read_predictions_keeps_first_identical_repeat(tmp_path):
    from gasp_vlm.bench.records import read_predictions

    p = _write_lines(tmp_path / "p.jsonl", [{"sample_id": "a", "raw_output": "A", "prompt": "first"},
                                            {"sample_id": "b", "raw_output": None},
                                            {"sample_id": "a", "raw_output": "A", "prompt": "second"},
                                            {"sample_id": "b", "raw_output": None}])
    recs, dups = read_predictions(p)
    assert list(recs) == ["a", "b"] and recs["a"]["prompt"] == "first"
    assert dups == {"duplicate_ids": 2, "duplicate_lines": 2}


def test_read_predictions_lists_first_conflicts(tmp_path):
    from gasp_vlm.bench.records import DuplicatePredictionsError, read_predictions

    # 7 conflicting ids (a null answer vs a real one conflicts too); only the first 5 are spelled out
    first = [{"sample_id": str(i), "raw_output": None if i == 0 else "A"} for i in range(8)]
    again = [{"sample_id": str(i), "raw_output": "B" if i < 7 else "A"} for i in range(8)]
    p = _write_lines(tmp_path / "p.jsonl", first + again)
    with pytest.raises(DuplicatePredictionsError) as e:
        read_predictions(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 7 sample_id(s) appear more than once with different raw_output: "
                          "'0' (lines 1, 9), '1' (lines 2, 10)")
    assert "'4' (lines 5, 13) and 2 more;" in msg and "'5'" not in msg and "'7'" not in msg


def test_each_video_is_decoded_once_for_all_its_questions(tmp_path, monkeypatch):
    """VSI-Bench's 11 fixture questions ask about 3 videos: with the cache 3 decodes (run.json says so),
    without it 11, and the requests (frames, pixels, indices) are the same either way."""
    import gasp_vlm.bench.media as M

    calls = []
    real = M.read_video_frames
    monkeypatch.setattr(M, "read_video_frames", lambda p, k: calls.append(str(p)) or real(p, k))
    root = make_vsibench(tmp_path / "vsi")
    cached, plain = FakeGenerator(), FakeGenerator()
    run_eval("vsibench", root, cached, tmp_path / "a", frames=4, batch_size=4, progress=False)
    assert len(calls) == 3 and len(set(calls)) == 3
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (run["video_decodes"], run["video_cache_hits"]) == (3, 8)
    calls.clear()
    run_eval("vsibench", root, plain, tmp_path / "b", frames=4, batch_size=4, video_cache_bytes=0, progress=False)
    assert len(calls) == 11
    a = [r for c in cached.calls for r in c]
    b = [r for c in plain.calls for r in c]
    assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    for x, y in zip(a, b):
        assert [im.tobytes() for im in x["video"]] == [im.tobytes() for im in y["video"]]
    assert _lines(tmp_path / "a" / "predictions.jsonl") == _lines(tmp_path / "b" / "predictions.jsonl")


def test_video_cache_is_bounded_and_sees_replaced_files(tmp_path):
    from gasp_vlm.bench.media import VideoFrameCache

    root = make_vsibench(tmp_path / "vsi")
    videos = sorted(root.rglob("*.mp4"))
    one = VideoFrameCache()
    frames, _, _ = one.read(videos[0], 2)
    per_video = sum(im.width * im.height * 3 for im in frames)
    small = VideoFrameCache(max_bytes=per_video)  # room for one video
    small.read(videos[0], 2)
    small.read(videos[1], 2)  # evicts videos[0]
    small.read(videos[0], 2)
    assert (small.decodes, small.hits) == (3, 0)
    small.read(videos[0], 2)
    small.read(videos[0], 3)  # another frame count is another entry
    assert (small.decodes, small.hits) == (4, 1)
    import os
    st = videos[0].stat()
    os.utime(videos[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed on disk
    one.read(videos[0], 2)
    assert (one.decodes, one.hits) == (2, 0)


class EchoGenerator:
    """Answers a per-request string (so merged files can be compared with a single run's)."""

    def __call__(self, requests):
        return [f"{len(r['prompt'])}:{r['prompt'][-12:]}" for r in requests]


def test_data_parallel_ranks_merge_to_the_single_process_run(tmp_path):
    from gasp_vlm.bench.runner import shard_samples
    from gasp_vlm.bench.registry import get_benchmark

    root = make_vsibench(tmp_path / "vsi")
    single = run_eval("vsibench", root, EchoGenerator(), tmp_path / "one", frames=2, batch_size=2, progress=False)
    samples = get_benchmark("vsibench").load(root)
    parts = [shard_samples(samples, r, 2) for r in range(2)]
    assert sorted(s.sample_id for p in parts for s in p) == sorted(s.sample_id for s in samples)
    for p in parts:  # whole videos per rank: the cache still serves every question of a video
        assert not {s.media.paths[0] for s in p} & {s.media.paths[0] for q in parts if q is not p for s in q}
    out = tmp_path / "dp"
    r1 = run_eval("vsibench", root, EchoGenerator(), out, frames=2, batch_size=2, progress=False, rank=1, world=2)
    assert r1["generated"] == len(parts[1]) and (out / "predictions.rank-1-of-2.jsonl").is_file()
    merged = run_eval("vsibench", root, EchoGenerator(), out, frames=2, batch_size=2, progress=False, rank=0,
                      world=2, poll_s=0.01)
    assert _lines(out / "predictions.jsonl") == _lines(tmp_path / "one" / "predictions.jsonl")
    for k in ("overall", "num_scored"):
        if k in single:
            assert merged[k] == single[k]
    assert not list(out.glob("predictions.rank-*")) and not list(out.glob("run.rank-*"))
    run = json.loads((out / "run.json").read_text())
    assert run["data_parallel"] == 2 and run["num_generated"] == len(samples)
    assert run["video_decodes"] == len({s.media.paths[0] for s in samples})


def test_data_parallel_resume_with_another_world_size_and_a_missing_rank(tmp_path):
    root = make_vsibench(tmp_path / "vsi")
    out = tmp_path / "dp"
    run_eval("vsibench", root, EchoGenerator(), out, frames=2, progress=False, rank=1, world=3)
    with pytest.raises(TimeoutError, match="unanswered"):  # rank 2 of 3 never ran
        run_eval("vsibench", root, EchoGenerator(), out, frames=2, progress=False, rank=0, world=3,
                 wait_timeout_s=0.05, poll_s=0.01)
    from gasp_vlm.bench.registry import get_benchmark

    n = len(get_benchmark("vsibench").load(root))
    gen = FakeGenerator()
    run_eval("vsibench", root, gen, out, frames=2, progress=False)  # one process picks up the rest
    generated_now = sum(len(c) for c in gen.calls)
    assert 0 < generated_now < n  # ranks 0 and 1 of the earlier run are not redone
    assert len(_lines(out / "predictions.jsonl")) == n and not list(out.glob("predictions.rank-*"))


def test_lmms_eval_profile_applies_lmms_eval_qwen_settings(tmp_path):
    # lmms-eval lmms_eval/models/simple/qwen2_5_vl.py Qwen2_5_VL defaults reach every request of an
    # lmms_eval profile: min/max_pixels on each image, max_num_frames as the frame count, all of it in run.json
    gen = FakeGenerator(answer="``A``")
    run_eval("mmsi", make_mmsi(tmp_path / "m"), gen, tmp_path / "out", profile="lmms_eval", limit=1, progress=False)
    req = gen.calls[0][0]
    assert (req["min_pixels"], req["max_pixels"]) == (200704, 1605632)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["pixels"] == {"min_pixels": 200704, "max_pixels": 1605632}
    assert run["model_settings"]["max_num_frames"] == 32 and "frame_sampling" in run["model_settings"]
    assert run["model_settings"]["system_prompt"] == "You are a helpful assistant."  # = the Qwen adapter's own
    official = FakeGenerator(answer="``A``")
    run_eval("mmsi", make_mmsi(tmp_path / "m"), official, tmp_path / "out2", limit=1, progress=False)
    assert official.calls[0][0]["min_pixels"] == 1280 * 28 * 28  # official MMSI: its VLMEvalKit fork's sizing


def test_lmms_eval_max_num_frames_sets_the_frame_count(tmp_path):
    from gasp_vlm.bench import get_benchmark
    from gasp_vlm.bench.registry import LMMS_EVAL_QWEN2_5_VL

    vsi = get_benchmark("vsibench")
    vsi.model_settings = {"lmms_eval": {**LMMS_EVAL_QWEN2_5_VL, "max_num_frames": 4}}  # this instance only
    gen = FakeGenerator()
    run_eval(vsi, make_vsibench(tmp_path / "vsi"), gen, tmp_path / "out", profile="lmms_eval", limit=1,
             progress=False)
    assert len(gen.calls[0][0]["video"]) == 4
    assert json.loads((tmp_path / "out" / "run.json").read_text())["frames"] == 4
