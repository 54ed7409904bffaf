"""The GT correspondence rule of geometry/tracks.py on hand-made cases."""

import numpy as np
import pytest

from gasp_vlm.geometry.cameras import pixel_centers
from gasp_vlm.geometry.tracks import (Tracks, build_tracks, grid_points, sample_depth_nearest, scene_tracks,
                                      visible_in_frames, visible_mask)


def test_grid_points_centres():
    q = grid_points(30, 45, 14)
    # columns 7, 21, 35 (49 > 45 dropped); rows 7, 21 (35 > 30 dropped); row-major
    np.testing.assert_array_equal(q, [[7, 7], [21, 7], [35, 7], [7, 21], [21, 21], [35, 21]])
    assert grid_points(518, 518, 14).shape == (37 * 37, 2)
    with pytest.raises(ValueError):
        grid_points(10, 10, 0)


def test_sample_depth_nearest_containing_pixel():
    d = np.arange(12, dtype=np.float32).reshape(3, 4)
    uv = np.array([[0.0, 0.0], [1.99, 0.5], [2.0, 1.0], [3.999, 2.999], [4.0, 1.0], [-0.01, 1.0], [np.nan, 1]])
    np.testing.assert_array_equal(sample_depth_nearest(d, uv), [0, 1, 6, 11, 0, 0, 0])


def _hand_depth():
    d = np.full((4, 4), 10.0)
    d[3, 3] = 5.0  # right depth, but outside the 4-neighbourhood of (1.7, 2.2)
    return d


@pytest.mark.parametrize("d22, visible", [(5.2, True), (5.0 * 1.04, True), (5.0 * 1.06, False), (0.0, False)])
def test_visibility_rule_four_surrounding_pixels(d22, visible):
    # (u, v) = (1.7, 2.2): columns floor(1.2) = 1, 2; rows floor(1.7) = 1, 2.
    d = _hand_depth()
    d[2, 2] = d22
    z = 5.0
    assert visible_mask(np.array([1.7, 2.2]), np.array(z), d) == visible
    # the same pixel at another neighbour slot still counts
    d2 = _hand_depth()
    d2[1, 1] = d22
    assert visible_mask(np.array([1.7, 2.2]), np.array(z), d2) == visible


def test_visibility_tolerance_is_relative_to_map_depth():
    d = np.full((2, 2), 100.0)
    uv = np.array([[1.0, 1.0]] * 4)
    z = np.array([95.0, 105.0, 94.9, 105.1])
    np.testing.assert_array_equal(visible_mask(uv, z, d), [True, True, False, False])


def test_visibility_borders_and_behind_camera():
    d = np.full((4, 4), 0.0)
    d[0, 0] = 2.0
    uv = np.array([[0.2, 0.3], [0.0, 0.0], [1.4, 1.4], [1.6, 0.5], [-1e-9, 0.5], [4.0, 0.5], [0.5, 4.0], [0.5, 0.5],
                   [np.nan, 0.5], [1e30, 0.5]])
    z = np.array([2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, -2.0, 2.0, 2.0])
    # (0.2, 0.3): clipped neighbourhood is pixel (0, 0) only -> visible; (1.4, 1.4): cols/rows 0, 1 -> visible;
    # (1.6, 0.5): cols 1, 2 -> pixel (0, 0) not among them -> invisible; outside / behind / NaN -> invisible.
    np.testing.assert_array_equal(visible_mask(uv, z, d), [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])


def test_visible_in_frames_list_and_stack_agree():
    rng = np.random.default_rng(1)
    depths = rng.uniform(1, 2, (3, 6, 7)) * (rng.random((3, 6, 7)) > 0.2)
    uv = rng.uniform(-1, 8, (3, 50, 2))
    z = rng.uniform(-0.5, 2.2, (3, 50))
    a = visible_in_frames(uv, z, depths)
    b = visible_in_frames(uv, z, list(depths))
    c = np.stack([visible_mask(uv[t], z[t], depths[t]) for t in range(3)])
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    assert c.any() and not c.all()
    # maps of different sizes
    maps = [depths[0], depths[1][:4, :5]]
    m = visible_in_frames(uv[:2], z[:2], maps)
    np.testing.assert_array_equal(m[1], visible_mask(uv[1], z[1], maps[1]))


# ---- an analytic scene with an occluder ---------------------------------------------------------
F, CX, CY, H, W = 20.0, 16.0, 12.0, 24, 32
K = np.array([[F, 0, CX], [0, F, CY], [0, 0, 1.0]])
WALL_Z = 10.0
OCC = dict(z=6.0, x=(-1.0, 1.0), y=(-1.5, 1.5))  # a fronto-parallel square in front of the wall


def _camera(cx: float) -> np.ndarray:
    """Camera at (cx, 0, 0), identity rotation."""
    return np.array([[1, 0, 0, -cx], [0, 1, 0, 0], [0, 0, 1, 0.0]])


def _render(cam_x: float) -> np.ndarray:
    """Exact z-depth of wall + occluder for a camera at (cam_x, 0, 0) looking down +z."""
    pc = pixel_centers(H, W)
    rx, ry = (pc[..., 0] - CX) / F, (pc[..., 1] - CY) / F
    d = np.full((H, W), WALL_Z)
    x, y = cam_x + rx * OCC["z"], ry * OCC["z"]
    hit = (x >= OCC["x"][0]) & (x <= OCC["x"][1]) & (y >= OCC["y"][0]) & (y <= OCC["y"][1])
    d[hit] = OCC["z"]
    return d


