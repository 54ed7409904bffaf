"""Sequence sampling (data/sequences.py): the paper's window, determinism, source protocol, Dataset."""

import numpy as np
import pytest
import torch

from gasp_vlm.data.scene import write_scene
from gasp_vlm.data.sequences import GeometrySequenceDataset, GeometrySequenceSource, SequenceCollator, window_frames
from gasp_vlm.data.targets import TokenTargets

torch.set_num_threads(1)
H, W, Z, F = 56, 84, 4.0, 56.0


def _scene(path, n: int, step_tokens: float = 0.25, objects: bool = False) -> None:
    """A textured wall at z = Z; frame i's camera sits at x = i * step (a pure sideways pan)."""
    rng = np.random.default_rng(n)
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])
    step = step_tokens * 28 * Z / F
    cams = np.stack([np.array([[1, 0, 0, -i * step], [0, 1, 0, 0], [0, 0, 1, 0.0]]) for i in range(n)])
    imgs = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(n)]
    depths = [np.full((H, W), Z, np.float32) for _ in range(n)]
    objs = [np.zeros((H, W), np.int16) for _ in range(n)] if objects else None
    write_scene(path, imgs, depths, np.stack([K] * n), cams, objects=objs, source="test")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    _scene(root / "a_long", 120)
    _scene(root / "b_short", 5, objects=True)
    return root


def test_window_frames_rule():
    rng = np.random.default_rng(0)
    ids = window_frames(200, 100, 24, 48, rng)
    assert len(set(ids.tolist())) == 24 and 100 not in ids and (np.abs(ids - 100) <= 48).all()
    # near the start the window is clipped to the scene
    ids = window_frames(200, 3, 24, 48, np.random.default_rng(1))
    assert ids.min() >= 0 and ids.max() <= 51
    # prefix-stable in the count; same seed, same frames
    a = window_frames(200, 100, 8, 48, np.random.default_rng(5))
    b = window_frames(200, 100, 24, 48, np.random.default_rng(5))
    assert a.tolist() == b[:8].tolist()
    # too few frames: with replacement, still inside the scene and never the anchor
    ids = window_frames(4, 1, 10, 48, np.random.default_rng(0))
    assert len(ids) == 10 and set(ids.tolist()) <= {0, 2, 3}
    assert window_frames(1, 0, 3, 48, np.random.default_rng(0)).tolist() == [0, 0, 0]
    # the whole window is reachable: uniform without replacement over 96 candidates
    seen = set()
    for s in range(60):
        seen |= set(window_frames(200, 100, 24, 48, np.random.default_rng(s)).tolist())
    assert seen == set(range(52, 149)) - {100}


def test_index_space_and_determinism(dataset_dir):
    src = GeometrySequenceSource(dataset_dir, frames_window=48, grid="coarse", seed=3)
    assert len(src) == 125 and src.locate(0) == (0, 0) and src.locate(119) == (0, 119) and src.locate(120) == (1, 0)
    strided = GeometrySequenceSource(dataset_dir, anchor_stride=10)
    assert len(strided) == 12 + 1 and strided.locate(12) == (1, 0) and strided.locate(3) == (0, 30)
    it = src.sample(60, 9)
    assert it["kind"] == "geo" and it["scene"] == "a_long" and len(it["frames"]) == 9
    ids = it["frame_ids"]
    assert ids == sorted(ids) and ids[it["anchor"]] == 60 and len(set(ids)) == 9
    assert all(abs(i - 60) <= 48 for i in ids)
    assert it["frames"][0].dtype == np.uint8 and it["frames"][0].shape == (H, W, 3)
    assert it["depths"][0].dtype == np.float32 and it["K"].shape == (9, 3, 3) and it["cam_from_world"].shape == (9, 3, 4)
    assert it["objects"] is None and it["meta"]["source"] == "test"
    assert "seed=3" in src.describe() and "a_long" in src.describe()
    np.random.seed(123)  # the global RNG plays no part
    again = GeometrySequenceSource(dataset_dir, seed=3).sample(60, 9)
    assert again["frame_ids"] == ids and all((a == b).all() for a, b in zip(again["frames"], it["frames"]))
    other = GeometrySequenceSource(dataset_dir, seed=4).sample(60, 9)
    assert other["frame_ids"] != ids
    first = GeometrySequenceSource(dataset_dir, seed=3, anchor_first=True).sample(60, 9)
    assert first["anchor"] == 0 and first["frame_ids"][0] == 60 and sorted(first["frame_ids"]) == ids
    short = src.sample(121, 6)  # 5-frame scene: repeats, objects loaded
    assert short["scene"] == "b_short" and short["frame_ids"][short["anchor"]] == 1 and len(short["frames"]) == 6
    assert short["objects"] is not None and short["objects"][0].shape == (H, W)
    with pytest.raises(IndexError):
        src.sample(125, 9)


