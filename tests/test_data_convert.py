"""Converters (data/convert/) on small fixtures written in the real layouts, with hand-projected points."""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from gasp_vlm.data.convert import CONVERTERS, ConvertError
from gasp_vlm.data.convert.co3d import ndc_to_pixels, pytorch3d_to_opencv, read_float16_png, write_float16_png
from gasp_vlm.data.convert.common import read_colmap_array, write_colmap_array, write_png16
from gasp_vlm.data.scene import load_scene
from gasp_vlm.data.scene_check import check_scene
from gasp_vlm.geometry.cameras import project_world


def _img(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _project(sc, i, X):
    uv, z = project_world(np.asarray(X, float), sc.intrinsics[i], sc.cam_from_worlds[i])
    return uv, float(z)


def _no_leftovers(parent):
    return not [p for p in parent.iterdir() if p.name.startswith(".")]


# ---- COLMAP arrays ------------------------------------------------------------------------------
def test_colmap_array_round_trip_and_layout(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_colmap_array(tmp_path / "d.bin", a)
    raw = (tmp_path / "d.bin").read_bytes()
    assert raw.startswith(b"4&3&1&")
    # COLMAP reads it as a Fortran-order (W, H, C) array: x varies fastest, i.e. rows one after another
    assert np.frombuffer(raw[6:], "<f4")[:5].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    np.testing.assert_array_equal(read_colmap_array(tmp_path / "d.bin"), a)
    (tmp_path / "bad.bin").write_bytes(b"4&3&1&" + b"\0" * 8)
    with pytest.raises(ConvertError, match="bad.bin"):
        read_colmap_array(tmp_path / "bad.bin")


# ---- DL3DV --------------------------------------------------------------------------------------
def _dl3dv_fixture(root, k1=0.0, depth_hw=(270, 480)):
    """transforms.json for 1920x1080 with images_4/ at 480x270 (the 960P release's real mismatch)."""
    ry90 = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1.0]])  # GL camera looking down -x
    c0 = np.eye(4)
    c0[:3, 3] = [1, 2, 3]
    meta = dict(w=1920, h=1080, fl_x=1000.0, fl_y=1000.0, cx=960.0, cy=540.0, k1=k1, k2=0.0, p1=0.0, p2=0.0,
                camera_model="OPENCV",
                applied_transform=[[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]],
                frames=[dict(file_path="images/frame_00001.png", transform_matrix=c0.tolist(), colmap_im_id=1),
                        dict(file_path="images/frame_00002.png", transform_matrix=ry90.tolist(), colmap_im_id=2),
                        dict(file_path="images/frame_00003.png", transform_matrix=c0.tolist(), colmap_im_id=3)])
    (root / "transforms.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "transforms.json").write_text(json.dumps(meta))
    for i in (1, 2, 3):
        _img(root / "images_4" / f"frame_{i:05d}.png", 270, 480, i)
    dd = root.parent / "depth"
    dd.mkdir(exist_ok=True)
    np.save(dd / "frame_00001.npy", np.full(depth_hw, 10.0, np.float32))
    write_png16(dd / "frame_00002.png", np.full(depth_hw, 10000, np.uint16))  # 10 m in mm
    write_colmap_array(dd / "frame_00003.png.geometric.bin", np.full(depth_hw, 7.5, np.float32))
    return dd


def test_dl3dv_known_projection(tmp_path):
    dd = _dl3dv_fixture(tmp_path / "src")
    out = CONVERTERS["dl3dv"](tmp_path / "src", tmp_path / "scene", depth=dd)
    sc = load_scene(out)
    assert check_scene(out).ok and sc.num_frames == 3 and sc.meta["source"] == "dl3dv"
    # K rescaled 1920x1080 -> 480x270 (x 0.25)
    np.testing.assert_allclose(sc.intrinsics[0], [[250, 0, 240], [0, 250, 135], [0, 0, 1]])
    # camera at (1, 2, 3), GL identity: looks down -z with y up. X = (1.5, 1, -7) is 10 ahead, right, below.
    uv, z = _project(sc, 0, [1.5, 1.0, -7.0])
    np.testing.assert_allclose(uv, [240 + 250 * 0.05, 135 + 250 * 0.1])
    assert z == pytest.approx(10.0)
    # camera rotated 90 deg about y (looks down -x): X = (-10, 1, 0.5) -> OpenCV (-0.5, -1, 10)
    uv, z = _project(sc, 1, [-10.0, 1.0, 0.5])
    np.testing.assert_allclose(uv, [240 - 12.5, 135 - 25.0])
    assert z == pytest.approx(10.0)
    # depth: npy as is, png / 1000, COLMAP as is
    assert sc.depth(0)[0, 0] == 10.0 and sc.depth(1)[5, 5] == pytest.approx(10.0) and sc.depth(2)[3, 3] == 7.5
    assert sc.image_names == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]


