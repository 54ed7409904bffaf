"""Shared geometry for the converter fixtures: two cameras looking at one known world point.

Every fixture writes its dataset's real layout from these numbers in the dataset's own convention;
the tests then check that the converted scene projects ``X`` where it is computed here by hand and
that depth at that pixel is the point's z.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

X = np.array([0.3, -0.2, 4.0])  # the known world point (metres)


def roty(deg: float) -> np.ndarray:
    t = np.radians(deg)
    return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])


def c2w_cv(i: int) -> np.ndarray:
    """OpenCV camera-to-world of fixture camera i: 0 at the origin; 1 moved right and turned 10 deg."""
    m = np.eye(4)
    if i == 1:
        m[:3, :3] = roty(-10.0)
        m[:3, 3] = [0.5, 0.1, 0.2]
    return m


def point_in_cam(i: int, x: np.ndarray = X) -> np.ndarray:
    w2c = np.linalg.inv(c2w_cv(i))
    return w2c[:3, :3] @ x + w2c[:3, 3]


def uv_by_hand(K: np.ndarray, i: int, x: np.ndarray = X) -> tuple[np.ndarray, float]:
    p = point_in_cam(i, x)
    return np.array([K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]]), float(p[2])


def save_rgb(path, h: int, w: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


def write_h5(path, key: str, arr: np.ndarray) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=arr)