def test_forward_clips_start_at_the_anchor_with_growing_gaps(dataset_dir):
    """The paper's diagnostic clip: anchor first, then anchor + s, + 2s, ...; near the scene's end the clip
    starts earlier (ending on the last frame); a scene too short for s apart takes the largest step that fits."""
    src = GeometrySequenceSource(dataset_dir, seed=3, forward_stride=3)
    assert src.frame_ids(10, 5) == (0, [10, 13, 16, 19, 22], 0)
    assert src.frame_ids(118, 5) == (0, [107, 110, 113, 116, 119], 0)  # ends on frame 119
    it = src.sample(10, 5)
    assert it["anchor"] == 0 and it["frame_ids"] == [10, 13, 16, 19, 22]
    # b_short has 5 frames: 3 frames 3 apart do not fit, 2 apart do; 5 frames need a step of 1
    assert src.frame_ids(120, 3) == (1, [0, 2, 4], 0) and src.frame_ids(120, 5) == (1, [0, 1, 2, 3, 4], 0)
    assert src.distinct_frames(120) == 5 and src.distinct_frames(3) == 120
    assert "forward_stride=3" in src.describe()
    with pytest.raises(ValueError, match="forward_stride"):
        GeometrySequenceSource(dataset_dir, forward_stride=0)


def test_targets_and_dataset_feed_the_losses(dataset_dir):
    from torch import nn

    from gasp_vlm.method.losses import gasp_losses
    from gasp_vlm.models import load_adapter

    src = GeometrySequenceSource(dataset_dir, seed=0, frames_window=4)
    ds = GeometrySequenceDataset(src, num_frames=(3, 5), seed=7)
    assert len(ds) == len(src)
    assert [ds.num_frames(i) for i in range(6)] == [ds.num_frames(i) for i in range(6)]
    assert all(3 <= ds.num_frames(i) <= 5 for i in range(20))
    adapter = load_adapter("tiny-qwen2.5-vl")
    collate = SequenceCollator(adapter, src, prompt="Describe the scene.")
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, [10, 50]), batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    prepared, targets = batch["prepared"], batch["targets"]
    assert len(targets) == 2 and all(isinstance(t, TokenTargets) for t in targets)
    for lay, t, it in zip(prepared.layouts, targets, batch["items"]):
        assert lay.num_frames == len(it["frames"]) and t.token_depth.shape == (lay.num_visual,)
        assert t.anchor_frame == it["anchor"] and t.target_tokens.shape == (lay.tokens_per_slot, lay.num_slots - 1)
        # pan of a quarter token per frame within +-4 frames: most anchor tokens have a match
        assert t.valid.float().mean() > 0.5 and t.token_depth_valid.all()
        np.testing.assert_allclose(t.target_depth[t.valid].numpy(), Z, rtol=1e-5)
    # fine grid through the same source
    fine = GeometrySequenceSource(dataset_dir, seed=0, frames_window=4, grid="fine", fine_per_token=2)
    tf = fine.targets(prepared.layouts[0], batch["items"][0])
    assert tf.query_uv.shape[0] == 4 * prepared.layouts[0].tokens_per_slot
    # the targets drive the GASP losses to finite values with pairs
    d = 16
    feats = [[torch.randn(lay.num_visual, d) for lay in prepared.layouts]]
    out = gasp_losses(feats, [nn.Linear(d, 8)], targets, [lay.tokens_per_slot for lay in prepared.layouts],
                      checkpoint=False)
    assert out.n_pairs > 0 and out.n_depth_pairs > 0 and torch.isfinite(out.loss)


def test_bad_arguments(dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="grid"):
        GeometrySequenceSource(dataset_dir, grid="dense")
    with pytest.raises(ValueError):
        GeometrySequenceSource(dataset_dir).sample(0, 0)
    from gasp_vlm.data.scene import SceneError

    (tmp_path / "empty").mkdir()
    with pytest.raises(SceneError):
        GeometrySequenceSource(tmp_path / "empty")


def _ids(items):
    return [(it["scene"], tuple(it["frame_ids"])) for it in items]


def test_dataloader_workers_give_the_same_items(dataset_dir):
    src = GeometrySequenceSource(dataset_dir, seed=5)
    ds = GeometrySequenceDataset(src, num_frames=(2, 4), seed=1)
    sub = torch.utils.data.Subset(ds, [3, 40, 77, 122])
    direct = _ids([ds[i] for i in [3, 40, 77, 122]])
    loader = torch.utils.data.DataLoader(sub, batch_size=2, num_workers=2, collate_fn=_ids)
    assert [x for b in loader for x in b] == direct


