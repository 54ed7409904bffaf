"""Every command that loads a scene runs the one validation `data check` runs (data/scene.py readers):
broken depth, cameras or sizes stop `data tracks` and `diagnose` with a message naming the scene
folder and the file, and leave no result behind (issue 17)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gasp_vlm.cli import main
from gasp_vlm.data.synth import synth_dataset

SIZE = 56


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("val") / "ds"
    synth_dataset(root, 1, num_frames=4, size=SIZE, seed=3, progress=False)
    return root


def _depth(value: float) -> Callable[[Path], None]:
    def go(scene: Path) -> None:
        d = np.load(scene / "depths" / "000002.npy")
        d[5, 7] = value
        np.save(scene / "depths" / "000002.npy", d)
    return go


def _shear_pose(scene: Path) -> None:
    e = np.load(scene / "cam_from_worlds.npy")
    e[2, 0, 1] += 0.3  # no longer orthonormal
    np.save(scene / "cam_from_worlds.npy", e)


def _resize_image(scene: Path) -> None:
    Image.new("RGB", (SIZE - 14, SIZE)).save(scene / "images" / "000002.png")


# name: (mutation, file the message must name, words)
CASES = {
    "NaN depth": (_depth(np.nan), "depths/000002.npy", "NaN/inf depth"),
    "inf depth": (_depth(np.inf), "depths/000002.npy", "NaN/inf depth"),
    "negative depth": (_depth(-2.0), "depths/000002.npy", "negative depth"),
    "non-rotation camera": (_shear_pose, "cam_from_worlds.npy", "not a rotation"),
    # depth and object map both disagree with the image now: either may be named first
    "depth/image size mismatch": (_resize_image, ("depths/000002.npy", "objects/000002.npy"), "shape mismatch"),
}


@pytest.fixture(params=list(CASES))
def broken(request, good, tmp_path) -> tuple[Path, str, str]:
    mutate, file, words = CASES[request.param]
    root = tmp_path / "ds"
    shutil.copytree(good, root)
    mutate(root / "scene_0000")
    return root, file, words


def _assert_names_the_file(output: str, file: str | tuple[str, ...], words: str) -> None:
    files = (file,) if isinstance(file, str) else file
    assert any(f"scene_0000/{f}: " in output for f in files) and words in output, output
    assert "Traceback" not in output and "frame 2 of" not in output


def test_data_check_reports_each_case(broken):
    root, file, words = broken
    r = CliRunner().invoke(main, ["data", "check", str(root)])
    files = (file,) if isinstance(file, str) else file
    assert r.exit_code == 1 and words in r.output, r.output
    assert all(f"scene scene_0000: {f}: " in r.output for f in files), r.output


def test_data_tracks_refuses_each_case(broken, tmp_path):
    root, file, words = broken
    out = tmp_path / "t.npz"
    r = CliRunner().invoke(main, ["data", "tracks", str(root / "scene_0000"), "--anchor", "0", "--targets", "all",
                                  "--out", str(out)])
    assert r.exit_code == 1
    _assert_names_the_file(r.output, file, words)
    assert not out.exists()


def test_diagnose_refuses_each_case(broken, tmp_path):
    root, file, words = broken
    out = tmp_path / "diag"
    r = CliRunner().invoke(main, ["diagnose", "-m", "tiny-qwen2.5-vl", "--data", str(root), "--frames", "4",
                                  "--sequences", "1", "--layers", "0", "--no-progress", "--pictures", "0",
                                  "-o", str(out)])
    assert r.exit_code == 1
    _assert_names_the_file(r.output, file, words)
    assert not (out / "report.json").exists()


def test_data_check_decodes_images_fully(good, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(good, root)
    png = root / "scene_0000" / "images" / "000001.png"
    png.write_bytes(png.read_bytes()[:120])  # the header (size) still reads
    with Image.open(png) as im:
        assert im.size == (SIZE, SIZE)
    r = CliRunner().invoke(main, ["data", "check", str(root)])
    assert r.exit_code == 1 and "scene scene_0000: images/000001.png: unreadable image" in r.output, r.output
