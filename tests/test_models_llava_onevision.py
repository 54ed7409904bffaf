"""LLaVA-OneVision specifics on the real HF classes (tiny preset): AnyRes-max views and token counts equal
to the HF processor's, multi-image squares, the video's newline token, clips of different lengths in one
batch, and the qwen_1_5 prompt. The pixel-encoded layout proof is in test_models_layout.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gasp_vlm.models import load_adapter

SMALL = {"num_hidden_layers": 2}


@pytest.fixture(scope="module")
def ad():
    return load_adapter("tiny-llava-onevision", overrides=SMALL)


def hf_image_processor(ad):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    return LlavaOnevisionImageProcessorPil(size={"height": ad.size, "width": ad.size}, image_grid_pinpoints=ad.pinpoints,
                                           image_mean=list(ad.image_mean), image_std=list(ad.image_std))


def hf_token_count(ad, orig_hw, views_hw) -> int:
    """LlavaOnevisionProcessor._get_number_of_features, unbound, with this model's sizes."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=ad.pinpoints),
                           num_image_tokens=ad.patches ** 2, vision_aspect_ratio=f"anyres_max_{ad.max_tiles}")
    proc._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(proc, *a)
    return LlavaOnevisionProcessor._get_number_of_features(proc, *orig_hw, *views_hw)


@pytest.mark.parametrize("hw", [(90, 200), (300, 100), (112, 112), (250, 340), (40, 500)])
def test_anyres_views_and_token_count_equal_the_hf_processor(ad, hw):
    img = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    views, n_tok = ad.anyres_image(img)
    hf = hf_image_processor(ad)(images=[Image.fromarray(img)], return_tensors="pt")
    theirs = hf["pixel_values"][0]
    assert theirs.shape == views.shape and hf["image_sizes"].tolist() == [list(hw)]
    torch.testing.assert_close(views, theirs, atol=1e-5, rtol=0)
    assert n_tok == hf_token_count(ad, hw, (ad.size, ad.size))
    # and the model agrees: its packed features for this image have exactly n_tok rows
    with torch.no_grad():
        feats = ad.model.model.get_image_features(views[None], torch.tensor([hw]), return_dict=True).pooler_output
    assert len(feats) == 1 and feats[0].shape[0] == n_tok


def test_several_images_are_mean_padded_squares(ad):
    imgs = [np.random.default_rng(i).integers(0, 256, hw + (3,), dtype=np.uint8) for i, hw in enumerate([(60, 100), (90, 40)])]
    hf = hf_image_processor(ad)(images=[[Image.fromarray(i) for i in imgs]], return_tensors="pt")
    ours = torch.stack([ad.square_image(i) for i in imgs])
    torch.testing.assert_close(ours, hf["pixel_values"], atol=1e-5, rtol=0)
    req = ad._encode_generation({"prompt": "Same object?", "images": [Image.fromarray(i) for i in imgs]})
    assert int((req["input_ids"] == ad.ids["image"]).sum()) == 2 * (ad.patches ** 2 + 1)
    with torch.no_grad():  # the model packs P^2 + 1 (newline) features per image of a multi-image sample
        out = ad.model.model.get_image_features(req["pixel_values"], req["image_sizes"], batch_num_images=[2],
                                                return_dict=True).pooler_output
    assert [f.shape[0] for f in out] == [ad.patches ** 2 + 1] * 2


def test_video_tokens_end_in_one_newline_that_is_no_target(ad):
    frames = [np.zeros((112, 112, 3), np.uint8)] * 3
    batch = ad.prepare_frames([frames], prompt="What moved?")
    lay = batch.layouts[0]
    vid = torch.nonzero(batch.inputs["input_ids"][0] == ad.ids["video"]).squeeze(1)
    assert len(vid) == 3 * ad.grid ** 2 + 1 and torch.equal(lay.positions, vid[:-1])
    assert torch.equal(lay.meta["newline_positions"], vid[-1:])
    with torch.no_grad():  # the token at the newline position is the model's learned image_newline
        inputs = ad.encode_visual_frozen(batch)
        feats = inputs["mm_encoder_outputs"]["video"].pooler_output[0]
    torch.testing.assert_close(feats[-1], ad.model.model.image_newline)
    text = ad.tokenizer.decode(batch.inputs["input_ids"][0]).replace("<video>", "")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nWhat moved?"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_clips_of_different_lengths_in_one_batch_equal_each_alone(ad):
    """Each clip keeps its own newline: the batch's answer losses equal each sample's alone."""
    rng = np.random.default_rng(3)
    a = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    b = a[:2]

    def losses(batch):
        rows = torch.zeros(len(batch.layouts), 1, dtype=torch.long)
        cap = ad.forward_capture(batch, what=(), rows=rows)
        keep = batch.labels[:, 1:] != -100
        return torch.nn.functional.cross_entropy(cap.logits.float(), batch.labels[:, 1:][keep], reduction="none")

    both = ad.prepare_frames([a, b], answers=["left", "right"])
    assert both.inputs["video_frame_counts"] == [3, 2]
    alone = torch.cat([losses(ad.prepare_frames([a], answers=["left"])), losses(ad.prepare_frames([b], answers=["right"]))])
    torch.testing.assert_close(losses(both), alone, rtol=1e-4, atol=1e-5)


