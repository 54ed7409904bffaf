"""`gasp diagnose` refusals before any work: --frames above a scene's distinct frames, --out on a file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gasp_vlm.cli import main
from gasp_vlm.data.sequences import GeometrySequenceSource
from gasp_vlm.data.synth import synth_dataset

torch.set_num_threads(1)
SIZE = 84  # 3 x 3 tokens per frame for the tiny Qwen preset


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """scene_0000 with 5 frames, scene_0001 with 3 frames (indices 0-4 and 5-7)."""
    base = tmp_path_factory.mktemp("diag")
    synth_dataset(base / "ds", 1, num_frames=5, size=SIZE, seed=3, progress=False)
    synth_dataset(base / "short", 2, num_frames=3, size=SIZE, seed=3, progress=False)
    shutil.move(str(base / "short" / "scene_0001"), str(base / "ds" / "scene_0001"))
    return base / "ds"


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    import gasp_vlm.models

    def boom(*a, **kw):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(gasp_vlm.models, "load_adapter", boom)


def _diagnose(*args: str):
    return CliRunner().invoke(main, ["diagnose", "--model", "tiny-qwen2.5-vl", "--no-progress", "--pictures", "0",
                                     "--layers", "0", *args])


def test_distinct_frames_at_scene_edges_and_middle(scenes):
    src = GeometrySequenceSource(scenes, frames_window=2)
    # scene_0000 (5 frames, radius 2): anchors 0..4 -> windows [0,2] [0,3] [0,4] [1,4] [2,4]
    assert [src.distinct_frames(i) for i in range(5)] == [3, 4, 5, 4, 3]
    # scene_0001 (3 frames): the whole scene is inside every window
    assert [src.distinct_frames(i) for i in range(5, 8)] == [3, 3, 3]
    assert GeometrySequenceSource(scenes).distinct_frames(2) == 5  # default radius 48: the scene bounds
    with pytest.raises(IndexError):
        src.distinct_frames(8)
    # the limit is exact: up to it the sample's frames are distinct, one more repeats a frame
    for i in range(8):
        n = src.distinct_frames(i)
        ids = src.frame_ids(i, n)[1]
        assert len(set(ids)) == n
        more = src.frame_ids(i, n + 1)[1]
        assert len(more) == n + 1 and len(set(more)) <= n


def test_frames_above_the_window_are_refused_before_loading_a_model(scenes, tmp_path, no_model):
    out = tmp_path / "o"
    r = _diagnose("--data", str(scenes), "--clip", "window", "--frames", "6", "--sequences", "1", "--out", str(out))
    assert r.exit_code == 1, r.output
    assert ("--frames 6: scene scene_0000 gives at most 5 distinct frames around anchor 0 (window \u00b148); "
            "use --frames <= 5") in r.output
    assert "Traceback" not in r.output and not out.exists()
    # the largest --frames that works is the minimum over the requested sequences; the scene named is the short one
    r = _diagnose("--data", str(scenes), "--clip", "window", "--frames", "4", "--sequences", "2", "--stride", "5",
                  "--out", str(out))
    assert r.exit_code == 1, r.output
    assert "scene scene_0001 gives at most 3 distinct frames around anchor 0" in r.output
    assert "1 of the 2 requested sequences" in r.output and "use --frames <= 3" in r.output
    assert not out.exists()
    # the default forward clips (the paper's): the scene's length over the gap stride is the bound
    r = _diagnose("--data", str(scenes), "--frames", "4", "--start", "5", "--sequences", "1", "--out", str(out))
    assert r.exit_code == 1, r.output
    assert "--frames 4: scene scene_0001 has only 3 frames; use --frames <= 3" in r.output
    assert not out.exists()


def test_frames_equal_to_the_limit_runs_with_distinct_frames(scenes, tmp_path):
    out = tmp_path / "o"
    r = _diagnose("--data", str(scenes), "--clip", "window", "--frames", "3", "--start", "5", "--sequences", "1",
                  "--out", str(out))
    assert r.exit_code == 0, r.output
    assert (out / "report.json").is_file()
    with np.load(out / "points.npz", allow_pickle=False) as z:
        assert list(z["scenes"]) == ["scene_0001"]
        assert sorted(z["frame_ids"][0].tolist()) == [0, 1, 2]
    assert json.loads((out / "report.json").read_text())["frames"] == 3


def test_out_on_an_existing_file_is_refused(scenes, tmp_path, no_model):
    f = tmp_path / "taken.txt"
    f.write_text("keep me")
    r = _diagnose("--data", str(scenes), "--frames", "3", "--sequences", "1", "--out", str(f))
    assert r.exit_code == 1, r.output
    assert f"--out {f}: is an existing file, not a folder" in r.output and "Traceback" not in r.output
    r = _diagnose("--data", str(scenes), "--frames", "3", "--sequences", "1", "--out", str(f / "sub"))
    assert r.exit_code == 1 and f"lies under {f}, an existing file" in r.output, r.output
    # --compare: the same refusal, before reading the reports
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("{}")
    b.write_text("{}")
    r = CliRunner().invoke(main, ["diagnose", "--compare", str(a), str(b), "--out", str(f)])
    assert r.exit_code == 1, r.output
    assert f"--out {f}: is an existing file" in r.output and "Traceback" not in r.output
    assert f.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json", "taken.txt"]