def test_frames_of_different_sizes_are_resized_to_the_anchor_with_exact_intrinsics(tmp_path):
    """A scene whose frames differ in size passes `data check` and samples at one size: the other
    frames are resized to the anchor's, with K scaled so a world point lands where it projects."""
    from gasp_vlm.data.scene_check import check_scene, format_summary
    from gasp_vlm.data.sequences import GeometrySequenceSource
    from gasp_vlm.data.synth import render_scene
    from gasp_vlm.geometry.cameras import cam_to_world, project_world, unproject
    from gasp_vlm.models import load_adapter

    big, small = render_scene(4, num_frames=4, size=(48, 64)), render_scene(4, num_frames=4, size=(24, 32))
    mix = lambda key: [big[key][0], big[key][1], small[key][2], small[key][3]]  # noqa: E731
    write_scene(tmp_path / "ds" / "mixed", mix("images"), mix("depths"), np.stack(mix("K")),
                big["cam_from_world"], objects=mix("objects"))
    summary = check_scene(tmp_path / "ds" / "mixed")
    assert summary.ok and summary.resolutions == {(48, 64), (24, 32)}
    assert "frames of several sizes in 1 scene(s) (mixed)" in format_summary([summary])
    src = GeometrySequenceSource(tmp_path / "ds", anchor_first=True)
    item = src.sample(0, 4)  # anchor frame 0 (48 x 64)
    assert item["frame_ids"][0] == 0 and sorted(item["frame_ids"]) == [0, 1, 2, 3]
    assert {f.shape for f in item["frames"]} == {(48, 64, 3)} and {d.shape for d in item["depths"]} == {(48, 64)}
    assert {o.shape for o in item["objects"]} == {(48, 64)}
    j = item["frame_ids"].index(2)
    np.testing.assert_allclose(item["K"][j], big["K"][2])  # scaled K of the small frame == the big render's K
    # a surface point seen by the anchor projects into the resized frame where it projects at full size
    q = np.array([[20.5, 30.5], [40.5, 10.5]])
    d = big["depths"][0][q[:, 1].astype(int), q[:, 0].astype(int)].astype(np.float64)
    pts = cam_to_world(unproject(q, d, big["K"][0]), big["cam_from_world"][0])
    uv_small, _ = project_world(pts, small["K"][2], small["cam_from_world"][2])
    uv_resized, _ = project_world(pts, item["K"][j], item["cam_from_world"][j])
    np.testing.assert_allclose(uv_resized, uv_small * 2, atol=1e-9)
    # nearest-neighbour depth: each 2 x 2 block of the resized map is one small-frame pixel
    np.testing.assert_array_equal(item["depths"][j][::2, ::2], small["depths"][2])
    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 1})
    prepared = ad.prepare_frames([item["frames"]], prompt="Describe.")  # one size: the model takes it
    assert src.targets(prepared.layouts[0], item).target_tokens.shape[1] == 3


def test_sparse_depth_scenes_snap_queries_to_their_points(tmp_path):
    """SfM-like depth (only where shared 3D points are observed) gives matches only with snapping."""
    from gasp_vlm.models import load_adapter

    rng = np.random.default_rng(0)
    n = 6
    K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1.0]])
    step = 0.25 * 28 * Z / F
    cams = np.stack([np.array([[1, 0, 0, -i * step], [0, 1, 0, 0], [0, 0, 1, 0.0]]) for i in range(n)])
    # 3D points on the wall at z = Z; each frame's depth holds them where they project (as SfM points do)
    pts = np.stack([rng.uniform(-2, 4, 300), rng.uniform(-1.5, 1.5, 300), np.full(300, Z)], 1)
    depths = []
    for c in cams:
        d = np.zeros((H, W), np.float32)
        uv = (pts + c[:, 3]) @ K.T
        col, row = (uv[:, 0] / uv[:, 2]).astype(int), (uv[:, 1] / uv[:, 2]).astype(int)
        ok = (col >= 0) & (col < W) & (row >= 0) & (row < H)
        d[row[ok], col[ok]] = Z
        depths.append(d)
    imgs = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(n)]
    write_scene(tmp_path / "ds" / "sparse", imgs, depths, np.stack([K] * n), cams, source="test",
                extra={"depth_source": "sparse"})
    assert np.mean([(d > 0).mean() for d in depths]) < 0.06
    adapter = load_adapter("tiny-qwen2.5-vl")
    res = {}
    for mode in ("auto", "off"):
        src = GeometrySequenceSource(tmp_path / "ds", seed=0, frames_window=3, snap_queries=mode)
        item = src.sample(2, 4)
        lay = adapter.prepare_frames([item["frames"]], prompt=None).layouts[0]
        res[mode] = src.targets(lay, item)
    snapped, plain = res["auto"], res["off"]
    assert snapped.valid.sum() > 3 * max(int(plain.valid.sum()), 1)
    np.testing.assert_allclose(snapped.target_depth[snapped.valid].numpy(), Z, rtol=1e-5)
    # moved queries stay inside their own token and sit on a point
    q = snapped.query_uv.numpy().astype(np.float64)
    tok, inside = lay.pixel_to_token(q)
    anchor_slot_tok = snapped.anchor_tokens.numpy() - lay.slot_of_frame(snapped.anchor_frame) * lay.tokens_per_slot
    assert inside.all() and (tok == anchor_slot_tok).all()
    # sparse scenes pool token depth over any point they hold
    assert snapped.token_depth_valid.float().mean() > 5 * max(plain.token_depth_valid.float().mean(), 0.01)
