"""InternVL3 specifics on the real HF classes (tiny preset): dynamic tiles + thumbnail equal to the HF
image processor's (GotOcr2, what the -hf checkpoints ship), the tile-major context tokens mapped onto one
raster grid, the export's processor files reproducing the adapter's inputs, tile settings kept through a
save / load. The pixel-encoded layout proof is in test_models_layout.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gasp_vlm.models import load_adapter
from gasp_vlm.models.internvl import tile_grid

SMALL = {"num_hidden_layers": 2}


@pytest.fixture(scope="module")
def ad():
    return load_adapter("tiny-internvl", overrides=SMALL)


@pytest.mark.parametrize("hw,max_tiles", [((90, 130), 4), ((100, 420), 4), ((300, 90), 6), ((224, 224), 4),
                                          ((120, 500), 12)])
def test_tiles_equal_the_hf_image_processor(ad, hw, max_tiles):
    from transformers import GotOcr2ImageProcessorPil
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    img = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
    tile = (ad.tile, ad.tile)
    assert tile_grid(*hw, ad.tile, 1, max_tiles) == get_optimal_tiled_canvas(hw, tile, 1, max_tiles)
    ours, (cols, rows) = ad.tiles_of(img, max_tiles)
    hf = GotOcr2ImageProcessorPil(size={"height": ad.tile, "width": ad.tile}, crop_to_patches=True, max_patches=max_tiles,
                                  image_mean=list(ad.image_mean), image_std=list(ad.image_std))
    theirs = hf(images=[Image.fromarray(img)], return_tensors="pt")
    assert theirs["num_patches"].tolist() == [len(ours)] == [cols * rows + (cols * rows > 1)]
    torch.testing.assert_close(ours, theirs["pixel_values"], atol=1e-5, rtol=0)


def test_tiles_mode_maps_the_tile_major_tokens_onto_one_raster_grid(ad):
    frames = [np.zeros((112, 224, 3), np.uint8)] * 2  # aspect 2: a 2 x 1 tile grid + a thumbnail per frame
    batch = ad.prepare_frames([frames], frame_mode="tiles")
    lay = batch.layouts[0]
    g = ad.grid
    assert lay.grid_hw == (g, 2 * g) and lay.transform.input_hw == (ad.tile, 2 * ad.tile)
    ids = batch.inputs["input_ids"][0]
    ctx = torch.nonzero(ids == ad.ids["context"]).squeeze(1)
    per_frame = 3 * g * g  # two tiles + the thumbnail
    assert len(ctx) == 2 * per_frame and batch.inputs["pixel_values"].shape[0] == 6
    # grid row 0: tile 0's first row, then tile 1's first row; the thumbnail's tokens are not in the grid
    want_row0 = torch.cat([ctx[:g], ctx[g * g:g * g + g]])
    assert torch.equal(lay.positions[:2 * g], want_row0)
    thumb = lay.meta["thumbnail_positions"]
    assert torch.equal(thumb, torch.cat([ctx[2 * g * g:per_frame], ctx[per_frame + 2 * g * g:]]))
    assert not set(thumb.tolist()) & set(lay.positions.tolist())
    assert sorted(lay.positions.tolist() + thumb.tolist()) == ctx.tolist()  # every context token, once
    # a pixel in the right half of the frame falls in tile 1
    idx, inside = lay.pixel_to_token(np.array([[224 * 0.75, 1.0]]))
    assert inside.all() and lay.positions[int(idx[0])] in ctx[g * g:2 * g * g]


def test_prompt_is_internvls_format(ad):
    b = ad.prepare_frames([[np.zeros((84, 84, 3), np.uint8)] * 2], prompt="Where?")
    text = ad.tokenizer.decode(b.inputs["input_ids"][0])
    ctx = "<IMG_CONTEXT>" * (ad.grid * ad.grid)
    assert text == (f"<|im_start|>system\n{ad.system_prompt}<|im_end|>\n<|im_start|>user\n"
                    f"Frame1: <img>{ctx}</img>\nFrame2: <img>{ctx}</img>\nWhere?<|im_end|>\n<|im_start|>assistant\n")


def test_export_processor_files_reproduce_the_adapters_inputs(ad, tmp_path):
    """Saved + processor files written: the tile settings come back on load, AutoImageProcessor gives our
    tiles, and the chat template (expanded as InternVLProcessor expands it) gives our token ids."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from gasp_vlm.models.processors import write_processor_files

    out = tmp_path / "ivl"
    ad.save_pretrained(out)
    write_processor_files(ad, out)
    back = load_adapter(out)
    assert (back.family, back.min_tiles, back.max_tiles) == ("internvl", 1, 4)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 200, 3), dtype=np.uint8))
    video = [Image.fromarray(np.full((60, 80, 3), 40 * i, np.uint8)) for i in range(3)]
    ours = back._encode_generation({"prompt": "Which is closer?", "images": [image], "video": video})

    ip = AutoImageProcessor.from_pretrained(out)
    theirs = ip(images=[image], return_tensors="pt")
    n_tiles = int(theirs["num_patches"][0])
    torch.testing.assert_close(ours["pixel_values"][:n_tiles], theirs["pixel_values"], atol=1e-5, rtol=0)
    assert ours["pixel_values"].shape[0] == n_tiles + 3  # then one tile per video frame

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "video"}, {"type": "text", "text": "Which is closer?"}]}],
        add_generation_prompt=True, tokenize=False)
    ctx = "<IMG_CONTEXT>" * back.grid ** 2
    frames = "\n".join(f"Frame{i + 1}: <img>{ctx}</img>" for i in range(3))
    text = text.replace("<IMG_CONTEXT>", f"<img>{ctx * n_tiles}</img>", 1).replace("<video>", frames)
    assert tok(text, add_special_tokens=False)["input_ids"] == ours["input_ids"][0].tolist()
    cfg = json.loads((out / "processor_config.json").read_text())
    assert cfg == {"processor_class": "InternVLProcessor", "image_seq_length": back.grid ** 2}
