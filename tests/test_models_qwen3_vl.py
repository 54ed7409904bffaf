"""Qwen3-VL specifics on the real HF classes (tiny preset): timestamped video blocks as its processor
writes them, interleaved M-RoPE positions per slot, DeepStack injection at exactly the layout's tokens
(and read after it), SigLIP-normalised 16 px patches equal to the HF image processor's, and a
processor from another model refused at load. The layout proof itself is in test_models_layout.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gasp_vlm.models import ModelLoadError, load_adapter

SMALL = {"num_hidden_layers": 3}


@pytest.fixture(scope="module")
def ad():
    return load_adapter("tiny-qwen3-vl", overrides=SMALL)


def frames(n: int, h: int = 64, w: int = 96, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def hf_video_placeholder(ad, grid_t: int, per_slot: int, frame_indices: list[int], fps: float) -> str:
    """The string Qwen3VLProcessor puts in place of one video (its own replace_video_token, unbound)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = SimpleNamespace(video_processor=SimpleNamespace(merge_size=ad.merge, temporal_patch_size=ad.temporal),
                           vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
                           video_token="<|video_pad|>")
    proc._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(proc, *a)
    grid = torch.tensor([[grid_t, 2 * ad.merge, 3 * ad.merge]])  # a 2 x 3 token grid
    assert per_slot == 6
    meta = VideoMetadata(total_num_frames=len(frame_indices), fps=fps, frames_indices=list(frame_indices))
    return Qwen3VLProcessor.replace_video_token(proc, {"video_grid_thw": grid, "video_metadata": [meta]}, 0)


@pytest.mark.parametrize("mode,n", [("video_dup", 3), ("pair", 4), ("pair", 3)])
def test_video_blocks_are_the_hf_processors_timestamped_blocks(ad, mode, n):
    batch = ad.prepare_frames([frames(n)], prompt="Where?", frame_mode=mode)
    text = ad.tokenizer.decode(batch.inputs["input_ids"][0])
    lay = batch.layouts[0]
    # video_dup feeds every frame twice (frame f = indices f, f); pair feeds Qwen's native pairs
    indices = [f for f in range(n) for _ in range(2)] if mode == "video_dup" else list(range(n))
    expected = hf_video_placeholder(ad, lay.num_slots, lay.tokens_per_slot, indices, fps=ad.video_fps)
    assert f"<|im_start|>user\n{expected}Where?<|im_end|>\n<|im_start|>assistant\n" == text
    assert "system" not in text  # Qwen3-VL's template adds no default system turn
    if mode == "video_dup":
        assert expected.startswith("<0.0 seconds>") and "<1.0 seconds>" in expected  # 2 fps
    # benchmark requests give the real times of the sampled frames
    from PIL import Image

    req = {"prompt": "Where?", "video": [Image.fromarray(f) for f in frames(2)], "video_times": [3.0, 7.25]}
    ids = ad._encode_generation(req)["input_ids"][0]
    assert "<3.0 seconds>" in ad.tokenizer.decode(ids) and "<7.2 seconds>" in ad.tokenizer.decode(ids)


def test_mrope_positions_follow_each_slots_grid(ad):
    """3-D positions reach the model (not the 1-D fallback); within every slot the h / w ids step with the
    layout's rows / cols, and each later slot (after its timestamp text) starts higher."""
    batch = ad.prepare_frames([frames(3)])
    store = {}
    h = ad.model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: store.update(pos=kwargs.get("position_ids")), with_kwargs=True)
    with torch.no_grad():
        ad.model(**batch.inputs, use_cache=False)
    h.remove()
    pos = store["pos"]
    assert pos is not None and pos.shape[0] in (3, 4), "Qwen3-VL fell back to 1-D positions"
    lay = batch.layouts[0]
    vis = pos[-3:, 0][:, lay.positions]  # (3, N): t, h, w
    srw = lay.token_slot_row_col()
    starts = []
    for s in range(lay.num_slots):
        a, b = lay.slot_token_range(s)
        t, hh, ww = vis[:, a:b]
        assert (t == t[0]).all()
        assert torch.equal(hh - hh.min(), srw[a:b, 1]) and torch.equal(ww - ww.min(), srw[a:b, 2])
        starts.append(int(t[0]))
    assert starts == sorted(starts) and len(set(starts)) == lay.num_slots


def _stream_into(ad, batch, layer: int) -> torch.Tensor:
    store = {}
    h = ad.decoder_layers()[layer].register_forward_pre_hook(
        lambda mod, args, kwargs: store.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        ad.model(**batch.inputs, use_cache=False)
    h.remove()
    return store["x"][0]


def test_deepstack_adds_at_exactly_the_layout_tokens_and_heads_read_after_it():
    ad = load_adapter("tiny-qwen3-vl", overrides=SMALL)
    assert len(ad.model.config.vision_config.deepstack_visual_indexes) == 2  # injected after layers 0 and 1
    batch = ad.prepare_frames([frames(2)], prompt="What moved?")
    lay = batch.layouts[0]
    with_ds = _stream_into(ad, batch, 1)
    cap = ad.forward_capture(batch, what=("hidden",))
    out0 = {}
    h = ad.decoder_layers()[0].register_forward_hook(lambda m, a, o: out0.update(x=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        ad.model(**batch.inputs, use_cache=False)
    h.remove()
    # the stream into layer 1 = layer 0's output + DeepStack features at the visual tokens only
    diff = (with_ds - out0["x"][0]).abs().sum(-1)
    assert torch.equal(torch.nonzero(diff > 0).squeeze(1), lay.positions)
    # the heads / diagnostic read layer 0 after the injection (what layer 1's query reads)
    torch.testing.assert_close(cap.hidden[0][0], with_ds[lay.positions])
    assert not torch.allclose(cap.hidden[0][0], out0["x"][0][lay.positions])
    # and the last layer at its own output (nothing is added after it)
    last = ad.num_layers - 1
    h = ad.decoder_layers()[last].register_forward_hook(lambda m, a, o: out0.update(y=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        ad.model(**batch.inputs, use_cache=False)
    h.remove()
    torch.testing.assert_close(cap.hidden[last][0], out0["y"][0][lay.positions])


def test_pixels_match_hf_image_processor(ad):
    """16 px patches, 2 x 2 merge, mean = std = 0.5: our flattening equals Qwen3-VL's image processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    fr = frames(2)
    ours = ad.prepare_frames([fr]).inputs["pixel_values_videos"]
    hf = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3)(
        images=fr, do_resize=False, return_tensors="pt")
    assert hf["image_grid_thw"].tolist() == [[1, 4, 6]] * 2
    torch.testing.assert_close(ours, hf["pixel_values"], atol=1e-5, rtol=0)


def test_a_processor_from_another_model_is_refused_at_load(ad, tmp_path):
    out = tmp_path / "qwen3"
    ad.save_pretrained(out)
    from gasp_vlm.models.processors import write_processor_files

    write_processor_files(ad, out)
    assert load_adapter(out).family == "qwen3_vl"  # its own processor loads
    cfg_path = out / "preprocessor_config.json"
    own = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**own, "processor_class": "Qwen2_5_VLProcessor"}))
    with pytest.raises(ModelLoadError, match="processor_class 'Qwen2_5_VLProcessor'.*qwen3_vl"):
        load_adapter(out)
    cfg_path.write_text(json.dumps({**own, "patch_size": 14}))
    with pytest.raises(ModelLoadError, match="patch_size 14.*uses 16"):
        load_adapter(out)