def test_export_processor_files_reproduce_the_adapters_inputs(ad, tmp_path):
    """AutoImageProcessor on the export gives our AnyRes views; the chat template, expanded as
    LlavaOnevisionProcessor expands it, gives our token ids (two images, then a video)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from gasp_vlm.models.processors import write_processor_files

    out = tmp_path / "ov"
    ad.save_pretrained(out)
    write_processor_files(ad, out)
    back = load_adapter(out)
    assert back.family == "llava_onevision" and back.pinpoints == ad.pinpoints
    img = Image.fromarray(np.random.default_rng(5).integers(0, 255, (90, 200, 3), dtype=np.uint8))
    ours = back._encode_generation({"prompt": "Where?", "images": [img]})
    theirs = AutoImageProcessor.from_pretrained(out)(images=[img], return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(out)
    clip = [Image.fromarray(np.full((50, 70, 3), 30 * i, np.uint8)) for i in range(2)]
    req = back._encode_generation({"prompt": "Where?", "images": [img, img], "video": clip})
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                                                 {"type": "text", "text": "Where?"}]}],
                                   add_generation_prompt=True, tokenize=False)
    text = text.replace("<image>", "<image>" * (back.patches ** 2 + 1)).replace("<video>", "<video>" * (2 * back.grid ** 2 + 1))
    assert tok(text, add_special_tokens=False)["input_ids"] == req["input_ids"][0].tolist()


def test_anyres_token_map_says_what_every_image_token_shows():
    """Pixel-encoded proof of the AnyRes layout on the real tower made local: a 112 x 200 image fits the
    112 x 224 canvas with 12 px of padding each side, so the tile grid keeps feature cols 1..14; every
    tile-grid token must carry exactly the colour painted in its box, every newline is image_newline."""
    from tests.test_models_layout import make_local, palette

    ad = load_adapter("tiny-llava-onevision", overrides=SMALL)
    make_local(ad)
    h, w = 112, 200
    kind, boxes = ad.anyres_token_map(h, w)
    assert (kind == 0).sum() == ad.patches ** 2 and (kind == 2).sum() == 8 and (kind == 1).sum() == 8 * 14
    np.testing.assert_allclose(boxes[kind == 1][[0, 13]], [[2, 0, 16, 14], [184, 0, 198, 14]])  # by hand
    rows, cols = 8, 16  # (x + 12) // 14 runs 0..15
    colors = palette(rows * cols)
    ys, xs = np.mgrid[0:h, 0:w]
    img = colors[(ys // 14) * cols + (xs + 12) // 14]  # regions on the canvas' 14 px grid, shifted by the padding

    def features(image):
        views, n_tok = ad.anyres_image(image)
        with torch.no_grad():
            f = ad.model.model.get_image_features(views[None], torch.tensor([image.shape[:2]]), return_dict=True)
        assert f.pooler_output[0].shape[0] == n_tok == len(kind)
        return f.pooler_output[0]

    feats = features(img)
    first_tile = int(np.argmax(kind == 1))
    refs = torch.stack([features(np.broadcast_to(c, (h, w, 3)).copy())[first_tile] for c in colors])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    tiles = np.nonzero(kind == 1)[0]
    want = torch.tensor((cy[tiles] // 14).astype(int) * cols + ((cx[tiles] + 12) // 14).astype(int))
    dist = torch.cdist(feats[tiles], refs, compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(dist.argmin(1), want) and float(dist.min(1).values.max()) < 1e-3
    for i in np.nonzero(kind == 2)[0]:
        torch.testing.assert_close(feats[i], ad.model.model.image_newline)


def test_shrunk_anyres_grid_still_covers_the_image(ad):
    """A large image whose tile grid exceeds 9 tiles' worth: the shrunk grid's boxes tile the whole image
    without gaps, rows and columns in order (and the count matches HF, tested above)."""
    h, w = 300, 340
    kind, boxes = ad.anyres_token_map(h, w)
    grid = boxes[kind == 1]
    n_rows = int((kind == 2).sum())
    g = grid.reshape(n_rows, -1, 4)
    assert g.shape[1] * n_rows < (3 * ad.patches) ** 2  # shrunk
    # the model unpads in whole feature cells, so the kept cells may reach into the padding by less than one
    cell = 14 * max(h, w) / ad.size / 3
    np.testing.assert_allclose([g[0, 0, 0], g[0, 0, 1], g[-1, -1, 2], g[-1, -1, 3]], [0, 0, w, h], atol=cell)
    assert np.allclose(g[:, 1:, 0], g[:, :-1, 2]) and np.allclose(g[1:, :, 1], g[:-1, :, 3])
