"""Camera conventions of geometry/cameras.py: round trips and hand-checked projections."""

import numpy as np
import pytest

from gasp_vlm.geometry import cameras as C


def _K(f=500.0, cx=320.3, cy=240.7, fy=None):
    return np.array([[f, 0, cx], [0, fy or f, cy], [0, 0, 1.0]])


def test_round_trip_every_pixel_identity():
    rng = np.random.default_rng(0)
    h, w = 48, 64
    K = _K(57.3, 31.2, 24.9, fy=61.0)
    cfw = C.look_at(np.array([0.3, -0.2, -2.0]), np.array([0.1, 0.05, 1.0]))
    depth = rng.uniform(0.5, 20.0, (h, w))
    world = C.depth_to_world(depth, K, cfw)
    uv, z = C.project_world(world, K, cfw)
    assert np.abs(uv - C.pixel_centers(h, w)).max() < 1e-4
    np.testing.assert_allclose(z, depth, rtol=1e-10)


def test_pixel_centres_and_principal_point():
    pc = C.pixel_centers(2, 3)
    assert pc.shape == (2, 3, 2)
    np.testing.assert_array_equal(pc[1, 2], [2.5, 1.5])  # (u, v) of col 2, row 1
    # A point on the optical axis lands on the principal point; +x right, +y down.
    uv, z = C.project(np.array([[0.0, 0, 5], [1.0, 0, 5], [0, 1.0, 5]]), _K(100, 50, 40))
    np.testing.assert_allclose(uv, [[50, 40], [70, 40], [50, 60]])
    np.testing.assert_allclose(z, 5)


def test_invert_extrinsics_and_centre():
    cfw = C.look_at(np.array([1.0, 2.0, 3.0]), np.zeros(3))
    assert C.is_rotation(cfw[:, :3])
    np.testing.assert_allclose(C.camera_center(cfw), [1, 2, 3], atol=1e-12)
    both = C.to_homogeneous(cfw) @ C.to_homogeneous(C.invert_extrinsics(cfw))
    np.testing.assert_allclose(both, np.eye(4), atol=1e-12)
    # The target is straight ahead.
    uv, z = C.project_world(np.zeros(3), _K(100, 50, 40), cfw)
    np.testing.assert_allclose(uv, [50, 40], atol=1e-9)
    np.testing.assert_allclose(z, np.sqrt(14))


def test_look_at_up_is_image_up():
    cfw = C.look_at(np.zeros(3), np.array([0, 0, 1.0]), up=np.array([0, -1.0, 0]))
    np.testing.assert_allclose(cfw[:, :3], np.eye(3), atol=1e-12)


def test_opengl_c2w_to_opencv():
    # OpenGL camera at (1, 2, 3) with identity rotation looks down world -z, y up.
    c2w_gl = np.eye(4)
    c2w_gl[:3, 3] = [1, 2, 3]
    cfw = C.cam_from_world_from_c2w(C.opengl_to_opencv_c2w(c2w_gl))
    K = _K(100, 50, 40)
    pts = np.array([[1, 2, -2.0], [2, 2, -2.0], [1, 3, -2.0]])  # ahead, right of it, above it
    uv, z = C.project_world(pts, K, cfw)
    np.testing.assert_allclose(z, 5)
    np.testing.assert_allclose(uv, [[50, 40], [70, 40], [50, 20]])


def test_scale_intrinsics_exact_with_half_pixel_centres():
    K = _K(100, 50, 40)
    pts = np.array([[0.3, -0.2, 2.0], [-1.0, 0.7, 3.0]])
    uv, _ = C.project(pts, K)
    uv2, _ = C.project(pts, C.scale_intrinsics(K, 0.5, 0.25))
    np.testing.assert_allclose(uv2, uv * [0.5, 0.25])
    # The image centre stays the image centre: a 100x80 image with cx, cy at its centre halves to 50x40.
    np.testing.assert_allclose(C.scale_intrinsics(_K(100, 50, 40), 0.5, 0.5)[:2, 2], [25, 20])


def test_rotation_angle_and_is_rotation():
    a = C.look_at(np.zeros(3), np.array([0, 0, 1.0]))[:, :3]
    th = 0.3
    rz = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    assert C.rotation_angle(a, rz @ a) == pytest.approx(th)
    assert not C.is_rotation(2 * np.eye(3))
    assert not C.is_rotation(np.diag([1.0, 1, -1]))
