"""data/scene_tasks.py: every task's answer follows from the scene (recomputed here independently),
the set is written in the LLaVA layout the trainer reads, and nothing half-written is left on failure."""

import json

import numpy as np
import pytest

from gasp_vlm.data import scene_tasks as T
from gasp_vlm.data.scene import load_scene
from gasp_vlm.data.synth import synth_dataset
from gasp_vlm.geometry.cameras import camera_center


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rooms")
    synth_dataset(root, 2, num_frames=10, size=112, seed=5, camouflage_fraction=0.5, progress=False)
    return root


def _solids_seen(scene, f):
    obj = scene.objects(f)
    kinds = {o["id"]: o["kind"] for o in scene.meta["objects"]}
    ids, counts = np.unique(obj, return_counts=True)
    return {int(i) for i, c in zip(ids, counts) if kinds.get(int(i)) in T.SHAPES and c >= 0.02 * obj.size}


def test_normalize_answer_is_the_exact_match_rule():
    assert T.normalize_answer("The rocket box.") == "rocket box"
    assert T.normalize_answer("  Left!\nbecause ...") == "left"
    assert T.normalize_answer("3") == "3"
    assert T.normalize_answer("") == ""
    assert T.normalize_answer("a sphere") == "sphere"
    assert T.normalize_answer("another box") == "another box"  # only a whole leading article goes


def test_answers_follow_from_the_scene(rooms):
    sc = load_scene(sorted(rooms.iterdir())[0])
    rng = np.random.default_rng(0)
    for f in range(sc.num_frames):
        seen = _solids_seen(sc, f)
        assert T.task_count(sc, f, rng) == ("How many objects are in the image?", str(len(seen)))
        q, a = T.task_presence(sc, f, rng)
        shape = q.split("a ")[-1].split(" in")[0]
        kinds = {o["id"]: o["kind"] for o in sc.meta["objects"]}
        assert a == ("yes" if any(kinds[i] == shape for i in seen) else "no")
    ids = [0, 3, 6, 9]
    union = set().union(*(_solids_seen(sc, f) for f in ids))
    assert T.task_count_views(sc, ids, rng)[1] == str(len(union))
    # camera motion: the sign of the displacement along the first camera's x axis; reversed clip flips it
    fw, bw = T.task_motion(sc, ids, rng), T.task_motion(sc, ids[::-1], rng)
    d = sc.cam_from_worlds[0][:, :3] @ (camera_center(sc.cam_from_worlds[9]) - camera_center(sc.cam_from_worlds[0]))
    assert fw[1] == ("right" if d[0] > 0 else "left")
    assert {fw[1], bw[1]} == {"left", "right"}
    # same surface: the object id under the centre pixel of the first and the last frame
    first, last = sc.objects(ids[0]), sc.objects(ids[-1])
    same = first[56, 56] == last[56, 56]
    assert T.task_same_surface(sc, ids, rng)[1] == ("yes" if same else "no")


def test_shared_texture_is_the_one_texture_both_rooms_show(rooms):
    a, b = (load_scene(d) for d in sorted(rooms.iterdir()))

    def textures(sc, f):  # recomputed from the object map: surfaces covering >= 5 % of the frame
        obj = sc.objects(f)
        tex = {o["id"]: o["texture"] for o in sc.meta["objects"]}
        return {tex[i] for i in tex if (obj == i).mean() >= 0.05}

    seen = {"one": 0, "none": 0, "several": 0}
    for fa in range(a.num_frames):
        for fb in range(b.num_frames):
            shared = textures(a, fa) & textures(b, fb)
            qa = T.task_shared_texture(a, fa, b, fb, np.random.default_rng(0))
            if len(shared) > 1:
                assert qa is None  # ill-posed: redrawn
                seen["several"] += 1
            else:
                assert qa == ("Which texture appears in both images?", shared.pop() if shared else "none")
                seen["one" if qa[1] != "none" else "none"] += 1
    assert seen["one"]
    # rooms without a common texture: "none"
    b.meta = {**b.meta, "objects": [{**o, "texture": f"other_{o['texture']}"} for o in b.meta["objects"]]}
    assert T.task_shared_texture(a, 0, b, 0, np.random.default_rng(0))[1] == "none"