def test_dl3dv_depth_at_another_size_resizes_the_image(tmp_path):
    dd = _dl3dv_fixture(tmp_path / "src", depth_hw=(135, 240))
    sc = load_scene(CONVERTERS["dl3dv"](tmp_path / "src", tmp_path / "scene", depth=dd))
    assert sc.image(0).shape == (135, 240, 3)
    np.testing.assert_allclose(sc.intrinsics[0], [[125, 0, 120], [0, 125, 67.5], [0, 0, 1]])


def test_dl3dv_refusals_name_the_file(tmp_path):
    dd = _dl3dv_fixture(tmp_path / "src", k1=0.05)
    with pytest.raises(ConvertError, match=r"transforms\.json.*k1"):
        CONVERTERS["dl3dv"](tmp_path / "src", tmp_path / "scene", depth=dd)
    assert not (tmp_path / "scene").exists() and _no_leftovers(tmp_path)
    out = CONVERTERS["dl3dv"](tmp_path / "src", tmp_path / "scene", depth=dd, allow_distortion=True)
    assert load_scene(out).num_frames == 3
    with pytest.raises(ConvertError, match="no depth maps"):
        CONVERTERS["dl3dv"](tmp_path / "src", tmp_path / "scene2")
    (dd / "frame_00002.png").unlink()
    with pytest.raises(ConvertError, match="frame_00002"):
        CONVERTERS["dl3dv"](tmp_path / "src", tmp_path / "scene3", depth=dd, allow_distortion=True)
    assert not (tmp_path / "scene3").exists() and _no_leftovers(tmp_path)


# ---- CO3Dv2 -------------------------------------------------------------------------------------
def _p3d_project(X, R, T, f_ndc, p_ndc, size_hw, fmt):
    """PyTorch3D's own formula: X_cam = X @ R + T; ndc = f * X/Z + p; pixel = half - ndc * s."""
    h, w = size_hw
    half = np.array([w / 2, h / 2])
    s = half if fmt == "ndc_norm_image_bounds" else np.full(2, min(w, h) / 2)
    xc = np.asarray(X) @ np.asarray(R) + np.asarray(T)
    ndc = np.asarray(f_ndc) * xc[:2] / xc[2] + np.asarray(p_ndc)
    return half - ndc * s, xc[2]


def _rot(ax, th):
    c, s = np.cos(th), np.sin(th)
    if ax == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _co3d_fixture(root):
    cat = root / "apple"
    seq = "110_13051_23361"
    frames = []
    specs = [(np.eye(3), [0, 0, 5.0], [2.0, 2.0], [0.1, -0.2], "ndc_isotropic"),
             (_rot("y", 0.3) @ _rot("z", 0.2), [0.2, -0.1, 6.0], [2.0, 1.5], [0.0, 0.05], "ndc_norm_image_bounds")]
    for n, (R, T, f, p, fmt) in enumerate(specs, start=1):
        rel = f"apple/{seq}"
        _img(root / rel / "images" / f"frame{n:06d}.jpg", 60, 80, n)
        (root / rel / "depths").mkdir(exist_ok=True)
        (root / rel / "depth_masks").mkdir(exist_ok=True)
        write_float16_png(root / rel / "depths" / f"frame{n:06d}.jpg.geometric.png", np.full((60, 80), 2.5))
        mask = np.full((60, 80), 255, np.uint8)
        mask[:10] = 0
        Image.fromarray(mask).save(root / rel / "depth_masks" / f"frame{n:06d}.png")
        frames.append(dict(sequence_name=seq, frame_number=n, frame_timestamp=0.1 * n,
                           image=dict(path=f"{rel}/images/frame{n:06d}.jpg", size=[60, 80]),
                           depth=dict(path=f"{rel}/depths/frame{n:06d}.jpg.geometric.png", scale_adjustment=2.0,
                                      mask_path=f"{rel}/depth_masks/frame{n:06d}.png"),
                           mask=dict(path=f"{rel}/masks/frame{n:06d}.png", mass=100.0),
                           viewpoint=dict(R=np.asarray(R).tolist(), T=list(T), focal_length=f, principal_point=p,
                                          intrinsics_format=fmt)))
    (cat / "frame_annotations.jgz").write_bytes(gzip.compress(json.dumps(frames[::-1]).encode()))
    return cat, seq, specs


def test_co3d_ndc_conventions_by_hand():
    # isotropic: s = min(80, 60) / 2 = 30 -> f = 60 px, c = (40 - 0.1 * 30, 30 + 0.2 * 30)
    np.testing.assert_allclose(ndc_to_pixels([2, 2], [0.1, -0.2], [60, 80], "ndc_isotropic"),
                               [[60, 0, 37], [0, 60, 36], [0, 0, 1]])
    # norm image bounds: s = (40, 30)
    np.testing.assert_allclose(ndc_to_pixels([2, 2], [0, 0], [60, 80], "ndc_norm_image_bounds"),
                               [[80, 0, 40], [0, 60, 30], [0, 0, 1]])
    with pytest.raises(ConvertError):
        ndc_to_pixels([1, 1], [0, 0], [60, 80], "screen")
    # R = I, T = (0, 0, 5): X = (1, 2, 0) is at PyTorch3D (1, 2, 5) = OpenCV (-1, -2, 5)
    cfw = pytorch3d_to_opencv(np.eye(3), [0, 0, 5])
    np.testing.assert_allclose(cfw @ [1, 2, 0, 1], [-1, -2, 5])


