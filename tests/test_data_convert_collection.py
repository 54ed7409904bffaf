"""The VGGT-collection converters on fixtures written in each dataset's real layout.

Each test writes two frames of a dataset from the shared cameras in convert_fixtures (in that
dataset's own pose / intrinsics / depth convention), converts, and checks that the converted scene
projects the known point where it was computed by hand, with depth = its z at that pixel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from convert_fixtures import X, c2w_cv, point_in_cam, save_rgb, uv_by_hand, write_h5
from PIL import Image

from gasp_vlm.data.convert import CONVERTERS, ConvertError
from gasp_vlm.data.convert.arkitscenes import axis_angle_to_matrix
from gasp_vlm.data.convert.common import read_pfm, write_pfm, write_png16
from gasp_vlm.data.convert.hypersim import hypersim_tonemap
from gasp_vlm.data.scene import load_scene
from gasp_vlm.data.scene_check import check_scene
from gasp_vlm.geometry.cameras import project_world

K_SMALL = np.array([[60.0, 0, 32.0], [0, 60.0, 24.0], [0, 0, 1]])  # a 64x48 camera


def _check_point(sc, i, K_expected, rtol=1e-9):
    uv, z = project_world(X, sc.intrinsics[i], sc.cam_from_worlds[i])
    uv_h, z_h = uv_by_hand(K_expected, i)
    np.testing.assert_allclose(uv, uv_h, rtol=rtol, atol=1e-6)
    assert float(z) == pytest.approx(z_h)
    col, row = int(uv_h[0]), int(uv_h[1])
    assert sc.depth(i)[row, col] == pytest.approx(z_h, rel=1e-3)  # float16 / mm storage in some formats


def _convert_checked(name, src, out, scene, K, **opts):
    """Convert, check the scene, and check the known point in both frames; returns the scene."""
    CONVERTERS[name](src, out, **opts)
    assert check_scene(out / scene).ok
    sc = load_scene(out / scene)
    for i in range(2):
        _check_point(sc, i, K)
    return sc


def _no_leftovers(parent):
    return not [p for p in parent.rglob(".*tmp-*")]


# ---- BlendedMVS ---------------------------------------------------------------------------------
def _mvsnet_cam(K, i):
    ext = np.linalg.inv(c2w_cv(i))
    rows = "\n".join(" ".join(f"{v:.12g}" for v in r) for r in ext)
    krows = "\n".join(" ".join(f"{v:.12g}" for v in r) for r in K)
    return f"extrinsic\n{rows}\n\nintrinsic\n{krows}\n\n425.0 2.5 192 905.0\n"


def write_blendedmvs_scene(root, pid="5a3ca9cb270f0f0017f8ad3b", frames=2):
    s = root / pid
    (s / "cams").mkdir(parents=True)
    (s / "rendered_depth_maps").mkdir()
    for i in range(frames):
        save_rgb(s / "blended_images" / f"{i:08d}.jpg", 48, 64, i)
        save_rgb(s / "blended_images" / f"{i:08d}_masked.jpg", 48, 64, i)
        (s / "cams" / f"{i:08d}_cam.txt").write_text(_mvsnet_cam(K_SMALL, i % 2))
        d = np.full((48, 64), point_in_cam(i % 2)[2], np.float32)
        d[:3] = 0.0  # no surface rendered there
        write_pfm(s / "rendered_depth_maps" / f"{i:08d}.pfm", d)
    (s / "cams" / "pair.txt").write_text(f"{frames}\n" + "".join(f"{i}\n0\n" for i in range(frames)))
    return s


def test_pfm_round_trip_orientation_and_byte_order(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_pfm(tmp_path / "a.pfm", a)
    raw = (tmp_path / "a.pfm").read_bytes()
    assert raw.startswith(b"Pf\n4 3\n-1.0\n")
    assert np.frombuffer(raw[12:], "<f4")[:4].tolist() == [8.0, 9.0, 10.0, 11.0]  # bottom row first
    np.testing.assert_array_equal(read_pfm(tmp_path / "a.pfm"), a)
    (tmp_path / "b.pfm").write_bytes(b"Pf\n4 3\n1.0\n" + a[::-1].astype(">f4").tobytes())  # big-endian
    np.testing.assert_array_equal(read_pfm(tmp_path / "b.pfm"), a)


def test_blendedmvs_known_projection(tmp_path):
    write_blendedmvs_scene(tmp_path / "BlendedMVS")
    sc = _convert_checked("blendedmvs", tmp_path / "BlendedMVS", tmp_path / "out", "5a3ca9cb270f0f0017f8ad3b", K_SMALL)
    assert sc.image_names == ["00000000.jpg", "00000001.jpg"]  # *_masked.jpg not taken as frames
    assert sc.depth(0)[0, 0] == 0.0


# ---- WildRGB-D ----------------------------------------------------------------------------------
def write_wildrgbd_scene(root, cat="apple", scene="scene_000"):
    s = root / cat / "scenes" / scene
    lines = []
    for i in range(2):
        save_rgb(s / "rgb" / f"{i:05d}.png", 48, 64, i)
        (s / "depth").mkdir(parents=True, exist_ok=True)
        write_png16(s / "depth" / f"{i:05d}.png", np.full((48, 64), round(point_in_cam(i)[2] * 1000), np.uint16))
        (s / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((48, 64), 255, np.uint8)).save(s / "masks" / f"{i:05d}.png")
        lines.append(" ".join([str(i)] + [f"{v:.12g}" for v in c2w_cv(i).ravel()]))
    (s / "cam_poses.txt").write_text("\n".join(lines) + "\n")
    (s / "metadata").write_text(json.dumps({"K": K_SMALL.T.ravel().tolist(), "w": 64, "h": 48}))  # column-major
    return s


def test_wildrgbd_known_projection(tmp_path):
    write_wildrgbd_scene(tmp_path / "wildrgbd")
    sc = _convert_checked("wildrgbd", tmp_path / "wildrgbd", tmp_path / "out", "apple__scene_000", K_SMALL)
    assert sc.meta["category"] == "apple"


# ---- ARKitScenes --------------------------------------------------------------------------------
def write_arkit_video(root, vid="41069025", layout="raw"):
    s = root / "raw" / "Training" / vid if layout == "raw" else root / "3dod" / "Training" / vid / f"{vid}_frames"
    for sub in ("lowres_wide", "lowres_depth", "lowres_wide_intrinsics", "confidence"):
        (s / sub).mkdir(parents=True, exist_ok=True)
    traj = []
    # pose i at ts 3050.9 + 0.1 i; the third image (t = 3052.5) has no pose within 0.1 s
    for i, t in enumerate((3050.908, 3051.008, 3052.5)):
        name = f"{vid}_{t:.3f}"
        save_rgb(s / "lowres_wide" / f"{name}.png", 48, 64, i)
        z = point_in_cam(min(i, 1))[2]
        write_png16(s / "lowres_depth" / f"{name}.png", np.full((48, 64), round(z * 1000), np.uint16))
        conf = np.full((48, 64), 2, np.uint8)
        conf[:4] = 0  # low confidence rows
        Image.fromarray(conf).save(s / "confidence" / f"{name}.png")
        (s / "lowres_wide_intrinsics" / f"{name}.pincam").write_text("64 48 60.0 60.0 32.0 24.0\n")
    for i in range(2):
        w2c = np.linalg.inv(c2w_cv(i))
        # camera 1's rotation is about y: its axis-angle is exactly (0, angle, 0)
        ang = np.arctan2(w2c[0, 2], w2c[0, 0])
        assert np.allclose(axis_angle_to_matrix([0, ang, 0]), w2c[:3, :3])
        traj.append(f"{3050.90801 + 0.1 * i:.8f} 0 {ang:.15g} 0 " + " ".join(f"{v:.15g}" for v in w2c[:3, 3]))
    (s / "lowres_wide.traj").write_text("\n".join(traj) + "\n")
    return s


@pytest.mark.parametrize("layout", ["raw", "3dod"])
def test_arkitscenes_known_projection_confidence_and_unposed_frame(tmp_path, layout):
    write_arkit_video(tmp_path / "ARKitScenes", layout=layout)
    sc = _convert_checked("arkitscenes", tmp_path / "ARKitScenes", tmp_path / "out", "41069025", K_SMALL)
    assert sc.num_frames == 2 and sc.meta["skipped_frames"] == ["41069025_3052.500.png"]
    assert (sc.depth(0)[:4] == 0).all() and (sc.depth(0)[4:] > 0).all()  # confidence 0 < min_confidence 1
    sc0 = load_scene(CONVERTERS["arkitscenes"](tmp_path / "ARKitScenes", tmp_path / "all", min_confidence=0)
                     / "41069025")
    assert (sc0.depth(0) > 0).all()


def test_axis_angle_is_rodrigues():
    r = np.array([0.3, -0.5, 0.8])
    R = axis_angle_to_matrix(r)
    assert np.allclose(R @ R.T, np.eye(3)) and np.isclose(np.linalg.det(R), 1.0)
    assert np.allclose(R @ (r / np.linalg.norm(r)), r / np.linalg.norm(r))  # the axis is fixed
    assert np.isclose(np.arccos((np.trace(R) - 1) / 2), np.linalg.norm(r))  # by the angle


# ---- Hypersim -----------------------------------------------------------------------------------
def write_hypersim_scene(root, scene="ai_001_001", cam="cam_00", m_per_unit=0.0254):
    s = root / scene
    fx = 32 / np.tan(np.radians(30))  # the default 60 deg horizontal field of view at W = 64
    K = np.array([[fx, 0, 32.0], [0, fx, 24.0], [0, 0, 1]])
    (s / "_detail").mkdir(parents=True)
    (s / "_detail" / "metadata_scene.csv").write_text(f"parameter_name,parameter_value\nmeters_per_asset_unit,"
                                                       f"{m_per_unit}\n")
    flip = np.diag([1.0, -1.0, -1.0])  # OpenCV camera axes -> Hypersim's (y up, z backwards)
    R = np.stack([c2w_cv(i)[:3, :3] @ flip for i in range(2)])
    pos = np.stack([c2w_cv(i)[:3, 3] / m_per_unit for i in range(2)])  # asset units
    write_h5(s / "_detail" / cam / "camera_keyframe_orientations.hdf5", "dataset", R)
    write_h5(s / "_detail" / cam / "camera_keyframe_positions.hdf5", "dataset", pos)
    u = (np.arange(64) + 0.5 - 32) / fx
    v = (np.arange(48) + 0.5 - 24) / fx
    ray = np.sqrt(u[None] ** 2 + v[:, None] ** 2 + 1)
    for i in range(2):
        dist = (point_in_cam(i)[2] * ray).astype(np.float16)  # a plane at the point's z, as ray distance
        dist[0, :5] = np.nan
        write_h5(s / "images" / f"scene_{cam}_geometry_hdf5" / f"frame.{i:04d}.depth_meters.hdf5", "dataset", dist)
        save_rgb(s / "images" / f"scene_{cam}_final_preview" / f"frame.{i:04d}.tonemap.jpg", 48, 64, i)
        hdr = np.random.default_rng(i).uniform(0, 3, (48, 64, 3)).astype(np.float16)
        write_h5(s / "images" / f"scene_{cam}_final_hdf5" / f"frame.{i:04d}.color.hdf5", "dataset", hdr)
    return s, K


@pytest.mark.parametrize("images", ["tonemap", "hdf5"])
def test_hypersim_distance_to_depth_and_gl_poses(tmp_path, images):
    _, K = write_hypersim_scene(tmp_path / "hypersim")
    CONVERTERS["hypersim"](tmp_path / "hypersim", tmp_path / "out", images=images)
    scene = tmp_path / "out" / "ai_001_001__cam_00"
    sc = load_scene(scene)
    assert check_scene(scene).ok and sc.meta["meters_per_asset_unit"] == 0.0254
    for i in range(2):
        _check_point(sc, i, K)
        d = sc.depth(i)
        assert d[0, :5].tolist() == [0.0] * 5  # NaN distance -> invalid
        np.testing.assert_allclose(d[1:], point_in_cam(i)[2], rtol=2e-3)  # a plane: z is constant (float16 input)


def test_hypersim_tonemap_sets_the_90th_percentile():
    rng = np.random.default_rng(0)
    hdr = rng.uniform(0, 5, (32, 32, 3))
    out = hypersim_tonemap(hdr).astype(float) / 255
    lin = out ** 2.2
    b = 0.3 * lin[..., 0] + 0.59 * lin[..., 1] + 0.11 * lin[..., 2]
    assert np.percentile(b, 90) == pytest.approx(0.8 ** 2.2, rel=0.05)


def test_hypersim_camera_params_csv(tmp_path):
    _, K = write_hypersim_scene(tmp_path / "hypersim")
    csv = tmp_path / "metadata_camera_parameters.csv"
    cols = [f"M_proj_{i}{j}" for i in range(4) for j in range(4)]
    M = np.zeros((4, 4))
    M[0, 0], M[1, 1] = 2 * K[0, 0] / 64, 2 * K[1, 1] / 48
    M[2, 2], M[2, 3], M[3, 2] = -1.0, -0.2, -1.0
    csv.write_text("scene_name," + ",".join(cols) + "\nai_001_001," + ",".join(f"{v:.12g}" for v in M.ravel()) + "\n")
    sc = load_scene(CONVERTERS["hypersim"](tmp_path / "hypersim", tmp_path / "out", camera_params=csv)
                    / "ai_001_001__cam_00")
    np.testing.assert_allclose(sc.intrinsics[0], K)
    M[0, 1] = 0.1  # tilt-shift term
    csv.write_text("scene_name," + ",".join(cols) + "\nai_001_001," + ",".join(f"{v:.12g}" for v in M.ravel()) + "\n")
    with pytest.raises(ConvertError, match="tilt-shift"):
        CONVERTERS["hypersim"](tmp_path / "hypersim", tmp_path / "out2", camera_params=csv)
    assert not (tmp_path / "out2" / "ai_001_001__cam_00").exists() and _no_leftovers(tmp_path)


# ---- MegaDepth ----------------------------------------------------------------------------------
def write_megadepth_scene(root, scene="0015", k="0", f=100.0, size=(128, 96), radial=0.02, dense_scale=0.5,
                          binary=True):
    """SfM model of the original photos (SIMPLE_RADIAL, written by pycolmap) + dense<k> undistorted imgs."""
    import pycolmap

    model = root / "MegaDepth_v1_SfM" / scene / "sparse" / "manhattan" / k
    model.mkdir(parents=True)
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", f, *size)
    cam.params = [f, size[0] / 2, size[1] / 2, radial]
    rec.add_camera_with_trivial_rig(cam)
    names = ["5008984_74a994ce1c_o.jpg", "99119670_397881f36f_o.jpg"]
    for i, n in enumerate(names):
        w2c = np.linalg.inv(c2w_cv(i))
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3])
        rec.add_image_with_trivial_frame(pycolmap.Image(name=n, keypoints=np.zeros((0, 2)), camera_id=1,
                                                        image_id=i + 1), pose)
    (rec.write_binary if binary else rec.write_text)(str(model))
    for p in model.glob("rigs.*"):  # MegaDepth's models predate rigs/frames: cameras, images, points3D only
        p.unlink()
    for p in model.glob("frames.*"):
        p.unlink()
    ud = pycolmap.undistort_camera(pycolmap.UndistortCameraOptions(), cam)
    hw = (round(ud.height * dense_scale), round(ud.width * dense_scale))
    dense = root / "MegaDepth_v1" / scene / f"dense{k}"
    for i, n in enumerate(names + ["1234_unregistered_o.jpg"]):
        save_rgb(dense / "imgs" / n, *hw, i)
        write_h5(dense / "depths" / (n[:-4] + ".h5"), "depth", np.full(hw, point_in_cam(min(i, 1))[2], np.float32))
    return hw, f * hw[1] / ud.width


def test_megadepth_undistorted_camera_at_the_dense_size(tmp_path):
    hw, f_dense = write_megadepth_scene(tmp_path / "MegaDepth")
    CONVERTERS["megadepth"](tmp_path / "MegaDepth", tmp_path / "out")
    scene = tmp_path / "out" / "0015_0"
    sc = load_scene(scene)
    assert check_scene(scene).ok and sc.num_frames == 2
    assert sc.meta["skipped_frames"] == ["1234_unregistered_o.jpg"]
    # COLMAP's undistorter keeps the focal length and centres the principal point; the dense images
    # are that camera scaled to their size.
    K = np.array([[f_dense, 0, hw[1] / 2], [0, f_dense, hw[0] / 2], [0, 0, 1]])
    for i in range(2):
        _check_point(sc, i, K, rtol=2e-3)  # the undistorted size is rounded to whole pixels


def test_megadepth_text_model_and_missing_model(tmp_path):
    write_megadepth_scene(tmp_path / "MegaDepth", binary=False)
    assert load_scene(CONVERTERS["megadepth"](tmp_path / "MegaDepth", tmp_path / "out") / "0015_0").num_frames == 2
    for p in (tmp_path / "MegaDepth" / "MegaDepth_v1_SfM" / "0015" / "sparse" / "manhattan" / "0").iterdir():
        p.unlink()
    with pytest.raises(ConvertError, match="0015.*no COLMAP model"):
        CONVERTERS["megadepth"](tmp_path / "MegaDepth", tmp_path / "out2")


# ---- ScanNet++ ----------------------------------------------------------------------------------
def write_scannetpp_iphone(root, scene_id="0a5c013435"):
    import pycolmap

    ip = root / "data" / scene_id / "iphone"
    (ip / "colmap").mkdir(parents=True)
    (ip / "depth").mkdir()
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_name(1, "PINHOLE", 120.0, 128, 96)
    cam.params = [120.0, 120.0, 64.0, 48.0]  # = K_SMALL at the 64x48 depth size
    rec.add_camera_with_trivial_rig(cam)
    for i in range(2):
        name = f"frame_{i * 10:06d}.jpg"
        w2c = np.linalg.inv(c2w_cv(i))
        rec.add_image_with_trivial_frame(pycolmap.Image(name=name, keypoints=np.zeros((0, 2)), camera_id=1,
                                                        image_id=i + 1),
                                         pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3]))
        save_rgb(ip / "rgb" / name, 96, 128, i)
        write_png16(ip / "depth" / f"frame_{i * 10:06d}.png",
                    np.full((48, 64), round(point_in_cam(i)[2] * 1000), np.uint16))
    rec.write_text(str(ip / "colmap"))
    return ip


def test_scannetpp_iphone_colour_resized_to_depth(tmp_path):
    write_scannetpp_iphone(tmp_path / "scannetpp")
    sc = _convert_checked("scannetpp", tmp_path / "scannetpp", tmp_path / "out", "0a5c013435", K_SMALL)
    assert sc.image(0).shape == (48, 64, 3) and sc.meta["source"] == "scannetpp-iphone"


def test_scannetpp_dslr_undistorted_transforms_with_rendered_depth(tmp_path):
    ds = tmp_path / "scannetpp" / "data" / "0a5c013435" / "dslr"
    (ds / "nerfstudio").mkdir(parents=True)
    (ds / "render_depth").mkdir()
    flip = np.diag([1.0, -1.0, -1.0, 1.0])  # nerfstudio: OpenGL camera axes
    frames = []
    for i in range(2):
        save_rgb(ds / "undistorted_images" / f"DSC{i:05d}.JPG", 48, 64, i)
        write_png16(ds / "render_depth" / f"DSC{i:05d}.png", np.full((48, 64), round(point_in_cam(i)[2] * 1000),
                                                                      np.uint16))
        frames.append({"file_path": f"DSC{i:05d}.JPG", "transform_matrix": (c2w_cv(i) @ flip).tolist()})
    meta = {"camera_model": "PINHOLE", "fl_x": 60.0, "fl_y": 60.0, "cx": 32.0, "cy": 24.0, "w": 64, "h": 48,
            "frames": frames[:1], "test_frames": frames[1:]}
    (ds / "nerfstudio" / "transforms_undistorted.json").write_text(json.dumps(meta))
    sc = load_scene(CONVERTERS["scannetpp"](tmp_path / "scannetpp", tmp_path / "out", stream="dslr")
                    / "0a5c013435")
    assert sc.num_frames == 2
    for i in range(2):
        _check_point(sc, i, K_SMALL)


def test_converters_refuse_options_that_do_not_apply(tmp_path):
    write_wildrgbd_scene(tmp_path / "w")
    with pytest.raises(ConvertError, match=r"\['stream'\] do not apply"):
        CONVERTERS["wildrgbd"](tmp_path / "w", tmp_path / "out", stream="dslr")