def test_closer_names_the_object_with_the_smaller_median_depth(rooms):
    for d in sorted(rooms.iterdir()):
        sc = load_scene(d)
        names = T.object_names(sc)
        rng = np.random.default_rng(1)
        for start in range(sc.num_frames):
            qa = T.task_closer(sc, [start], rng)
            if qa is None:
                continue
            q, a, choices = qa
            a_name, b_name = q.split("the ")[-2].removesuffix(" or "), q.split("the ")[-1].removesuffix("?")
            assert choices == [a_name, b_name]
            by_name = {v: k for k, v in names.items()}
            depth, obj = sc.depth(start), sc.objects(start)
            med = {n: np.median(depth[(obj == by_name[n]) & (depth > 0)]) for n in (a_name, b_name)}
            assert a == min(med, key=med.get)
            return
    pytest.fail("no closer question could be asked in the fixture rooms")


def test_task_set_is_read_by_the_trainers_instruction_loader(rooms, tmp_path):
    from gasp_vlm.train.instructions.dataset import InstructionSet as InstructionDataset
    from gasp_vlm.train.instructions.video import uniform_indices

    counts = {"count": 3, "presence": 3, "motion": 3, "same_surface": 2, "shared_texture": 3}
    path = T.make_task_set(rooms, tmp_path / "qa", counts, num_frames=3, clip_stride=3, seed=0)
    recs = T.load_task_set(path)
    assert sorted(r["task"] for r in recs) == sorted(t for t, n in counts.items() for _ in range(n))
    ds = InstructionDataset(path)
    for i, rec in enumerate(recs):
        s = ds.sample(i, num_frames=3)
        assert s["answer"] == rec["answer"] and "<" not in s["prompt"]
        want = 1 if rec["task"] in T.FRAME_TASKS else 2 if rec["task"] in T.PAIR_TASKS else 3
        assert len(rec["frames"]) == want and len(s["frames"]) == (1 if want == 1 else 3)  # 2 frames: one twice
        # spatial records carry their closed answer set (the answer among them); general ones none
        assert (rec["answer"] in rec["choices"]) if rec["task"] in T.CLIP_TASKS else ("choices" not in rec)
        # the frames on disk are the frames named in the record: a pair task's from two different rooms
        names = rec["scene"].split("+") if rec["task"] in T.PAIR_TASKS else [rec["scene"]] * want
        assert len(set(names)) == (2 if rec["task"] in T.PAIR_TASKS else 1)
        for j, k in enumerate(uniform_indices(want, len(s["frames"]))):
            np.testing.assert_array_equal(s["frames"][j], load_scene(rooms / names[k]).image(rec["frames"][k]))
    # a task's draws do not depend on which other tasks the set holds
    alone = T.load_task_set(T.make_task_set(rooms, tmp_path / "qa1", {"motion": 3}, num_frames=3, clip_stride=3,
                                            seed=0))
    assert [r["id"] for r in alone] == sorted(r["id"] for r in recs if r["task"] == "motion")
    # deterministic in the seed
    again = T.make_task_set(rooms, tmp_path / "qa2", counts, num_frames=3, clip_stride=3, seed=0)
    strip = lambda p: [{k: v for k, v in r.items()} for r in json.loads(p.read_text())]  # noqa: E731
    assert strip(again) == strip(path)


def test_bad_requests_leave_nothing_behind(rooms, tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        T.make_task_set(rooms, tmp_path / "qa", {"depth_guess": 2})
    with pytest.raises(T.SceneError, match="fewer frames"):
        T.make_task_set(rooms, tmp_path / "qa", {"motion": 2}, num_frames=6, clip_stride=3)
    import shutil

    one = tmp_path / "one"
    shutil.copytree(sorted(rooms.iterdir())[0], one / "room")
    with pytest.raises(T.SceneError, match="needs two scenes"):
        T.make_task_set(one, tmp_path / "qa", {"shared_texture": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    with pytest.raises(T.SceneError, match="not a task set"):
        T.load_task_set(tmp_path / "x.json")
