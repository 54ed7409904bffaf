"""Sequence manifests (data/manifest.py): deterministic mixture, the window rule, per-rank shards,
training from a manifest with an exact resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from gasp_vlm.cli import main
from gasp_vlm.data.manifest import ManifestGeometrySource, ManifestSpec, build_manifest
from gasp_vlm.data.scene import SceneError, write_scene

torch.set_num_threads(1)


def _dataset(root, lengths, hw=(28, 28)):
    rng = np.random.default_rng(len(lengths))
    K = np.array([[30.0, 0, hw[1] / 2], [0, 30.0, hw[0] / 2], [0, 0, 1]])
    for i, n in enumerate(lengths):
        cams = np.stack([np.array([[1, 0, 0, -0.05 * j], [0, 1, 0, 0], [0, 0, 1, 0.0]]) for j in range(n)])
        write_scene(root / f"scene_{i:02d}", [rng.integers(0, 255, (*hw, 3), dtype=np.uint8) for _ in range(n)],
                    [np.full(hw, 3.0, np.float32)] * n, np.stack([K] * n), cams, source="test")
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    return {"big": _dataset(root / "big", [120, 30]), "small": _dataset(root / "small", [12, 5, 1])}


def _rows(path):
    return [r for f in sorted(path.glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]


def test_manifest_is_deterministic_and_follows_the_window_rule(sources, tmp_path):
    spec = ManifestSpec(sequences=500, frames_min=8, frames_max=24, radius=48, seed=3, shard_rows=128)
    a = build_manifest(sources, tmp_path / "a", spec, progress=False)
    b = build_manifest(sources, tmp_path / "b", spec, progress=False)
    assert [f.read_bytes() for f in sorted(a.glob("*.parquet"))] == [f.read_bytes() for f in sorted(b.glob("*.parquet"))]
    meta = json.loads((a / "manifest.json").read_text())
    assert meta["rows"] == 500 and len(meta["shards"]) == 4 and meta["id"] == json.loads((b / "manifest.json").read_text())["id"]
    # default mixture: by frame count (150 vs 18 frames)
    assert {s["name"]: s["rows"] for s in meta["sources"]} == {"big": round(500 * 150 / 168), "small": 500 - round(500 * 150 / 168)}
    rows = _rows(a)
    assert [r["row"] for r in rows] == list(range(500))
    lens = {("big", "scene_00"): 120, ("big", "scene_01"): 30, ("small", "scene_00"): 12, ("small", "scene_01"): 5,
            ("small", "scene_02"): 1}
    names = [s["name"] for s in meta["sources"]]
    for r in rows:
        n = lens[(names[r["source"]], r["scene"])]
        o = np.array(r["others"])
        assert len(o) == 24 and 0 <= r["anchor"] < n and 9 <= r["num_frames"] <= 25
        assert ((o >= 0) & (o < n) & (np.abs(o - r["anchor"]) <= 48)).all()
        if n > 49 and 48 <= r["anchor"] < n - 48:  # a full window: no repeats, never the anchor
            assert len(set(o.tolist())) == 24 and r["anchor"] not in o
        if n == 1:
            assert (o == r["anchor"]).all()
    # sources interleave along the rows (a seeded shuffle, not one block per dataset)
    src = np.array([r["source"] for r in rows])
    assert 0 < src[:100].sum() < 100 * 0.5
    # anchors are uniform over frames: the long scene gets ~4x the short one
    big = [r for r in rows if names[r["source"]] == "big"]
    share = np.mean([r["scene"] == "scene_00" for r in big])
    assert 0.72 < share < 0.88


def test_weights_lengths_and_bad_specs(sources, tmp_path):
    m = build_manifest(sources, tmp_path / "w", ManifestSpec(sequences=90, weights={"big": 1, "small": 2}),
                       progress=False)
    assert {s["name"]: s["rows"] for s in json.loads((m / "manifest.json").read_text())["sources"]} == \
        {"big": 30, "small": 60}
    m = build_manifest(sources, tmp_path / "l", ManifestSpec(sequences=0, lengths={"big": 7, "small": 5}),
                       progress=False)
    assert json.loads((m / "manifest.json").read_text())["rows"] == 12
    with pytest.raises(SceneError, match="not sources"):
        build_manifest(sources, tmp_path / "x", ManifestSpec(sequences=9, weights={"kitti": 1}), progress=False)
    with pytest.raises(SceneError, match="already exists"):
        build_manifest(sources, tmp_path / "w", ManifestSpec(sequences=9), progress=False)
    assert not list(tmp_path.glob(".*"))


def test_ranks_own_disjoint_shards_and_read_only_theirs(sources, tmp_path):
    m = build_manifest(sources, tmp_path / "m", ManifestSpec(sequences=300, shard_rows=50), progress=False)
    seen = []
    for r in range(3):
        src = ManifestGeometrySource(m, rank=r, world=3)
        seen += src.rows.tolist()
        assert src.total == 300 and len(src) == 100
    assert sorted(seen) == list(range(300))
    (m / "shard-00001.parquet").unlink()  # rank 1's shard: ranks 0 and 2 never open it
    assert len(ManifestGeometrySource(m, rank=0, world=3)) == 100
    with pytest.raises(SceneError, match="shard-00001"):
        ManifestGeometrySource(m, rank=1, world=3)
    # fewer shards than ranks: rows are strided
    m2 = build_manifest(sources, tmp_path / "m2", ManifestSpec(sequences=10, shard_rows=100), progress=False)
    assert ManifestGeometrySource(m2, rank=1, world=4).rows.tolist() == [1, 5, 9]


def test_a_sample_is_the_row_and_scenes_load_lazily(sources, tmp_path):
    m = build_manifest(sources, tmp_path / "m", ManifestSpec(sequences=40, frames_min=2, frames_max=4, seed=1),
                       progress=False)
    src = ManifestGeometrySource(m)
    assert not src._scenes  # nothing loaded up front
    row = _rows(m)[7]
    item = src.sample(7, 3)
    assert item["manifest_row"] == 7 and item["scene"] == row["scene"] and len(item["frames"]) == 3
    assert item["frame_ids"][item["anchor"]] == row["anchor"]
    assert sorted(item["frame_ids"][:item["anchor"]] + item["frame_ids"][item["anchor"] + 1:]) == \
        sorted(row["others"][:2])
    assert len(src._scenes) == 1
    # epoch 0 reads the rows in order; the next epoch is a permutation of them
    assert [src.stream_index(p, 0) for p in range(40)] == list(range(40))
    assert sorted(src.stream_index(40 + p, 0) for p in range(40)) == list(range(40))


def test_train_from_a_manifest_records_it_and_resumes_exactly(sources, tmp_path):
    from test_train_recipe import read_log, tiny_cfg

    from gasp_vlm.train.recipe import GaspRecipe, train

    m = build_manifest({"small": sources["small"]}, tmp_path / "man",
                       ManifestSpec(sequences=20, frames_min=1, frames_max=2, radius=4), progress=False)
    cfg = tiny_cfg(data={"geometry": [], "manifest": str(m), "instruction_ratio": 0.0, "instructions": None})
    GaspRecipe(cfg, tmp_path / "a", progress=False).run()
    rec = json.loads((tmp_path / "a" / "data_manifest.json").read_text())
    assert rec["id"] == json.loads((m / "manifest.json").read_text())["id"] and rec["rows"] == 20
    train(cfg, tmp_path / "b", progress=False, stop_at=3)
    resumed = GaspRecipe(cfg, tmp_path / "b", resume=True, progress=False)
    resumed.run()
    la, lb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in lb] == list(range(1, 7)) and la[0]["corr"] > 0
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)
    # a changed manifest is refused on resume
    build_manifest({"small": sources["small"]}, m, ManifestSpec(sequences=20, frames_min=1, frames_max=2, radius=4,
                                                                seed=9), overwrite=True, progress=False)
    from gasp_vlm.train.config import ConfigError

    with pytest.raises(ConfigError, match="manifest_id"):
        GaspRecipe(cfg, tmp_path / "b", resume=True, progress=False)


def test_cli_manifest(sources, tmp_path):
    r = CliRunner().invoke(main, ["data", "manifest", f"a={sources['big']}", str(sources["small"]), "--out",
                                  str(tmp_path / "m"), "--sequences", "50", "--weights", "a=1,small=1"])
    assert r.exit_code == 0, r.output
    assert "50 sequences (a 25, small 25)" in r.output
    r = CliRunner().invoke(main, ["data", "manifest", str(sources["big"]), "--out", str(tmp_path / "m2"),
                                  "--weights", "big"])
    assert r.exit_code == 2 and "name=value" in r.output
    r = CliRunner().invoke(main, ["data", "manifest", str(sources["big"]), "--out", str(tmp_path / "m3")])
    assert r.exit_code == 0 and "150 sequences" in r.output  # default: one per anchor frame


def test_check_a_manifest_before_a_run(sources, tmp_path):
    import shutil

    m = build_manifest({"small": sources["small"]}, tmp_path / "m", ManifestSpec(sequences=30, radius=4),
                       progress=False)
    r = CliRunner().invoke(main, ["data", "check", str(m)])
    assert r.exit_code == 0 and "30 sequences over" in r.output, r.output
    copy = tmp_path / "small_copy"
    shutil.copytree(sources["small"], copy)
    m2 = build_manifest({"small": copy}, tmp_path / "m2", ManifestSpec(sequences=30, radius=4), progress=False)
    shutil.rmtree(copy / "scene_00")  # a scene removed after the manifest was made
    r = CliRunner().invoke(main, ["data", "check", str(m2)])
    assert r.exit_code == 1 and "scene_00" in r.output and "problem" in r.output


def test_a_radius_smaller_than_the_frame_count_repeats_window_frames(sources, tmp_path):
    m = build_manifest({"big": sources["big"]}, tmp_path / "m", ManifestSpec(sequences=50, frames_max=24, radius=4),
                       progress=False)
    for r in _rows(m):
        o = np.array(r["others"])
        assert len(o) == 24 and (np.abs(o - r["anchor"]) <= 4).all() and r["anchor"] not in o
        assert len(set(o[:8].tolist())) == min(8, len(set(o.tolist())))  # the distinct ones come first
