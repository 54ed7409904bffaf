"""The token layout is proven on the real towers with frames whose pixels encode (frame, row, col).

The vision towers are made *local* (attention and MLP outputs zeroed, position embeddings zeroed), so a
token's embedding depends only on the pixels it covers. A uniform frame of colour k then gives the
reference embedding e_k for every token; in a frame painted with one colour per (frame, row, col) region,
the embedding at the layout's token v must be e_{code(frame, row, col)} with the frame/row/col the layout
claims. Grids are 2 x 3 tokens so a row/column (y/x) swap is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gasp_vlm.models import load_adapter

SMALL = {"num_hidden_layers": 2}


def make_local(adapter) -> None:
    """Zero every cross-patch path of the vision tower (residual blocks become identities)."""
    vis = adapter.vision_module()
    with torch.no_grad():
        for name, p in vis.named_parameters():
            if any(k in name for k in ("attn.proj", "mlp.down_proj", "mlp.fc2", "mlp.linear_fc2", "self_attn.out_proj", "projection_layer",
                                        "position_embedding", "pos_embed", "class_embedding")):
                p.zero_()


def palette(n: int) -> np.ndarray:
    """n distinct, well-separated RGB colours."""
    rng = np.random.default_rng(123)
    cols = set()
    out = []
    while len(out) < n:
        c = tuple(int(v) for v in rng.integers(0, 256, 3) // 16 * 16 + 8)
        if c not in cols:
            cols.add(c)
            out.append(c)
    return np.array(out, dtype=np.uint8)


def llm_input_embeddings(adapter, batch) -> torch.Tensor:
    """(B, S, D) input of decoder layer 0 (the LLM's view of the visual tokens)."""
    store = {}

    def pre_hook(mod, args, kwargs):
        store["x"] = args[0] if args else kwargs["hidden_states"]

    h = adapter.decoder_layers()[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**batch.inputs, use_cache=False)
    finally:
        h.remove()
    return store["x"]


CASES = [
    ("tiny-qwen2.5-vl", "video_dup", 3),
    ("tiny-qwen2.5-vl", "images", 3),
    ("tiny-qwen2.5-vl", "pair", 4),
    ("tiny-qwen2-vl", "video_dup", 3),
    ("tiny-qwen2-vl", "pair", 3),
    ("tiny-qwen3-vl", "video_dup", 3),  # 32 px tokens, one timestamped block per slot
    ("tiny-qwen3-vl", "images", 3),
    ("tiny-qwen3-vl", "pair", 3),
    ("tiny-internvl", "video", 3),  # 84 px tiles: 3 x 3 tokens; frames 84 x 168 resized to one square tile
    ("tiny-internvl", "tiles", 2),  # frames 84 x 168: a 2 x 1 tile grid + thumbnail, a 3 x 6 token grid
    ("tiny-llava-next-video", "video", 3),
    ("tiny-llava-onevision", "video", 3),  # 112 px frames: 8 x 8 patches pooled to 4 x 4 tokens of 28 px
]


@pytest.mark.parametrize("preset,mode,n_frames", CASES)
def test_layout_points_at_the_right_frame_row_col(preset, mode, n_frames):
    is_llava, is_internvl = preset == "tiny-llava-next-video", preset.startswith("tiny-internvl")
    over = dict(SMALL)
    if is_llava:  # 84 x 84 crop -> 3 x 3 patches of 28 px; frames 84 x 140 exercise the centre crop
        over["vision.image_size"] = 84
    if is_internvl:  # 84 px tiles of 6 x 6 patches -> 3 x 3 tokens after the 2 x 2 pixel shuffle
        over.update({"vision.image_size": [84, 84]})
    ad = load_adapter(preset, overrides=over)
    make_local(ad)
    if is_llava:
        px, h, w, x_off, rows, cols = 28, 84, 140, 28, 3, 3  # crop offset (140 - 84) / 2 = 28 px, computed by hand
    elif preset == "tiny-llava-onevision":
        px, h, w, x_off, rows, cols = 28, 112, 112, 0, 4, 4
    elif is_internvl and mode == "video":
        px, h, w, x_off, rows, cols = 28, 84, 84, 0, 3, 3
    elif is_internvl:
        px, h, w, x_off, rows, cols = 28, 84, 168, 0, 3, 6  # tiles (0, 0) and (0, 1), 3 x 3 tokens each
    else:
        px = ad.patch * ad.merge  # 28 (Qwen2/2.5) or 32 (Qwen3) input pixels per token
        h, w, x_off, rows, cols = 2 * px, 3 * px, 0, 2, 3
    # Pair mode: both frames of a slot carry the same code, so a code names (slot, row, col).
    n_codes_frames = (n_frames + 1) // 2 if mode == "pair" else n_frames
    colors = palette(n_codes_frames * rows * cols)

    def code(f, r, c):
        return (f * rows + r) * cols + c

    frames = []
    for f in range(n_frames):
        img = np.zeros((h, w, 3), np.uint8)
        fc = f // 2 if mode == "pair" else f
        for r in range(rows):
            for c in range(cols):
                img[r * px:(r + 1) * px, x_off + c * px:x_off + (c + 1) * px] = colors[code(fc, r, c)]
        frames.append(img)
    batch = ad.prepare_frames([frames], frame_mode=mode)
    lay = batch.layouts[0]
    assert lay.grid_hw == (rows, cols)
    assert lay.num_slots == n_codes_frames
    emb = llm_input_embeddings(ad, batch)[0, lay.positions]  # (N, D)

    # Reference embedding of every colour: uniform frames (position-independent towers).
    n_ref = 2 if mode == "pair" else 1
    refs = []
    for col in colors:
        uni = [np.broadcast_to(col, (h, w, 3)).copy() for _ in range(n_ref)]
        b = ad.prepare_frames([uni], frame_mode=mode)
        refs.append(llm_input_embeddings(ad, b)[0, b.layouts[0].positions[0]])
    refs = torch.stack(refs)  # (K, D)

    srw = lay.token_slot_row_col()
    dist = torch.cdist(emb, refs, compute_mode="donot_use_mm_for_euclid_dist")  # (N, K), exact (no mm trick)
    got = dist.argmin(1)
    want = torch.tensor([code(s, r, c) for s, r, c in srw.tolist()])
    assert torch.equal(got, want), f"layout mismatch at tokens {torch.nonzero(got != want).flatten().tolist()[:10]}"
    assert float(dist.min(1).values.max()) < 1e-3  # exact match, not just nearest


def test_layout_transforms_for_center_crop():
    ad = load_adapter("tiny-llava-next-video", overrides=SMALL)
    frames = [np.zeros((224, 336, 3), np.uint8)] * 2
    lay = ad.prepare_frames([frames]).layouts[0]
    assert lay.transform.offset == (56.0, 0.0)
    idx, inside = lay.pixel_to_token(np.array([[10.0, 10.0], [56.5, 0.5], [56 + 28 * 3 + 1, 28 * 2 + 1]]))
    assert inside.tolist() == [False, True, True]
    assert idx.tolist() == [-1, 0, 2 * 8 + 3]
    # token centres in original pixels, row 0 col 0 -> (56 + 14, 14)
    np.testing.assert_allclose(lay.token_centers_orig()[0], [70.0, 14.0])


def test_qwen_resize_transform_maps_pixels_to_tokens():
    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    frames = [np.zeros((100, 150, 3), np.uint8)] * 2  # smart-resized to 112 x 140 (multiples of 28)
    lay = ad.prepare_frames([frames]).layouts[0]
    assert lay.transform.input_hw == (112, 140)
    assert lay.grid_hw == (4, 5)
    idx, inside = lay.pixel_to_token(np.array([[149.9, 99.9], [0.0, 0.0]]))
    assert idx.tolist() == [4 * 5 - 1, 0] and inside.all()


def test_qwen_video_positions_are_3d():
    """mm_token_type_ids reaches the model: temporal ids step per slot, h/w ids follow the grid."""
    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    frames = [np.zeros((56, 84, 3), np.uint8)] * 3
    batch = ad.prepare_frames([frames])
    store = {}

    def pre_hook(mod, args, kwargs):
        store["pos"] = kwargs.get("position_ids")

    h = ad.model.model.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    with torch.no_grad():
        ad.model(**batch.inputs, use_cache=False)
    h.remove()
    pos = store["pos"]
    assert pos is not None and pos.shape[0] in (3, 4), "Qwen fell back to 1-D positions"
    pos = pos[-3:, 0]  # (3, S): t, h, w
    lay = batch.layouts[0]
    vis = pos[:, lay.positions]  # (3, N)
    srw = lay.token_slot_row_col()
    t0, h0, w0 = vis[:, 0].tolist()
    assert torch.equal(vis[1] - h0, srw[:, 1]) and torch.equal(vis[2] - w0, srw[:, 2])
    t_per_slot = vis[0].view(lay.num_slots, -1)
    assert (t_per_slot == t_per_slot[:, :1]).all()
    assert (t_per_slot[1:, 0] > t_per_slot[:-1, 0]).all()


def test_qwen_pixels_match_hf_image_processor():
    """Our patch flattening equals the HF Qwen2-VL image processor's (video_dup == one image per frame)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ad = load_adapter("tiny-qwen2.5-vl", overrides=SMALL)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(2)]
    ours = ad.prepare_frames([frames]).inputs["pixel_values_videos"]
    hf = Qwen2VLImageProcessorPil()(images=frames, do_resize=False, return_tensors="pt")
    assert hf["image_grid_thw"].tolist() == [[1, 4, 6]] * 2
    torch.testing.assert_close(ours, hf["pixel_values"], atol=1e-5, rtol=0)
