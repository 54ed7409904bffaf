"""Per-token targets (data/targets.py) for every tiny preset on an analytic scene with known answers.

Scene: a fronto-parallel wall at z = Z seen by cameras that only translate along x. A camera at x = c
sees the anchor's pixel u at u - F * c / Z, so c = s * P * Z / F shifts the image by exactly s tokens
(P = token size in original pixels): anchor token (r, col) lands in token (r, col - s).
"""

import numpy as np
import pytest
import torch

from gasp_vlm.data.targets import TokenTargets, build_token_targets, pooled_token_depth, query_points
from gasp_vlm.models import load_adapter

torch.set_num_threads(1)
Z, F = 4.0, 56.0
_ADAPTERS: dict = {}


def _layout(preset: str, mode: str | None, hw: tuple[int, int], n: int):
    key = (preset, mode)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = load_adapter(preset, frame_mode=mode)
    frames = [np.zeros(hw + (3,), np.uint8) for _ in range(n)]
    return _ADAPTERS[key].prepare_frames([frames], prompt=None).layouts[0]


def _cams(shifts, token_px_orig, h, w):
    K = np.array([[F, 0, w / 2], [0, F, h / 2], [0, 0, 1.0]])
    cams = []
    for s in shifts:
        c = s * token_px_orig * Z / F
        cams.append(np.array([[1, 0, 0, -c], [0, 1, 0, 0], [0, 0, 1, 0.0]]))
    return np.stack([K] * len(shifts)), np.stack(cams)


def _box(layout, tok):
    x0, y0, x1, y1 = layout.token_boxes_orig()[tok]
    return slice(int(round(y0)), int(round(y1))), slice(int(round(x0)), int(round(x1)))


def _expected(layout, shift, anchor_ok, blocked=()):
    """(S,) expected target token within the slot (-1 invalid) for a whole-token shift."""
    hm, wm = layout.grid_hw
    out = np.full(hm * wm, -1)
    for r in range(hm):
        for c in range(wm):
            m = r * wm + c
            if anchor_ok[m] and 0 <= c - shift < wm and m not in blocked:
                out[m] = r * wm + (c - shift)
    return out


CASES = [("tiny-qwen2.5-vl", None, (56, 84)), ("tiny-qwen2-vl", None, (56, 84)),
         ("tiny-llava-next-video", None, (112, 140)), ("tiny-qwen2.5-vl", "images", (56, 84))]


