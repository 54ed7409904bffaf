"""Canonical scene format (issue 3): round trip, atomic writing, and `check` catching each kind of breakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from gasp_vlm.data.scene import FORMAT, Scene, SceneError, SceneWriter, list_scene_dirs, load_scene, write_scene
from gasp_vlm.data.scene_check import check_dataset, check_scene, format_summary
from gasp_vlm.data.synth import render_scene

N, H, W = 3, 24, 32


@pytest.fixture(scope="module")
def rendered() -> dict:
    return render_scene(5, num_frames=N, size=(H, W))


@pytest.fixture(scope="module")
def good_scene(tmp_path_factory, rendered) -> Path:
    r = rendered
    return write_scene(tmp_path_factory.mktemp("good") / "room", r["images"], r["depths"], r["K"], r["cam_from_world"],
                       objects=r["objects"], source="synth", depth_units="m", extra={"note": "x"})


@pytest.fixture
def scene_copy(tmp_path, good_scene) -> Path:
    dst = tmp_path / "ds" / "broken_scene"
    shutil.copytree(good_scene, dst)
    return dst


def test_round_trip(good_scene, rendered):
    sc = load_scene(good_scene)
    assert sc.num_frames == N and sc.name == "room" and sc.image_names == [f"{i:06d}.png" for i in range(N)]
    assert sc.meta["format"] == FORMAT and sc.meta["source"] == "synth" and sc.meta["note"] == "x"
    assert np.array_equal(sc.intrinsics, rendered["K"]) and np.array_equal(sc.cam_from_worlds, rendered["cam_from_world"])
    for i in range(N):
        assert np.array_equal(sc.image(i), rendered["images"][i])  # png is lossless
        assert np.array_equal(sc.depth(i), rendered["depths"][i]) and sc.depth(i).dtype == np.float32
        o = sc.objects(i)
        assert o.dtype == np.int16 and np.array_equal(o, rendered["objects"][i])
    assert sc.has_objects and sc.image_hw() == (H, W)
    s = check_scene(good_scene)
    assert s.ok, s.problems
    assert s.frames == N and s.resolutions == {(H, W)}
    assert s.valid_depth_fraction == pytest.approx(float((rendered["depths"] > 0).mean()))
    assert s.depth_range[0] > 0 and s.depth_range[1] == pytest.approx(float(rendered["depths"].max()))


def _drop(rel: str) -> Callable[[Path], None]:
    return lambda p: (p / rel).unlink()


def _edit_npy(rel: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def go(p: Path) -> None:
        np.save(p / rel, fn(np.load(p / rel)))
    return go


def _set(a: np.ndarray, idx, value) -> np.ndarray:
    a = a.copy()
    a[idx] = value
    return a


def _write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda p: (p / rel).write_text(text)


def _meta(**changes) -> Callable[[Path], None]:
    def go(p: Path) -> None:
        m = json.loads((p / "scene.json").read_text())
        for k, v in changes.items():
            if v is None:
                m.pop(k)
            else:
                m[k] = v
        (p / "scene.json").write_text(json.dumps(m))
    return go


def _scale_rotation(p: Path) -> None:
    e = np.load(p / "cam_from_worlds.npy")
    e[1, :, :3] *= 1.5
    np.save(p / "cam_from_worlds.npy", e)


def _mirror_rotation(p: Path) -> None:  # orthonormal but det -1: not a rotation either
    e = np.load(p / "cam_from_worlds.npy")
    e[2, 0, :3] *= -1
    np.save(p / "cam_from_worlds.npy", e)


def _truncate(rel: str, keep: float) -> Callable[[Path], None]:
    def go(p: Path) -> None:
        data = (p / rel).read_bytes()
        (p / rel).write_bytes(data[:int(len(data) * keep)])
    return go


def _resize_image(p: Path) -> None:
    Image.new("RGB", (W + 2, H)).save(p / "images" / "000001.png")


BREAKAGES = {
    # name: (mutation, file named in the message, words of the problem)
    "missing depth": (_drop("depths/000001.npy"), "depths/000001.npy", "missing file"),
    "missing image": (_drop("images/000002.png"), "images/000002.png", "missing file"),
    "missing intrinsics": (_drop("intrinsics.npy"), "intrinsics.npy", "missing file"),
    "missing poses": (_drop("cam_from_worlds.npy"), "cam_from_worlds.npy", "missing file"),
    "missing scene.json": (_drop("scene.json"), "scene.json", "missing file"),
    "missing image_names": (_drop("image_names.json"), "image_names.json", "missing file"),
    "missing object map": (_drop("objects/000000.npy"), "objects/000000.npy", "missing file"),
    "depth shape vs image": (_edit_npy("depths/000000.npy", lambda d: d[:, :-1]), "depths/000000.npy",
                             "shape mismatch"),
    "image shape vs depth": (_resize_image, "depths/000001.npy", "shape mismatch"),
    "depth not 2-D": (_edit_npy("depths/000000.npy", lambda d: d[..., None]), "depths/000000.npy", "(H, W)"),
    "depth float64": (_edit_npy("depths/000000.npy", lambda d: d.astype(np.float64)), "depths/000000.npy", "float32"),
    "objects shape": (_edit_npy("objects/000002.npy", lambda o: o[1:]), "objects/000002.npy", "shape mismatch"),
    "objects dtype": (_edit_npy("objects/000002.npy", lambda o: o.astype(np.float32)), "objects/000002.npy", "int16"),
    "NaN depth": (_edit_npy("depths/000001.npy", lambda d: _set(d, (3, 4), np.nan)), "depths/000001.npy", "NaN/inf"),
    "inf depth": (_edit_npy("depths/000002.npy", lambda d: _set(d, (0, 0), np.inf)), "depths/000002.npy", "NaN/inf"),
    "negative depth": (_edit_npy("depths/000000.npy", lambda d: _set(d, (5, 5), -1.0)), "depths/000000.npy",
                       "negative"),
    "all depth invalid": (lambda p: [np.save(f, np.zeros((H, W), np.float32)) for f in (p / "depths").glob("*.npy")],
                          "depths/", "no valid depth"),
    "scaled rotation": (_scale_rotation, "cam_from_worlds.npy", "frame 1 (000001.png): rotation part is not a rotation"),
    "mirrored rotation": (_mirror_rotation, "cam_from_worlds.npy", "frame 2 (000002.png): rotation part is not"),
    "NaN pose": (_edit_npy("cam_from_worlds.npy", lambda e: _set(e, (0, 0, 3), np.nan)), "cam_from_worlds.npy",
                 "non-finite"),
    "too few intrinsics": (_edit_npy("intrinsics.npy", lambda k: k[:-1]), "intrinsics.npy", "wrong frame count"),
    "too many poses": (_edit_npy("cam_from_worlds.npy", lambda e: np.concatenate([e, e[:1]])), "cam_from_worlds.npy",
                       "wrong frame count"),
    "poses 4x4": (_edit_npy("cam_from_worlds.npy", lambda e: np.concatenate([e, np.tile([[[0, 0, 0, 1.0]]], (N, 1, 1))],
                                                                             1)),
                  "cam_from_worlds.npy", "expected (3, 3, 4)"),
    "skewed K": (_edit_npy("intrinsics.npy", lambda k: _set(k, (0, 0, 1), 3.0)), "intrinsics.npy", "zero skew"),
    "negative focal": (_edit_npy("intrinsics.npy", lambda k: _set(k, (1, 1, 1), -5.0)), "intrinsics.npy", "fx, fy > 0"),
    "npy is text": (_write("intrinsics.npy", "hello"), "intrinsics.npy", "unreadable .npy: not a .npy file"),
    "more image names than frames": (lambda p: (p / "image_names.json").write_text(
        json.dumps([f"{i:06d}.png" for i in range(N + 1)])), "intrinsics.npy", "wrong frame count"),
    "image_names not a list": (_write("image_names.json", '{"a": 1}'), "image_names.json", "non-empty list"),
    "image_names empty": (_write("image_names.json", "[]"), "image_names.json", "non-empty list"),
    "image_names duplicate": (_write("image_names.json", '["000000.png", "000000.png", "000001.png"]'),
                              "image_names.json", "duplicate"),
    "image name with a path": (_write("image_names.json", '["../000000.png", "000001.png", "000002.png"]'),
                               "image_names.json", "plain file names"),
    "scene.json not JSON": (_write("scene.json", "{format: gasp"), "scene.json", "not valid JSON"),
    "scene.json wrong format": (_meta(format="gasp-scene/0"), "scene.json", "must be 'gasp-scene/1'"),
    "scene.json no depth_units": (_meta(depth_units=None), "scene.json", "missing keys ['depth_units']"),
    "scene.json a list": (_write("scene.json", "[1, 2]"), "scene.json", "JSON object"),
    "image unreadable": (_write("images/000000.png", "not a png"), "images/000000.png", "unreadable image"),
    # the header (and so the size) still reads: only a full decode finds these
    "image truncated": (_truncate("images/000001.png", 0.5), "images/000001.png", "unreadable image"),
    "image cut after its header": (_truncate("images/000002.png", 0.1), "images/000002.png", "unreadable image"),
    "depth truncated": (_truncate("depths/000001.npy", 0.7), "depths/000001.npy", "truncated"),
}
SCENE_LEVEL_ONLY = {"all depth invalid"}  # a dataset statistic, not a malformed file


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_check_catches_each_breakage(scene_copy, kind):
    mutate, file, words = BREAKAGES[kind]
    assert check_scene(scene_copy).ok  # the copy is good before the mutation
    mutate(scene_copy)
    s = check_scene(scene_copy)
    assert not s.ok
    hits = [m for m in s.problems if m.startswith("scene broken_scene: ") and f": {file}: " in m + ": " and words in m]
    assert hits, f"{kind}: no message naming the scene, {file} and {words!r} in {s.problems}"


def _read_everything(path: Path) -> None:
    sc = load_scene(path)
    for i in range(sc.num_frames):
        sc.image(i), sc.depth(i), sc.objects(i)


@pytest.mark.parametrize("kind", [k for k in BREAKAGES if k not in SCENE_LEVEL_ONLY])
def test_the_loader_refuses_what_check_reports(scene_copy, kind):
    """What tracks, diagnose and training read through (Scene) fails on every breakage `data check`
    reports, naming the scene folder and the file (not a frame's position in a clip)."""
    mutate, file, words = BREAKAGES[kind]
    _read_everything(scene_copy)
    mutate(scene_copy)
    with pytest.raises(SceneError) as err:
        _read_everything(scene_copy)
    msg = str(err.value)
    assert f"broken_scene/{file}: " in msg and words in msg, msg


def test_the_image_size_is_checked_against_depth_on_load(scene_copy):
    _resize_image(scene_copy)
    sc = load_scene(scene_copy)
    sc.depth(0)  # frame 0 is fine
    with pytest.raises(SceneError, match=r"broken_scene/depths/000001.npy: shape mismatch: depth \(24, 32\) vs image \(24, 34\)"):
        sc.depth(1)


def test_check_dataset_and_summary(tmp_path, good_scene):
    for name in ("a_ok", "b_broken", "c_ok"):
        shutil.copytree(good_scene, tmp_path / name)
    np.save(tmp_path / "b_broken" / "depths" / "000001.npy", np.full((H, W), np.nan, np.float32))
    (tmp_path / ".a_ok.tmp-1234").mkdir()  # an interrupted write is not a scene
    assert [p.name for p in list_scene_dirs(tmp_path)] == ["a_ok", "b_broken", "c_ok"]
    sums = check_dataset(tmp_path)
    assert [s.ok for s in sums] == [True, False, True]
    text = format_summary(sums)
    assert "scenes: 3 (2 ok, 1 broken)" in text and f"frames: {2 * N}" in text and f"{W}x{H}" in text
    assert "scene b_broken: depths/000001.npy:" in text and "BROKEN" in text
    assert list_scene_dirs(good_scene) == [good_scene]  # a single scene is a dataset of one
    with pytest.raises(SceneError, match="no scene folders"):
        check_dataset(tmp_path / "a_ok" / "images")


def test_writer_is_atomic(tmp_path, rendered):
    r = rendered
    out = tmp_path / "scene"
    with pytest.raises(RuntimeError):
        with SceneWriter(out, source="t", depth_units="m") as w:
            w.add_frame("a.png", r["images"][0], r["depths"][0], r["K"][0], r["cam_from_world"][0])
            raise RuntimeError("crash while converting")
    assert list(tmp_path.iterdir()) == []  # neither the scene nor a temporary folder
    bad_depth = r["depths"][:2].copy()
    bad_depth[1, 0, 0] = np.nan
    with pytest.raises(SceneError, match="NaN"):
        write_scene(out, r["images"][:2], bad_depth, r["K"], r["cam_from_world"])
    with pytest.raises(SceneError, match="does not match"):
        write_scene(out, r["images"][:2, :, 1:], r["depths"][:2], r["K"], r["cam_from_world"])
    assert list(tmp_path.iterdir()) == []
    write_scene(out, r["images"][:2], r["depths"][:2], r["K"], r["cam_from_world"])
    with pytest.raises(SceneError, match="already exists"):
        write_scene(out, r["images"][:1], r["depths"][:1], r["K"], r["cam_from_world"])
    assert load_scene(out).num_frames == 2
    write_scene(out, r["images"][:1], r["depths"][:1], r["K"], r["cam_from_world"], overwrite=True)
    assert load_scene(out).num_frames == 1 and not (out / "objects").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]
    with pytest.raises(SceneError, match="duplicate"):
        write_scene(tmp_path / "dup", r["images"][:2], r["depths"][:2], r["K"], r["cam_from_world"],
                    names=["x.png", "x.png"])
    with pytest.raises(SceneError, match="plain file names"):
        write_scene(tmp_path / "sub", r["images"][:1], r["depths"][:1], r["K"], r["cam_from_world"], names=["a/x.png"])
    with pytest.raises(SceneError, match="uint8"):
        write_scene(tmp_path / "flt", r["images"][:1] / 255.0, r["depths"][:1], r["K"], r["cam_from_world"])
    with pytest.raises(SceneError, match="must end in"):
        write_scene(tmp_path / "ext", r["images"][:1], r["depths"][:1], r["K"], r["cam_from_world"], names=["x.tif"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene"]


def test_writer_copies_image_files_and_jpg(tmp_path, rendered):
    r = rendered
    src = tmp_path / "src.jpg"
    Image.fromarray(r["images"][0]).save(src, quality=90)
    with SceneWriter(tmp_path / "s", source="t", depth_units="mm") as w:
        w.add_frame("f0.jpg", src, r["depths"][0], r["K"][0], r["cam_from_world"][0])
        w.add_frame("f1.jpg", r["images"][1], r["depths"][1], r["K"][1], r["cam_from_world"][1])
    sc = Scene(tmp_path / "s")
    assert (tmp_path / "s" / "images" / "f0.jpg").read_bytes() == src.read_bytes()
    assert sc.image(1).shape == (H, W, 3) and sc.objects(0) is None and not sc.has_objects
    assert check_scene(tmp_path / "s").ok


def test_scene_class_rejects_malformed_scenes(scene_copy):
    _meta(format="other")(scene_copy)
    with pytest.raises(SceneError, match="scene.json: 'format' is 'other'"):
        Scene(scene_copy)
    _meta(format=FORMAT)(scene_copy)
    _edit_npy("intrinsics.npy", lambda k: k[:-1])(scene_copy)
    with pytest.raises(SceneError, match=r"intrinsics.npy: wrong frame count: shape \(2, 3, 3\), expected \(3, 3, 3\)"):
        Scene(scene_copy)
    with pytest.raises(SceneError, match="not a scene directory"):
        Scene(scene_copy / "nope")


@pytest.mark.parametrize("fmt,rtol,ext", [("float16", 1e-3, ".npy"), ("png16", 0, ".png"), ("png16:250", 0, ".png")])
def test_compact_depth_formats_round_trip_and_check(tmp_path, fmt, rtol, ext):
    from gasp_vlm.data.scene_check import check_scene

    rng = np.random.default_rng(0)
    d = np.round(rng.uniform(0.5, 9.0, (12, 16)) * 1000) / 1000  # mm steps: png16 at 1000 is exact
    d[0, :4] = 0.0
    if fmt == "png16:250":
        d = np.round(d * 250) / 250
    img = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    K = np.array([[10.0, 0, 8], [0, 10.0, 6], [0, 0, 1]])
    out = write_scene(tmp_path / fmt.replace(":", "_"), [img], [d.astype(np.float32)], K[None],
                      np.eye(4)[None, :3], depth_format=fmt)
    sc = load_scene(out)
    assert sc.depth_path(0).suffix == ext and sc.depth_path(0).is_file() and check_scene(out).ok
    got = sc.depth(0)
    assert got.dtype == np.float32 and (got[0, :4] == 0).all()
    np.testing.assert_allclose(got, d, rtol=rtol, atol=1e-6 if rtol == 0 else 0)
    full = write_scene(tmp_path / "f32", [img], [d.astype(np.float32)], K[None], np.eye(4)[None, :3])
    assert sc.depth_path(0).stat().st_size < load_scene(full).depth_path(0).stat().st_size


def test_compact_depth_refusals(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    K = np.array([[10.0, 0, 2], [0, 10.0, 2], [0, 0, 1]])
    with pytest.raises(SceneError, match="exceeds the png16 range"):
        write_scene(tmp_path / "a", [img], [np.full((4, 4), 70.0, np.float32)], K[None], np.eye(4)[None, :3],
                    depth_format="png16")
    assert not (tmp_path / "a").exists()
    with pytest.raises(SceneError, match="use float32, float16 or png16"):
        write_scene(tmp_path / "b", [img], [np.ones((4, 4), np.float32)], K[None], np.eye(4)[None, :3],
                    depth_format="jpeg")
    out = write_scene(tmp_path / "c", [img], [np.ones((4, 4), np.float32)], K[None], np.eye(4)[None, :3],
                      depth_format="float16")
    meta = json.loads((out / "scene.json").read_text())
    meta["depth_format"] = "exr"
    (out / "scene.json").write_text(json.dumps(meta))
    with pytest.raises(SceneError, match="depth_format"):
        load_scene(out)
