"""DL3DV from its COLMAP model (written by pycolmap), and the dataset runner (workers, shards, resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from convert_fixtures import X, c2w_cv, point_in_cam, uv_by_hand
from PIL import Image
from test_data_convert_collection import write_blendedmvs_scene

from gasp_vlm.cli import main
from gasp_vlm.data.convert import CONVERTERS, DATASETS, ConvertError, convert_dataset
from gasp_vlm.data.convert.common import write_colmap_array
from gasp_vlm.data.scene import load_scene
from gasp_vlm.data.scene_check import check_scene

pycolmap = pytest.importorskip("pycolmap")

HASH = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
FULL = (256, 192)  # the COLMAP model is of the full-resolution capture; images_4/ ships it at 1/4
DOT = np.array([2.0, 1.25, 5.0])  # seen off-centre by camera 0, where the lens distortion is ~2 px


def _grid_points() -> np.ndarray:
    xs, ys = np.meshgrid(np.linspace(-1.0, 1.5, 6), np.linspace(-0.8, 0.8, 5))
    return np.concatenate([np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 5.0)], 1), X[None]])


def write_dl3dv_colmap(root, k1=0.2, model="OPENCV", binary=True):
    """<batch>/<hash>/{images_4/frame_%05d.png, colmap/sparse/0/}: image 0 black with a white dot
    where the (distorted) camera sees DOT, and every grid point observed where it projects."""
    scene = root / "1K" / HASH
    sparse = scene / "colmap" / "sparse" / "0"
    sparse.mkdir(parents=True)
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, model, 240.0, *FULL)
    if model == "OPENCV":
        cam.params = [240.0, 240.0, FULL[0] / 2, FULL[1] / 2, k1, 0.0, 0.0, 0.0]
    rec.add_camera_with_trivial_rig(cam)
    small = pycolmap.Camera(cam.todict())
    small.rescale(FULL[0] // 4, FULL[1] // 4)
    pts = _grid_points()
    pids = [rec.add_point3D(p, pycolmap.Track(), np.zeros(3, np.uint8)) for p in pts]
    for i in range(2):
        w2c = np.linalg.inv(c2w_cv(i))
        kp, obs = [], []
        for pid, p in zip(pids, pts):
            q = w2c[:3, :3] @ p + w2c[:3, 3]
            uv = cam.img_from_cam(q)
            if uv is not None and 0 <= uv[0] < FULL[0] and 0 <= uv[1] < FULL[1]:
                kp.append(uv)
                obs.append(pid)
        name = f"frame_{i + 1:05d}.png"
        rec.add_image_with_trivial_frame(
            pycolmap.Image(name=name, keypoints=np.array(kp), camera_id=1, image_id=i + 1),
            pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3]))
        for k, pid in enumerate(obs):
            rec.add_observation(pid, pycolmap.TrackElement(i + 1, k))
        img = np.zeros((FULL[1] // 4, FULL[0] // 4, 3), np.uint8)
        if model == "OPENCV" and i == 0:
            u, v = small.img_from_cam(point_in_cam(i, DOT))
            yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]  # a sub-pixel blob centred on (u, v)
            blob = 255 * np.exp(-((xx + 0.5 - u) ** 2 + (yy + 0.5 - v) ** 2) / 2.0)
            img[:] = np.round(blob)[..., None].astype(np.uint8)
        (scene / "images_4").mkdir(exist_ok=True)
        Image.fromarray(img).save(scene / "images_4" / name)
    (rec.write_binary if binary else rec.write_text)(str(sparse))
    for p in list(sparse.glob("rigs.*")) + list(sparse.glob("frames.*")):  # the release's 3-file model
        p.unlink()
    ud = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), small) if model == "OPENCV" else small
    K = np.array([[60.0, 0, ud.width / 2], [0, 60.0, ud.height / 2], [0, 0, 1]])  # by hand: focal kept, centred
    return scene, (ud.height, ud.width), K


@pytest.mark.parametrize("binary", [True, False])
def test_dl3dv_colmap_undistorts_and_falls_back_to_sparse_depth(tmp_path, binary):
    scene, hw, K = write_dl3dv_colmap(tmp_path / "DL3DV-ALL-960P", binary=binary)
    CONVERTERS["dl3dv"](tmp_path / "DL3DV-ALL-960P", tmp_path / "out")
    out = tmp_path / "out" / HASH
    sc = load_scene(out)
    assert check_scene(out).ok and sc.meta["depth_source"] == "sparse" and sc.meta["world"] == "COLMAP"
    assert hw != (48, 64) and sc.image(0).shape[:2] == hw  # undistorted: COLMAP's new pinhole size
    np.testing.assert_allclose(sc.intrinsics[0], K)
    # the white dot drawn at the distorted projection now sits at the pinhole projection
    uv_dot, _ = uv_by_hand(K, 0, DOT)
    raw = np.asarray(Image.open(scene / "images_4" / "frame_00001.png")).astype(float).sum(-1)
    grey = sc.image(0).astype(float).sum(-1)
    centre, centre_raw = (np.array([(g * xx).sum(), (g * yy).sum()]) / g.sum()
                          for g, (yy, xx) in ((grey, np.mgrid[:hw[0], :hw[1]]), (raw, np.mgrid[:48, :64])))
    assert np.linalg.norm(centre_raw + (np.array(hw[::-1]) - [64, 48]) / 2 - centre) > 1.0  # it moved
    np.testing.assert_allclose(centre, uv_dot - 0.5, atol=0.25)  # pixel index vs centre-at-+0.5 coordinate
    for i in range(2):
        uv, z = uv_by_hand(K, i)
        d = sc.depth(i)
        assert d[int(uv[1]), int(uv[0])] == pytest.approx(z, rel=1e-5)  # depth only at SfM points
        assert 0 < (d > 0).sum() <= len(_grid_points())
    assert 0 < sc.meta["sparse_valid_fraction"] < 0.02


def test_dl3dv_colmap_dense_workspace_is_preferred(tmp_path):
    scene, hw, K = write_dl3dv_colmap(tmp_path / "src", k1=0.0, model="PINHOLE")
    ws = scene / "dense"
    (ws / "stereo" / "depth_maps").mkdir(parents=True)
    (ws / "sparse").mkdir()
    rec = pycolmap.Reconstruction(str(scene / "colmap" / "sparse" / "0"))
    cam = rec.cameras[1]
    cam.rescale(64, 48)  # the dense workspace's undistorted images
    rec.write_binary(str(ws / "sparse"))
    for i in range(2):
        name = f"frame_{i + 1:05d}.png"
        Image.fromarray(np.full((48, 64, 3), 99, np.uint8)).save((ws / "images").mkdir(exist_ok=True) or
                                                                ws / "images" / name)
        write_colmap_array(ws / "stereo" / "depth_maps" / f"{name}.geometric.bin",
                           np.full((48, 64), point_in_cam(i)[2], np.float32))
    sc = load_scene(CONVERTERS["dl3dv"](scene, tmp_path / "out"))
    assert sc.meta["depth_source"] == "dense" and (sc.depth(0) > 0).all() and sc.image(0)[0, 0, 0] == 99
    for i in range(2):
        uv, z = uv_by_hand(K, i)
        assert sc.depth(i)[int(uv[1]), int(uv[0])] == pytest.approx(z)
    # naming a source that is not there is an error, not a silent fallback
    with pytest.raises(ConvertError, match="needs a depth folder"):
        CONVERTERS["dl3dv"](scene, tmp_path / "out2", depth_source="user")


def test_dl3dv_colmap_user_depth_must_match_the_undistorted_image(tmp_path):
    scene, hw, K = write_dl3dv_colmap(tmp_path / "src")
    dd = tmp_path / "depth"
    dd.mkdir()
    for i in range(2):
        np.save(dd / f"frame_{i + 1:05d}.npy", np.full(hw, point_in_cam(i)[2], np.float32))
    sc = load_scene(CONVERTERS["dl3dv"](scene, tmp_path / "out", depth=dd))
    assert sc.meta["depth_source"] == "user" and (sc.depth(1) > 0).all()
    np.save(dd / "frame_00002.npy", np.ones((hw[0], hw[1] // 2), np.float32))
    with pytest.raises(ConvertError, match="aspect"):
        CONVERTERS["dl3dv"](scene, tmp_path / "out2", depth=dd)
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def test_colmap_camera_that_cannot_be_undistorted_is_refused(tmp_path):
    scene, _, _ = write_dl3dv_colmap(tmp_path / "src", model="EQUIRECTANGULAR")
    with pytest.raises(ConvertError, match="EQUIRECTANGULAR cannot be undistorted"):
        CONVERTERS["dl3dv"](scene, tmp_path / "out")


# ---- the runner ---------------------------------------------------------------------------------
def _three_blendedmvs(root):
    pids = [f"5a{i:022x}" for i in range(3)]
    for p in pids:
        write_blendedmvs_scene(root, pid=p)
    (root / pids[1] / "rendered_depth_maps" / "00000001.pfm").unlink()
    return pids


def test_runner_workers_report_failures_per_scene_and_resume(tmp_path):
    pids = _three_blendedmvs(tmp_path / "src")
    rep = convert_dataset(DATASETS["blendedmvs"], tmp_path / "src", tmp_path / "out", workers=2, progress=False)
    assert sorted(rep.converted) == [str(tmp_path / "out" / p) for p in (pids[0], pids[2])]
    (bad, msg), = rep.failed.items()
    assert bad.endswith(pids[1]) and "00000001.pfm: missing file" in msg
    assert not (tmp_path / "out" / pids[1]).exists() and not list((tmp_path / "out").glob(".*"))
    # rerun: the two done scenes are skipped, the bad one fails again; once fixed it converts
    rep = convert_dataset(DATASETS["blendedmvs"], tmp_path / "src", tmp_path / "out", progress=False)
    assert len(rep.skipped) == 2 and len(rep.failed) == 1 and not rep.converted
    write_blendedmvs_scene(tmp_path / "fixed", pid=pids[1])
    (tmp_path / "src" / pids[1] / "rendered_depth_maps" / "00000001.pfm").write_bytes(
        (tmp_path / "fixed" / pids[1] / "rendered_depth_maps" / "00000001.pfm").read_bytes())
    rep = convert_dataset(DATASETS["blendedmvs"], tmp_path / "src", tmp_path / "out", progress=False)
    assert rep.converted == [str(tmp_path / "out" / pids[1])] and len(rep.skipped) == 2


def test_runner_shards_partition_the_scenes(tmp_path):
    for i in range(5):
        write_blendedmvs_scene(tmp_path / "src", pid=f"5b{i:022x}")
    done = []
    for i in range(3):
        rep = convert_dataset(DATASETS["blendedmvs"], tmp_path / "src", tmp_path / f"o{i}", shard=(i, 3),
                              progress=False)
        done += [p.rsplit("/", 1)[1] for p in rep.converted]
    assert sorted(done) == [f"5b{i:022x}" for i in range(5)] and len(set(done)) == 5


def test_cli_convert_writes_the_report_and_exits_1_on_failures(tmp_path):
    pids = _three_blendedmvs(tmp_path / "src")
    r = CliRunner().invoke(main, ["data", "convert", "blendedmvs", str(tmp_path / "src"), "--out",
                                  str(tmp_path / "out"), "--workers", "2", "--max-frames", "1"])
    assert r.exit_code == 0, r.output  # frame 1 (the broken one) is beyond --max-frames
    assert load_scene(tmp_path / "out" / pids[0]).num_frames == 1
    r = CliRunner().invoke(main, ["data", "convert", "blendedmvs", str(tmp_path / "src" / pids[0]), "--out",
                                  str(tmp_path / "half"), "--depth-format", "float16"])
    assert r.exit_code == 0, r.output
    half = load_scene(tmp_path / "half")
    assert half.meta["depth_format"] == "float16" and np.load(half.depth_path(0)).dtype == np.float16
    assert (tmp_path / "half.convert_report.json").is_file()  # one scene: the report sits beside it
    r = CliRunner().invoke(main, ["data", "convert", "blendedmvs", str(tmp_path / "src"), "--out",
                                  str(tmp_path / "out2"), "--shard", "1/2"])
    assert r.exit_code == 1 and "FAILED" in r.output and "00000001.pfm" in r.output
    rep = json.loads((tmp_path / "out2" / "convert_report.shard-1-of-2.json").read_text())
    assert rep["shard"] == "1/2" and list(rep["failed"]) == [str(tmp_path / "out2" / pids[1])]
    r = CliRunner().invoke(main, ["data", "convert", "blendedmvs", str(tmp_path / "src"), "--out",
                                  str(tmp_path / "o3"), "--stream", "dslr"])
    assert r.exit_code == 1 and "['stream'] do not apply" in r.output
    r = CliRunner().invoke(main, ["data", "convert", "blendedmvs", str(tmp_path / "src"), "--out",
                                  str(tmp_path / "o3"), "--shard", "2/2"])
    assert r.exit_code == 1 and "0 <= i < n" in r.output