@pytest.mark.parametrize("preset, mode, hw", CASES)
def test_one_frame_per_slot_known_answers(preset, mode, hw):
    h, w = hw
    lay = _layout(preset, mode, hw, 3)
    assert lay.one_frame_per_slot
    p_orig = lay.token_px / lay.transform.scale[0]
    Ks, cams = _cams([0, 1, -1], p_orig, h, w)
    s, (hm, wm) = lay.tokens_per_slot, lay.grid_hw
    hole_tok, occ_tok, sparse_tok = 1 * wm + 1, 0, 1 * wm + (wm - 1)  # tokens (1, 1), (0, 0), (1, last)
    depths = [np.full(hw, Z, np.float32) for _ in range(3)]
    depths[0][_box(lay, hole_tok)] = 0.0  # anchor hole: that query has no depth
    depths[1][_box(lay, occ_tok)] = Z / 2  # occluder in frame 1 over token (0, 0)
    ys, xs = _box(lay, sparse_tok)
    keep = depths[1][ys, xs].copy()
    depths[1][ys, xs] = 0.0  # frame 1, token (1, last): almost no valid depth
    cy, cx = (ys.start + ys.stop) // 2, (xs.start + xs.stop) // 2
    depths[1][cy - 1:cy + 1, cx - 1:cx + 1] = keep[:2, :2]  # ... except the 2x2 pixels around its centre

    t = build_token_targets(lay, depths, Ks, cams, anchor_frame=0)
    assert isinstance(t, TokenTargets)
    anchor_ok = np.ones(s, bool)
    anchor_ok[hole_tok] = False
    # frame 1 (shift +1): the query of token (0, 1) lands on the occluder -> invalid
    exp1 = _expected(lay, 1, anchor_ok, blocked={1})
    exp2 = _expected(lay, -1, anchor_ok)
    assert t.anchor_frame == 0
    assert t.anchor_tokens.tolist() == list(range(s))
    assert t.target_frames.tolist() == [1, 2] and t.target_slots.tolist() == [1, 2]
    np.testing.assert_array_equal(t.target_tokens[:, 0].numpy(), np.where(exp1 >= 0, exp1 + s, -1))
    np.testing.assert_array_equal(t.target_tokens[:, 1].numpy(), np.where(exp2 >= 0, exp2 + 2 * s, -1))
    np.testing.assert_array_equal(t.valid.numpy(), np.stack([exp1 >= 0, exp2 >= 0], 1))
    # the sparse-depth token still gets its match: visibility needs one of 4 pixels, not half the token
    m_sparse = 1 * wm + (wm - 1) + 1
    if m_sparse < s and (m_sparse % wm) != 0:
        assert t.valid[m_sparse, 0]
    q = t.query_uv.numpy()
    np.testing.assert_allclose(q, lay.token_centers_orig(), atol=1e-5)
    ok = anchor_ok
    np.testing.assert_allclose(t.target_uv[ok, 0].numpy(), q[ok] - [p_orig, 0], atol=1e-3)
    np.testing.assert_allclose(t.target_uv[ok, 1].numpy(), q[ok] + [p_orig, 0], atol=1e-3)
    assert torch.isnan(t.target_uv[~torch.from_numpy(ok)]).all()
    np.testing.assert_allclose(t.target_depth[ok].numpy(), Z, rtol=1e-6)
    assert (t.target_depth[~torch.from_numpy(ok)] == 0).all()
    # token depth: slot 0 hole invalid; slot 1 occluder at Z/2, sparse token invalid; rest Z
    td, tv = t.token_depth.numpy(), t.token_depth_valid.numpy()
    assert td.shape == (3 * s,) and not tv[hole_tok] and tv[s + occ_tok] and not tv[s + sparse_tok]
    assert td[s + occ_tok] == pytest.approx(Z / 2)
    others = np.ones(3 * s, bool)
    others[[hole_tok, s + occ_tok, s + sparse_tok]] = False
    assert tv[others].all()
    np.testing.assert_allclose(td[others], Z)


def test_llava_crop_edges_are_invalid_though_visible():
    lay = _layout("tiny-llava-next-video", None, (112, 140), 2)
    assert lay.transform.offset[0] > 0  # centre crop of a wide frame
    Ks, cams = _cams([0, 1], lay.token_px / lay.transform.scale[0], 112, 140)
    t = build_token_targets(lay, [np.full((112, 140), Z, np.float32)] * 2, Ks, cams)
    wm = lay.grid_hw[1]
    first_col = np.arange(lay.tokens_per_slot) % wm == 0
    # column 0 moves 1 token left: still inside the 140-px image, but outside the model's crop
    assert (t.target_uv[first_col, 0, 0] >= 0).all()
    assert not t.valid[first_col, 0].any() and t.valid[~first_col, 0].all()


def test_qwen_pair_mode_needs_both_frames():
    lay = _layout("tiny-qwen2.5-vl", "pair", (56, 84), 4)
    assert lay.slot_frames == ((0, 1), (2, 3))
    s, wm = lay.tokens_per_slot, lay.grid_hw[1]
    Ks, cams = _cams([0, 0, 1, 1], 28, 56, 84)
    depths = [np.full((56, 84), Z, np.float32) for _ in range(4)]
    depths[3][_box(lay, 0)] = Z / 2  # occluder over token (0, 0) in the *second* frame of slot 1 only
    t = build_token_targets(lay, depths, Ks, cams, anchor_frame=0)
    assert t.target_frames.tolist() == [2] and t.target_slots.tolist() == [1]  # one column per other slot
    exp = _expected(lay, 1, np.ones(s, bool), blocked={1})
    np.testing.assert_array_equal(t.target_tokens[:, 0].numpy(), np.where(exp >= 0, exp + s, -1))
    # the same occluder in the slot's first frame (the one defining uv) is caught too
    depths[3][:] = Z
    depths[2][_box(lay, 0)] = Z / 2
    t2 = build_token_targets(lay, depths, Ks, cams, anchor_frame=0)
    np.testing.assert_array_equal(t2.valid.numpy(), t.valid.numpy())
    # and without any occluder token (0, 1) is valid
    depths[2][:] = Z
    assert build_token_targets(lay, depths, Ks, cams).valid[1, 0]
    # the anchor may be the second frame of its slot; its slot is still not a target
    t3 = build_token_targets(lay, depths, Ks, cams, anchor_frame=1)
    assert t3.anchor_tokens.tolist() == list(range(s)) and t3.target_slots.tolist() == [1]


