"""``gasp eval --backend vllm`` request building (CPU; the vLLM calls themselves need a GPU): the prompt is the
HF path's token sequence with one placeholder per medium, and the frames are the HF path's pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gasp_vlm.bench.vllm_backend import (VLLMBackendError, VLLMGenerator, build_vllm_request, check_export,
                                         load_preparer, pixel_budget, sampling_kwargs)
from gasp_vlm.models.qwen import normalize_frames, patchify


def _fake_export(tmp_path: Path, preset: str = "tiny-qwen2.5-vl", frame_mode: str | None = None) -> Path:
    """What `gasp export` writes (weights, tokenizer, processor files, gasp_export.json) for a preset."""
    from gasp_vlm.models import load_adapter
    from gasp_vlm.models.processors import write_processor_files

    ad = load_adapter(preset, overrides={"num_hidden_layers": 1}, frame_mode=frame_mode)
    out = tmp_path / f"export-{preset}-{frame_mode}"
    ad.save_pretrained(out)
    files = write_processor_files(ad, out)
    (out / "gasp_export.json").write_text(json.dumps({"family": ad.family, "processor_files": files}))
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return _fake_export(tmp_path_factory.mktemp("vllm"))


def collapse_media_pads(ids: list[int], pad_ids: list[int]) -> list[int]:
    """The HF path's ids with each run of a media pad cut to one: a vLLM prompt before its processor expands
    the placeholders."""
    out: list[int] = []
    for t in ids:
        if not (t in pad_ids and out and out[-1] == t):
            out.append(t)
    return out


def _rgb(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _pads(ad) -> list[int]:
    return [ad.ids["image_pad"], ad.ids["video_pad"]]


def test_refuses_what_vllm_cannot_load(tmp_path, export):
    with pytest.raises(VLLMBackendError, match="gasp export"):
        check_export("tiny-qwen2.5-vl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(VLLMBackendError, match="not one"):
        check_export(tmp_path / "plain")
    other = tmp_path / "internvl"
    other.mkdir()
    (other / "gasp_export.json").write_text(json.dumps({"family": "internvl"}))
    with pytest.raises(VLLMBackendError, match="internvl export"):
        check_export(other)
    assert check_export(export) == "qwen2_5_vl"


def test_preparer_reads_no_weights(export):
    ad = load_preparer(export)
    assert next(ad.model.parameters()).device.type == "meta" and ad.frame_mode == "video_dup"
    assert next(ad.model.parameters()).dtype == torch.bfloat16


def test_image_request_matches_the_hf_path(export):
    from transformers import AutoImageProcessor, AutoTokenizer

    ad = load_preparer(export)
    images = [_rgb(90, 130, 0), _rgb(300, 260, 1)]  # the second one exceeds the budget
    req = {"prompt": "Which view is closer?", "images": images, "video": None, "max_pixels": 28 * 28 * 40}
    hf = ad._encode_generation(req)  # what `gasp eval --backend hf` feeds the model
    v = build_vllm_request(ad, req)
    tok = AutoTokenizer.from_pretrained(export)
    assert tok(v.prompt, add_special_tokens=False)["input_ids"] == collapse_media_pads(hf["input_ids"][0].tolist(),
                                                                                        _pads(ad))
    assert v.prompt.count("<|image_pad|>") == 2 and v.video is None
    # vLLM runs the export's HF image processor on the arrays, with the run's pixel budget
    proc = AutoImageProcessor.from_pretrained(export, **pixel_budget(ad, {"max_pixels": 28 * 28 * 40}))
    theirs = proc(images=[Image.fromarray(a) for a in v.images], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == hf["image_grid_thw"].tolist()
    torch.testing.assert_close(theirs["pixel_values"].float(), hf["pixel_values"].float(), rtol=0, atol=1e-5)
    assert v.as_input() == {"prompt": v.prompt, "multi_modal_data": {"image": v.images}}


@pytest.mark.parametrize("frame_mode,n", [("video_dup", 3), ("pair", 3), ("pair", 4)])
def test_video_request_matches_the_hf_path(tmp_path, frame_mode, n):
    out = _fake_export(tmp_path, frame_mode=frame_mode)
    ad = load_preparer(out)
    assert ad.frame_mode == frame_mode
    frames = [_rgb(60, 100, i) for i in range(n)]
    req = {"prompt": "How many chairs?", "images": None, "video": frames}
    hf = ad._encode_generation(req)
    v = build_vllm_request(ad, req)
    assert v.images is None and v.video.dtype == np.uint8 and v.video.ndim == 4
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)(v.prompt, add_special_tokens=False)["input_ids"]
    assert ids == collapse_media_pads(hf["input_ids"][0].tolist(), _pads(ad))
    # vLLM's Qwen video processing: normalise at the given size, two consecutive frames per temporal token
    size = v.video.shape[1:3]
    pix, grid = patchify(normalize_frames(list(v.video), size, ad.image_mean, ad.image_std), ad.patch, ad.merge,
                         ad.temporal)
    assert list(grid) == hf["video_grid_thw"][0].tolist()
    torch.testing.assert_close(pix, hf["pixel_values_videos"], rtol=0, atol=1e-6)
    assert len(v.video) == (2 * n if frame_mode == "video_dup" else n + n % 2)


def test_text_only_request(export):
    ad = load_preparer(export)
    v = build_vllm_request(ad, {"prompt": "2+2?", "images": None, "video": None})
    assert v.as_input() == {"prompt": v.prompt}
    assert v.prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_sampling_settings():
    assert sampling_kwargs({"max_new_tokens": 16, "do_sample": False}) == {"max_tokens": 16, "temperature": 0.0}
    assert sampling_kwargs({"max_new_tokens": 8, "do_sample": True, "temperature": 0.5, "top_p": 0.9}) == {
        "max_tokens": 8, "temperature": 0.5, "top_p": 0.9}
    with pytest.raises(VLLMBackendError, match="no vLLM mapping"):
        sampling_kwargs({"max_new_tokens": 8, "repetition_penalty": 1.1})


def test_generator_without_vllm_says_how_to_get_it(export):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed: the GPU path is the one to exercise")
    except ImportError:
        pass
    with pytest.raises(VLLMBackendError, match=r"pip install vllm.*GPU"):
        VLLMGenerator(export, {"max_new_tokens": 4, "do_sample": False})


def test_cli_backend_vllm_errors(tmp_path, export):
    from gasp_vlm.bench.fixtures import make_fixture
    from gasp_vlm.cli import main

    root = make_fixture("blink", tmp_path / "blink")
    base = ["eval", "-b", "blink", "--data", str(root), "--out", str(tmp_path / "o"), "--backend", "vllm"]
    res = CliRunner().invoke(main, base + ["--model", "tiny-qwen2.5-vl"])
    assert res.exit_code != 0 and "gasp export" in res.output and "--backend hf" in res.output
    try:
        import vllm  # noqa: F401
    except ImportError:
        res = CliRunner().invoke(main, base + ["--model", str(export)])
        assert res.exit_code != 0 and "pip install vllm" in res.output