def test_co3d_sequence_matches_pytorch3d_projection(tmp_path):
    cat, seq, specs = _co3d_fixture(tmp_path / "co3d")
    out = CONVERTERS["co3d"](cat, tmp_path / "out")
    sc = load_scene(out / seq)
    assert check_scene(out / seq).ok and sc.num_frames == 2 and sc.image_names == ["frame000001.jpg", "frame000002.jpg"]
    uv, z = _project(sc, 0, [1.0, 2.0, 0.0])
    np.testing.assert_allclose(uv, [25.0, 12.0])  # by hand: 60 * -1/5 + 37, 60 * -2/5 + 36
    assert z == pytest.approx(5.0)
    X = np.array([0.3, -0.4, 0.8])
    for i, (R, T, f, p, fmt) in enumerate(specs):
        ref_uv, ref_z = _p3d_project(X, R, T, f, p, (60, 80), fmt)
        uv, z = _project(sc, i, X)
        np.testing.assert_allclose(uv, ref_uv, atol=1e-9)
        assert z == pytest.approx(ref_z)
    d = sc.depth(0)
    assert (d[:10] == 0).all() and np.allclose(d[10:], 5.0)  # float16 2.5 x scale_adjustment 2; mask applied
    assert read_float16_png(cat / seq / "depths" / "frame000001.jpg.geometric.png")[0, 0] == 2.5
    # a sequence folder works too, and a missing depth file is named
    (cat / seq / "depths" / "frame000002.jpg.geometric.png").unlink()
    with pytest.raises(ConvertError, match="frame000002.jpg.geometric.png"):
        CONVERTERS["co3d"](cat / seq, tmp_path / "out2")
    assert not (tmp_path / "out2" / seq).exists()


# ---- ScanNet ------------------------------------------------------------------------------------
def _scannet_fixture(root):
    (root / "intrinsic").mkdir(parents=True)
    (root / "pose").mkdir()
    (root / "depth").mkdir()
    kd = np.eye(4)
    kd[:3, :3] = [[70, 0, 40], [0, 70, 30], [0, 0, 1]]
    kc = np.eye(4)
    kc[:3, :3] = [[150, 0, 80], [0, 150, 60], [0, 0, 1]]
    np.savetxt(root / "intrinsic" / "intrinsic_depth.txt", kd)
    np.savetxt(root / "intrinsic" / "intrinsic_color.txt", kc)
    for i in range(3):
        _img(root / "color" / f"{i}.jpg", 120, 160, i)
        write_png16(root / "depth" / f"{i}.png", np.full((60, 80), 2500, np.uint16))
        c2w = np.eye(4)
        c2w[:3, 3] = [1.0, 0, 0]
        if i == 1:
            c2w[:] = -np.inf  # a tracking failure, as ScanNet marks it
        np.savetxt(root / "pose" / f"{i}.txt", c2w)


def test_scannet_known_projection_and_skipped_pose(tmp_path):
    _scannet_fixture(tmp_path / "scene0000_00")
    out = CONVERTERS["scannet"](tmp_path / "scene0000_00", tmp_path / "scene")
    sc = load_scene(out)
    assert check_scene(out).ok and sc.num_frames == 2 and sc.meta["skipped_frames"] == [1]
    assert sc.image_names == ["000000.jpg", "000002.jpg"] and sc.image(0).shape == (60, 80, 3)
    np.testing.assert_allclose(sc.intrinsics[0], [[70, 0, 40], [0, 70, 30], [0, 0, 1]])
    uv, z = _project(sc, 1, [1.5, 0.3, 5.0])  # camera at x = 1: (0.5, 0.3, 5) in the camera
    np.testing.assert_allclose(uv, [47.0, 34.2])
    assert z == 5.0 and sc.depth(0)[0, 0] == pytest.approx(2.5)
    sc2 = load_scene(CONVERTERS["scannet"](tmp_path / "scene0000_00", tmp_path / "scene_c", intrinsics="color"))
    np.testing.assert_allclose(sc2.intrinsics[0], [[75, 0, 40], [0, 75, 30], [0, 0, 1]])  # colour K x 0.5


def test_scannet_errors_name_the_file(tmp_path):
    src = tmp_path / "scene0000_00"
    _scannet_fixture(src)
    (src / "depth" / "2.png").unlink()
    with pytest.raises(ConvertError, match=r"depth/2\.png"):
        CONVERTERS["scannet"](src, tmp_path / "scene")
    assert not (tmp_path / "scene").exists() and _no_leftovers(tmp_path)
    (src / "pose" / "0.txt").write_text("1 2 3\n")
    with pytest.raises(ConvertError, match=r"pose/0\.txt"):
        CONVERTERS["scannet"](src, tmp_path / "scene")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="color"):
        CONVERTERS["scannet"](tmp_path / "empty", tmp_path / "scene")