def test_fine_grid_queries_follow_their_token():
    lay = _layout("tiny-qwen2.5-vl", None, (56, 84), 2)
    Ks, cams = _cams([0, 1], 28, 56, 84)
    t = build_token_targets(lay, [np.full((56, 84), Z, np.float32)] * 2, Ks, cams, grid="fine", fine_per_token=2)
    s = lay.tokens_per_slot
    assert t.query_uv.shape == (4 * s, 2)
    assert t.anchor_tokens.tolist() == np.repeat(np.arange(s), 4).tolist()
    # token 0 = pixels [0, 28)^2: sub-centres at 7 and 21
    np.testing.assert_allclose(t.query_uv[:4].numpy(), [[7, 7], [21, 7], [7, 21], [21, 21]])
    idx, inside = lay.pixel_to_token(t.query_uv.numpy())
    assert inside.all() and (idx == t.anchor_tokens.numpy()).all()
    col = t.anchor_tokens.numpy() % lay.grid_hw[1]
    np.testing.assert_array_equal(t.valid[:, 0].numpy(), col >= 1)
    np.testing.assert_array_equal(t.target_tokens[col >= 1, 0].numpy(), t.anchor_tokens[col >= 1].numpy() - 1 + s)
    with pytest.raises(ValueError):
        query_points(lay, "medium")


def test_pooled_token_depth_mean_of_valid_pixels():
    lay = _layout("tiny-qwen2.5-vl", None, (56, 84), 1)
    d = np.full((1, 56, 84), 2.0, np.float32)
    d[0, :28, :14] = 0.0  # token 0: exactly half valid -> valid, mean of the valid half
    d[0, :28, 14:28] = 3.0
    d[0, :28, 28:43] = 0.0  # token 1: 15 of 28 columns invalid -> invalid
    d[0, 28:, :28] = np.arange(1, 29, dtype=np.float32)[None, :]  # token 3: a ramp 1..28, mean 14.5
    depth, valid = pooled_token_depth(lay, d)
    assert valid.tolist() == [True, False, True, True, True, True]
    np.testing.assert_allclose(depth, [3.0, 0.0, 2.0, 14.5, 2.0, 2.0])


def test_pooled_token_depth_follows_resize():
    """LLaVA: 112x140 -> 224x280 -> crop 224: a token holds 14x14 original pixels from x = 14."""
    lay = _layout("tiny-llava-next-video", None, (112, 140), 1)
    d = np.zeros((1, 112, 140), np.float32)
    d[0, :14, 14:28] = 5.0  # exactly token (0, 0)
    depth, valid = pooled_token_depth(lay, d)
    assert valid[0] and depth[0] == 5.0 and not valid[1:].any()


def test_shape_errors_are_clear():
    lay = _layout("tiny-qwen2.5-vl", None, (56, 84), 2)
    Ks, cams = _cams([0, 1], 28, 56, 84)
    with pytest.raises(ValueError, match="depth of frame 1"):
        build_token_targets(lay, [np.ones((56, 84)), np.ones((50, 84))], Ks, cams)
    with pytest.raises(ValueError, match="2 frames"):
        build_token_targets(lay, [np.ones((56, 84))], Ks[:1], cams[:1])


@pytest.mark.parametrize("preset, hw", [("tiny-llava-next-video", (90, 131)), ("tiny-qwen2.5-vl", (61, 97)),
                                        ("tiny-llava-next-video", (6, 7))])
