"""Generated instruction set: answers follow the scene geometry; the output reads as an InstructionSet."""

import json

import numpy as np
import pytest

from gasp_vlm.data.scene import write_scene
from gasp_vlm.data.scene_qa import make_scene_qa
from gasp_vlm.train.instructions import InstructionSet


def _scene(path, dx: float, dz: float, near: float):
    """4 frames, camera translating by (dx, 0, dz) per frame (world = first camera), two named objects."""
    h = w = 32
    K = np.array([[30.0, 0, 16], [0, 30.0, 16], [0, 0, 1]])
    poses = []
    for i in range(4):
        c = np.array([dx * i, 0.0, dz * i])  # camera centre in world
        poses.append(np.concatenate([np.eye(3), -c[:, None]], 1))  # cam_from_world = [I | -c]
    depth = np.full((h, w), 5.0, np.float32)
    depth[:8, :8] = near
    objects = np.full((h, w), 7, np.int16)
    objects[:16, :16] = 6
    objects[:8, :8] = 6
    depth[:16, :16] = np.minimum(depth[:16, :16], 2.0)
    rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    meta = {"objects": [{"id": 6, "name": "red_box"}, {"id": 7, "name": "blue_sphere"}]}
    return write_scene(path, [rgb] * 4, [depth] * 4, [K] * 4, poses, objects=[objects] * 4, source="test",
                       depth_units="m", extra=meta)


@pytest.mark.parametrize("dx,dz,words", [(0.3, 0.0, "right"), (-0.3, 0.0, "left"), (0.0, 0.4, "forward"),
                                          (0.0, -0.4, "backward"), (0.0, 0.0, "barely")])
def test_answers_follow_geometry(tmp_path, dx, dz, words):
    _scene(tmp_path / "scenes" / "s0", dx, dz, near=1.23)
    js = make_scene_qa(tmp_path / "scenes", tmp_path / "qa", num_samples=2, num_frames=4, seed=0)
    recs = json.loads(js.read_text())
    assert len(recs) == 6 and all(len(r["conversations"]) == 2 for r in recs)  # 2 clips x 3 questions
    assert [r["video"] for r in recs[:3]] == [recs[0]["video"]] * 3 and recs[3]["video"] != recs[0]["video"]
    assert words in recs[0]["conversations"][1]["value"]
    assert recs[1]["conversations"][1]["value"] == "About 1.2 meters."
    # object 6 (red box, depth <= 2 m) is closer than object 7 (blue sphere, 5 m)
    q, a = recs[2]["conversations"]
    assert q["value"].startswith("<video>\nWhich is closer") and a["value"] == "The red box."
    ds = InstructionSet(js)
    assert len(ds) == 6
    s = ds.sample(0, 4)
    assert s["answer"] == recs[0]["conversations"][1]["value"] and len(s["frames"]) == 4
    assert s["frames"][0].shape == (32, 32, 3)
    assert s["turns"] == [("user", "Which way does the camera move?"), ("assistant", s["answer"])]


def test_atomic_and_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no scene"):
        make_scene_qa(tmp_path / "empty", tmp_path / "qa")
    assert not (tmp_path / "qa").exists()
    _scene(tmp_path / "scenes" / "s0", 0.3, 0.0, 1.0)
    with pytest.raises(ValueError, match="fewer than"):
        make_scene_qa(tmp_path / "scenes", tmp_path / "qa", num_frames=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "scenes"]  # no partial output