def test_tracks_through_an_occluder_match_analytic_visibility():
    cams = [-2.0, 0.0, 2.5, 40.0]  # anchor at index 1; the last camera sees nothing of the anchor's view
    depths = [_render(c) for c in cams]
    tr = build_tracks(depths[1], K, _camera(0.0), depths, np.stack([K] * 4), np.stack([_camera(c) for c in cams]),
                      frames=[0, 1, 2, 3], stride=2)
    assert tr.query_uv.shape == (12 * 16, 2) and tr.uv.shape == (4, 12 * 16, 2)
    # hand answer: un-project with the anchor's depth, project by x-translation
    q = tr.query_uv.astype(np.float64)
    qd = depths[1][np.floor(q[:, 1]).astype(int), np.floor(q[:, 0]).astype(int)]
    X, Y = (q[:, 0] - CX) / F * qd, (q[:, 1] - CY) / F * qd
    for t, c in enumerate(cams):
        u = F * (X - c) / qd + CX
        np.testing.assert_allclose(tr.uv[t], np.stack([u, q[:, 1]], -1), atol=1e-4)
        np.testing.assert_allclose(tr.depth[t], qd, rtol=1e-6)
        # analytic visibility: inside the image and the segment camera -> point misses the occluder
        s = OCC["z"] / qd
        xo, yo = c + (X - c) * s, Y * s
        blocked = (qd > OCC["z"] + 1e-9) & (xo >= OCC["x"][0]) & (xo <= OCC["x"][1]) \
            & (yo >= OCC["y"][0]) & (yo <= OCC["y"][1])
        expect = (u >= 0) & (u < W) & ~blocked
        # the 4-pixel rule may differ within one pixel of an occlusion edge in the target image
        d_t = depths[t]
        ui = np.clip(np.floor(u).astype(int), 0, W - 1)
        vi = np.floor(q[:, 1]).astype(int)
        near_edge = np.zeros_like(expect)
        for du in (-1, 0, 1):
            for dv in (-1, 0, 1):
                nb = d_t[np.clip(vi + dv, 0, H - 1), np.clip(ui + du, 0, W - 1)]
                near_edge |= nb != d_t[vi, ui]
        sure = ~near_edge | ~((u >= 0) & (u < W))
        np.testing.assert_array_equal(tr.visible[t][sure], expect[sure])
        if t == 1:
            assert tr.visible[t].all()  # every query is visible in its own frame
    assert tr.visible[0].sum() < tr.visible[1].sum() and not tr.visible[3].any()
    # occluded wall points exist in frame 2 and are found
    assert ((~tr.visible[2]) & (tr.uv[2][:, 0] >= 0) & (tr.uv[2][:, 0] < W)).any()


def test_dropped_queries_and_npz_round_trip(tmp_path):
    d = np.full((8, 8), 3.0)
    d[:4, :4] = 0.0  # queries at (1, 1), (3, 1), (1, 3), (3, 3) have no depth
    tr = build_tracks(d, K, _camera(0), [d], K[None], _camera(0)[None], frames=[5], stride=2)
    assert len(tr.query_uv) == 16 - 4
    assert not ((tr.query_uv < 4).all(1)).any()
    p = tmp_path / "t.npz"
    tr.save_npz(p)
    with np.load(p) as f:
        assert set(f.files) == {"query_uv", "frames", "uv", "visible", "depth"}
        assert f["query_uv"].dtype == np.float32 and f["uv"].dtype == np.float32 and f["depth"].dtype == np.float32
        assert f["visible"].dtype == bool and f["frames"].dtype.kind == "i"
        assert f["uv"].shape == (1, 12, 2) and f["visible"].shape == (1, 12) and f["frames"].tolist() == [5]
    back = Tracks.load_npz(p)
    np.testing.assert_array_equal(back.uv, tr.uv)


def test_scene_tracks_reads_a_written_scene(tmp_path):
    from gasp_vlm.data.scene import load_scene, write_scene

    cams = [0.0, 2.5]
    depths = [_render(c).astype(np.float32) for c in cams]
    imgs = [np.zeros((H, W, 3), np.uint8)] * 2
    write_scene(tmp_path / "s", imgs, depths, np.stack([K] * 2), np.stack([_camera(c) for c in cams]))
    sc = load_scene(tmp_path / "s")
    tr = scene_tracks(sc, 0, [1], stride=4)
    ref = build_tracks(depths[0], K, _camera(0), depths[1:], K[None], _camera(2.5)[None], [1], 4)
    np.testing.assert_array_equal(tr.visible, ref.visible)
    with pytest.raises(IndexError, match="out of range"):
        scene_tracks(sc, 0, [2], stride=4)


def test_every_pixel_round_trips_through_correspond():
    """Un-project every pixel centre with its depth and project it into its own (rotated) camera."""
    from gasp_vlm.geometry.cameras import look_at

    rng = np.random.default_rng(2)
    k = np.array([[31.0, 0, 17.3], [0, 29.0, 11.9], [0, 0, 1]])
    cam = look_at(np.array([0.4, -0.3, -1.0]), np.array([0.0, 0.1, 2.0]))
    depth = rng.uniform(0.3, 30.0, (H, W))
    q = pixel_centers(H, W).reshape(-1, 2)
    from gasp_vlm.geometry.tracks import correspond

    c = correspond(q, depth, k, cam, [depth], k[None], cam[None])
    assert np.abs(c.uv[0] - q).max() < 1e-4
    np.testing.assert_allclose(c.z[0], depth.ravel(), rtol=1e-9)
    assert c.visible.all()
