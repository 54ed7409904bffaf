"""`gasp data synth | check | tracks | convert` through click's CliRunner (issue 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gasp_vlm.cli import main
from gasp_vlm.data.scene import load_scene
from gasp_vlm.geometry.cameras import cam_to_world, project_world, unproject


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    res = CliRunner().invoke(main, ["data", "synth", "--out", str(out), "--scenes", "2", "--frames", "4",
                                    "--size", "40", "--seed", "9", "--camouflage-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    return out


def test_synth_writes_valid_scenes(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == ["scene_0000", "scene_0001"]
    metas = [json.loads((dataset / n / "scene.json").read_text()) for n in ("scene_0000", "scene_0001")]
    assert [m["camouflage"] for m in metas] == [True, False]
    assert all(m["format"] == "gasp-scene/1" and m["source"] == "synth" and m["seed"] == [9, i]
               for i, m in enumerate(metas))
    sc = load_scene(dataset / "scene_0000")
    assert sc.num_frames == 4 and sc.image(0).shape == (40, 40, 3) and sc.objects(3).dtype == np.int16


def test_synth_refuses_to_overwrite_without_flag(dataset):
    r = CliRunner().invoke(main, ["data", "synth", "--out", str(dataset), "--scenes", "1", "--frames", "1",
                                  "--size", "16"])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["data", "synth", "--out", str(dataset), "--scenes", "1", "--frames", "1",
                                  "--size", "16", "--camouflage-fraction", "1.5"])
    assert r.exit_code == 2 and "camouflage-fraction" in r.output


def test_check_summarises_a_good_dataset(dataset):
    r = CliRunner().invoke(main, ["data", "check", str(dataset)])
    assert r.exit_code == 0, r.output
    assert "scenes: 2 (2 ok, 0 broken)" in r.output and "frames: 8" in r.output and "40x40" in r.output
    assert "valid depth:" in r.output and "scene_0001" in r.output


def test_check_fails_with_clear_messages_on_a_broken_dataset(dataset, tmp_path):
    import shutil

    bad = tmp_path / "ds"
    shutil.copytree(dataset, bad)
    d = np.load(bad / "scene_0001" / "depths" / "000002.npy")
    d[0, 0] = np.nan
    np.save(bad / "scene_0001" / "depths" / "000002.npy", d)
    (bad / "scene_0000" / "intrinsics.npy").unlink()
    r = CliRunner().invoke(main, ["data", "check", str(bad)])
    assert r.exit_code == 1
    assert "scene scene_0001: depths/000002.npy: 1 NaN/inf depth values" in r.output
    assert "scene scene_0000: intrinsics.npy: missing file" in r.output
    assert "2 of 2 scenes are broken" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["data", "check", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_tracks_writes_the_npz_and_agrees_with_the_geometry(dataset, tmp_path):
    out = tmp_path / "t.npz"
    r = CliRunner().invoke(main, ["data", "tracks", str(dataset / "scene_0000"), "--anchor", "1",
                                  "--targets", "0,2-3", "--stride", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "queries" in r.output and "visible" in r.output
    with np.load(out) as f:
        keys = set(f.files)
        q, frames, uv, vis, dep = f["query_uv"], f["frames"], f["uv"], f["visible"], f["depth"]
    assert keys == {"query_uv", "frames", "uv", "visible", "depth"}
    assert frames.tolist() == [0, 2, 3] and q.shape[1] == 2 and 0 < len(q) <= 25
    assert uv.shape == (3, len(q), 2) and vis.shape == dep.shape == (3, len(q)) and vis.dtype == bool
    assert np.allclose(np.unique(q), (np.arange(5) + 0.5) * 8)  # grid centres
    # the stored uv / depth are the anchor queries (depth of the containing pixel, un-projected at the query
    # uv itself) projected into target frame 3 by hand
    sc = load_scene(dataset / "scene_0000")
    d = sc.depth(1).astype(np.float64)[q[:, 1].astype(int), q[:, 0].astype(int)]
    pts = cam_to_world(unproject(q.astype(np.float64), d, sc.intrinsics[1]), sc.cam_from_worlds[1])
    uv3, z3 = project_world(pts, sc.intrinsics[3], sc.cam_from_worlds[3])
    assert np.allclose(uv[2], uv3, atol=1e-3) and np.allclose(dep[2], z3, rtol=1e-5)
    assert vis.any() and vis.mean() < 1.0


def test_tracks_user_errors_are_clear(dataset, tmp_path):
    run = CliRunner().invoke
    base = ["data", "tracks", str(dataset / "scene_0000"), "--out", str(tmp_path / "t.npz")]
    r = run(main, base + ["--anchor", "9", "--targets", "1"])
    assert r.exit_code == 2 and "--anchor" in r.output and "4 frames" in r.output
    r = run(main, base + ["--anchor", "0", "--targets", "1,x"])
    assert r.exit_code == 2 and "'x' is not a frame index" in r.output
    r = run(main, base + ["--anchor", "0", "--targets", "7"])
    assert r.exit_code == 2 and "out of range" in r.output
    r = run(main, ["data", "tracks", str(tmp_path), "--anchor", "0", "--targets", "1", "--out", str(tmp_path / "x.npz")])
    assert r.exit_code == 1 and "scene.json: missing file" in r.output and "Traceback" not in r.output


def test_convert_names_the_datasets_and_reports_errors_without_traceback(tmp_path):
    r = CliRunner().invoke(main, ["data", "convert", "kitti", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "megadepth" in r.output and "wildrgbd" in r.output
    (tmp_path / "src").mkdir()
    r = CliRunner().invoke(main, ["data", "convert", "scannet", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "src/color: missing folder" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["data", "convert", "hypersim", str(tmp_path / "src"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "no hypersim scenes found" in r.output


@pytest.mark.parametrize("cmd", [[], ["synth"], ["check"], ["tracks"], ["convert"], ["manifest"]])
def test_help(cmd):
    r = CliRunner().invoke(main, ["data", *cmd, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output and len(r.output) > 200
