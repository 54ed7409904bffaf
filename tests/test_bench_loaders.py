"""Loaders on fixture copies in each benchmark's real layout; media decoding; clear data errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from gasp_vlm.bench import BenchmarkDataError, get_benchmark
from gasp_vlm.bench.fixtures import (MVR_PROMPT, frame_level, make_all_angles, make_blink, make_mmsi, make_vsibench)
from gasp_vlm.bench.media import MediaError, read_video_frames, sample_images, uniform_frame_indices


def _tree_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_fixtures_are_small(tmp_path):
    make_vsibench(tmp_path / "v", first_release_parquet=True)
    make_all_angles(tmp_path / "a", tsv=True)
    make_blink(tmp_path / "b")
    make_mmsi(tmp_path / "m", tsv=True)
    assert _tree_bytes(tmp_path) < 1_000_000


def test_vsibench_layouts(tmp_path):
    vsi = get_benchmark("VSI-Bench")  # aliases are case-insensitive
    root = make_vsibench(tmp_path / "vsi", first_release_parquet=True)
    s = vsi.load(root)
    assert [x.sample_id for x in s] == [str(i) for i in range(11)]
    assert s[0].answer_type == "numeric" and s[5].category == "object_rel_direction_easy"
    assert s[5].agg_group == "object_rel_direction" and s[5].option_labels == ["A", "B"]
    assert s[0].media.kind == "video" and s[0].media.paths[0].endswith("arkitscenes/41069025.mp4")
    assert vsi.render_prompt(s[5]) == ("These are frames of a video.\nIf I am standing by the sofa and facing the tv, "
                                       "is the table to my left or right?\nOptions:\nA. left\nB. right\n"
                                       "Answer with the option's letter from the given choices directly.")
    assert vsi.render_prompt(s[0]).endswith("\nPlease answer the question using a single word or phrase.")
    # parquet variants: first release (same rows) and debiased (with a `pruned` column kept in meta)
    (root / "test.jsonl").unlink()
    assert [x.question for x in vsi.load(root)] == [x.question for x in s]
    deb = vsi.load(root, split="debiased")
    assert pq.read_schema(root / "test_debiased.parquet").field("id").type == "int64"
    assert deb[3].meta["pruned"] is True and deb[0].meta["pruned"] is False


def test_vsibench_missing_file_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkDataError, match="no test.jsonl"):
        get_benchmark("vsibench").load(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"id": 0, "dataset": "scannet"}\n{oops\n')
    with pytest.raises(BenchmarkDataError, match=r"test.jsonl:2: not valid JSON"):
        get_benchmark("vsibench").load(bad)
    (bad / "test.jsonl").write_text('{"id": 0, "dataset": "scannet"}\n')
    with pytest.raises(BenchmarkDataError, match=r"lacks field\(s\) scene_name"):
        get_benchmark("vsibench").load(bad)


def test_all_angles_json_and_tsv_agree(tmp_path):
    aa = get_benchmark("all-angles")
    root = make_all_angles(tmp_path / "aa", tsv=True)
    from_json = aa.load(root)
    from_tsv = aa.load(root / "bench_tsv" / "all_angles_bench_huggingface.tsv")
    assert [s.sample_id for s in from_json] == [str(i) for i in range(8)]
    for a, b in zip(from_json, from_tsv):
        assert (a.sample_id, a.category, a.options, a.answer, a.media.paths) == \
               (b.sample_id, b.category, b.options, b.answer, b.media.paths)
    assert from_json[0].meta["pair_idx"] == "1" and from_tsv[0].meta["pair_idx"] == "1"
    imgs = sample_images(from_json[7])
    assert len(imgs) == 4 and imgs[0].size == (32, 24)
    assert aa.render_prompt(from_json[0]) == ("Question: Across these views, how many people are in the scene?\n"
                                              "Options:\nA. 2\nB. 3\nC. 4\n"
                                              "Please select the correct answer from the options above. \n")


def test_blink_layout_and_prompt(tmp_path):
    blink = get_benchmark("blink")
    root = make_blink(tmp_path / "blink")
    table = pq.read_table(root / "Multi-view_Reasoning" / "val-00000-of-00001.parquet")
    assert str(table.schema.field("image_1").type) == "struct<bytes: binary, path: string>"
    assert table.column("image_3").null_count == table.num_rows
    samples = blink.load(root)  # scoring load: no image columns read
    assert all(s.media.blobs is None for s in samples)
    mvr = [s for s in samples if s.category == "Multi-view_Reasoning"]
    assert mvr[0].sample_id == "val_Multi-view_Reasoning_1" and mvr[0].answer == "(A)"
    assert blink.render_prompt(mvr[0]) == MVR_PROMPT
    assert blink.render_prompt(mvr[0], "lmms_eval").startswith(
        "Note: You only need to respond with A, B without providing any additional information.\n")
    art = next(s for s in samples if s.category == "Art_Style")
    assert blink.render_prompt(art).startswith("Disclaimer: This is not to make unfair assumptions")
    assert len(blink.fetch_media(art)) == 3 and len(blink.fetch_media(mvr[0])) == 2  # None images skipped
    eager = blink.load(root, with_media=True)
    assert [len(s.media.blobs) for s in eager] == [len(blink.fetch_media(s)) for s in samples]
    with pytest.raises(BenchmarkDataError, match="no <Subtask>/test"):
        blink.load(root, split="test")


def test_mmsi_parquet_and_tsv(tmp_path):
    mmsi = get_benchmark("MMSI-Bench")
    root = make_mmsi(tmp_path / "mmsi", tsv=True)
    assert str(pq.read_schema(root / "MMSI_Bench.parquet").field("images").type) == "list<element: binary>"
    s = mmsi.load(root)
    assert [x.sample_id for x in s] == ["0", "1", "2", "3", "4"]
    assert mmsi.render_prompt(s[0]).endswith(
        "D: directly ahead\nAnswer with the option's letter from the given choices directly. "
        "Enclose the option's letter within ``.")
    assert len(mmsi.fetch_media(s[4])) == 4
    t = mmsi.load(root / "MMSI_bench.tsv")
    assert [x.category for x in t] == [x.category for x in s]
    assert mmsi.fetch_media(t[4]) == mmsi.fetch_media(s[4])


def test_uniform_frames_and_decoding(tmp_path):
    assert uniform_frame_indices(8, 4) == [0, 2, 4, 7]
    assert uniform_frame_indices(100, 32) == np.linspace(0, 99, 32, dtype=int).tolist()
    root = make_vsibench(tmp_path / "vsi")
    frames, idx, total = read_video_frames(root / "scannet" / "scene0011_00.mp4", 4)
    assert total == 8 and idx == [0, 2, 4, 7]
    levels = [float(np.asarray(f).mean()) for f in frames]
    assert levels == pytest.approx([frame_level(i) for i in idx], abs=4)  # the right frames, in order
    with pytest.raises(MediaError, match="video not found"):
        read_video_frames(root / "nope.mp4", 4)


def test_results_json_layout_matches_samples(tmp_path):
    """Sample.to_json drops in-memory bytes so sample records can be dumped for audits."""
    s = get_benchmark("mmsi").load(make_mmsi(tmp_path / "m"), with_media=True)[0]
    d = s.to_json()
    assert "blobs" not in d["media"] and json.dumps(d)