def test_pooled_token_depth_matches_per_pixel_reference(preset, hw):
    """Separable pooling == the definition: each pixel goes to the token containing its centre."""
    from gasp_vlm.data.targets import pixel_token_map

    lay = _layout(preset, None, hw, 2)
    rng = np.random.default_rng(0)
    d = (rng.uniform(1, 5, (2,) + hw) * (rng.random((2,) + hw) > 0.45)).astype(np.float32)
    depth, valid = pooled_token_depth(lay, d)
    idx = pixel_token_map(lay, *hw)
    s = lay.tokens_per_slot
    for g in range(2):
        flat = d[g].ravel()
        for tok in range(s):
            px = flat[idx == tok]
            if px.size == 0:  # upsampled past the token size: nearest pixel at the token centre
                u, v = lay.token_centers_orig()[tok]
                px = d[g][int(v), int(u)][None]
            ok = px > 0
            exp_valid = ok.sum() > 0 and ok.sum() >= 0.5 * px.size
            assert valid[g * s + tok] == exp_valid
            if exp_valid:
                assert depth[g * s + tok] == pytest.approx(px[ok].mean(), rel=1e-5)


@pytest.mark.parametrize("preset, mode, hw", [("tiny-qwen2.5-vl", None, (56, 84)), ("tiny-qwen2.5-vl", "pair", (56, 84))])
def test_multi_anchor_targets_merge_the_per_anchor_ones(preset, mode, hw):
    """data.anchors: all -- every frame an anchor in turn, merged into one TokenTargets whose loss sums
    equal the per-anchor targets' sums (the losses are pooled over pairs)."""
    from gasp_vlm.data.targets import build_multi_anchor_targets
    from gasp_vlm.method.losses import gasp_layer_sums

    h, w = hw
    shifts = [0, 1, 0, 2] if mode is None else [0, 0, 1, 1]
    lay = _layout(preset, mode, hw, len(shifts))
    s = lay.tokens_per_slot
    Ks, cams = _cams(shifts, lay.token_px / lay.transform.scale[0], h, w)
    rng = np.random.default_rng(0)
    depths = [np.full(hw, Z, np.float32) for _ in shifts]
    depths[2][: h // 2, : w // 3] = 0.0  # some invalid depth, so pooled validity differs by slot
    order = [2, 0, 1, 3]  # as GeometrySequenceSource: the anchor, then the others ascending
    merged = build_multi_anchor_targets(lay, depths, Ks, cams, order)
    firsts = {}
    parts = []
    for a in order:
        g = lay.slot_of_frame(a)
        if g in firsts:
            continue
        firsts[g] = a
        parts.append(build_token_targets(lay, depths, Ks, cams, anchor_frame=a))
    assert len(parts) == lay.num_slots
    # rows: each part's anchors in order; columns: every slot, the row's own slot invalid
    assert torch.equal(merged.anchor_tokens, torch.cat([p.anchor_tokens for p in parts]))
    assert torch.equal(merged.target_slots, torch.arange(lay.num_slots))
    row = 0
    for p in parts:
        m = p.anchor_tokens.numel()
        own = int(p.anchor_tokens[0]) // s
        assert not merged.valid[row:row + m, own].any()
        assert torch.equal(merged.target_tokens[row:row + m][:, p.target_slots], p.target_tokens)
        assert torch.equal(merged.valid[row:row + m][:, p.target_slots], p.valid)
        row += m
    # token depth (pooled once): every slot's from the frame that anchors it
    d_ref, v_ref = pooled_token_depth(lay, [depths[firsts[g]] for g in range(lay.num_slots)], 0.5)
    np.testing.assert_array_equal(merged.token_depth.numpy(), d_ref)
    np.testing.assert_array_equal(merged.token_depth_valid.numpy(), v_ref)
    assert not v_ref.all() and v_ref.any()
    assert merged.valid.any()

    emb = torch.from_numpy(rng.normal(size=(lay.num_visual, 16)).astype(np.float32))

    def sums(t):
        return gasp_layer_sums(emb, t.anchor_tokens, t.target_tokens, t.valid, t.target_depth, t.target_slots,
                               merged.token_depth, merged.token_depth_valid, s)

    got = sums(merged)
    want = [sum(x) for x in zip(*(sums(p) for p in parts))]
    for g_, w_ in zip(got, want):
        assert torch.allclose(g_.float(), w_.float(), rtol=1e-5, atol=1e-5)
