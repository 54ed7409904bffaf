"""Export: heads dropped, LoRA merged, a plain HF checkpoint the base class loads with the same logits."""

import json

import pytest
import torch

from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.recipe import GaspRecipe

torch.set_num_threads(1)


@pytest.mark.parametrize("preset, lora", [("tiny-qwen2.5-vl", True), ("tiny-qwen3-vl", True), ("tiny-internvl", True),
                                         ("tiny-llava-onevision", True), ("tiny-llava-next-video", False)])
def test_export_loads_in_plain_transformers_with_identical_logits(tmp_path, preset, lora):
    from click.testing import CliRunner
    from transformers import (InternVLForConditionalGeneration, LlavaNextVideoForConditionalGeneration,
                              LlavaOnevisionForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                              Qwen3VLForConditionalGeneration)

    from gasp_vlm.cli import main
    from gasp_vlm.models import load_adapter

    cfg = config_from_dict({
        "model": {"name": preset, "overrides": {"num_hidden_layers": 2}},
        "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "gasp": {"d_hidden": 32, "d_out": 16, "calib_tokens": 0},
        "optim": {"lr": 3e-2, "max_steps": 2},  # a large lr so the trained weights clearly differ from the base
        "data": {"geometry": ["toy"], "toy_sequences": 4, "frames_min": 2, "frames_max": 2},
        "report_to": []})
    recipe = GaspRecipe(cfg, tmp_path / "run", progress=False)
    ckpt = recipe.run()
    res = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output

    cls = {"tiny-qwen2.5-vl": Qwen2_5_VLForConditionalGeneration, "tiny-qwen3-vl": Qwen3VLForConditionalGeneration,
           "tiny-internvl": InternVLForConditionalGeneration,
           "tiny-llava-onevision": LlavaOnevisionForConditionalGeneration,
           "tiny-llava-next-video": LlavaNextVideoForConditionalGeneration}[preset]
    plain = cls.from_pretrained(tmp_path / "hf").eval()  # no gasp-vlm code involved in loading
    base = load_adapter(preset, overrides={"num_hidden_layers": 2}).model
    plain_names = {n: p.shape for n, p in plain.state_dict().items()}
    assert plain_names == {n: p.shape for n, p in base.state_dict().items()}  # same names, shapes, count
    assert not any("lora" in n or "heads" in n for n in plain_names)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in base.parameters())
    meta = json.loads((tmp_path / "hf" / "gasp_export.json").read_text())
    assert meta["step"] == 2 and meta["heads_dropped"] and meta["source_checkpoint"] == str(ckpt.resolve())

    # the trained model as it was in training (LoRA unmerged), heads dropped, on a fresh batch
    recipe.gasp_model.eval()
    prepared = recipe.micro_batch(7)[0][0].batch
    with torch.no_grad():
        trained = recipe.adapter.model(**prepared.inputs).logits
        exported = plain(**prepared.inputs).logits
        untrained = base(**prepared.inputs).logits
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)
    assert (untrained - trained).abs().max() > 1e-2  # training changed the model, so the check has teeth

    res = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    assert res.exit_code != 0 and "already exists" in res.output


def _export(tmp_path, preset: str):
    cfg = config_from_dict({
        "model": {"name": preset, "overrides": {"num_hidden_layers": 1}},
        "lora": {"r": 4, "alpha": 8}, "gasp": {"d_hidden": 16, "d_out": 8, "calib_tokens": 0},
        "optim": {"max_steps": 1}, "data": {"geometry": ["toy"], "toy_sequences": 2, "frames_min": 2, "frames_max": 2},
        "report_to": []})
    from gasp_vlm.train.export import export_checkpoint

    ckpt = GaspRecipe(cfg, tmp_path / "run", progress=False).run()
    return export_checkpoint(ckpt, tmp_path / "hf")


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl"])
def test_export_ships_the_processor_the_model_was_trained_with(tmp_path, preset):
    """The export's image processor, chat template and generation config (loaded with plain transformers)
    produce exactly the inputs of the adapter's own generation path: same pixels, same token ids."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

    from gasp_vlm.models import load_adapter

    out = _export(tmp_path, preset)
    ad = load_adapter(out)  # the export, as gasp eval loads it
    files = json.loads((out / "gasp_export.json").read_text())["processor_files"]
    assert all((out / f).is_file() for f in files) and "chat_template.jinja" in files
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    ours = ad._encode_generation({"prompt": "What is on the table?", "images": [image]})

    ip = AutoImageProcessor.from_pretrained(out)
    theirs = ip(images=[image], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == ours["image_grid_thw"].tolist()
    torch.testing.assert_close(theirs["pixel_values"].float(), ours["pixel_values"].float(), rtol=0, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is on the table?"}]}], add_generation_prompt=True, tokenize=False)
    n = int(theirs["image_grid_thw"].prod()) // ip.merge_size ** 2  # what the processor expands the pad to
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)["input_ids"]
    assert ids == ours["input_ids"][0].tolist()
    video = json.loads((out / "video_preprocessor_config.json").read_text())
    assert (video["min_pixels"], video["max_pixels"]) == (ad.min_pixels, ad.max_pixels) and not video["do_sample_frames"]
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") and gen.do_sample is False


def test_llava_export_chat_template_matches_the_adapter(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    from gasp_vlm.models import load_adapter

    out = _export(tmp_path, "tiny-llava-next-video")
    ad = load_adapter(out)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "What happens?"}]}], add_generation_prompt=True, tokenize=False)
    n = ad.grid * ad.grid * 3  # 3 frames of pooled tokens
    ids = tok(text.replace("<video>", "<video>" * n), add_special_tokens=False)["input_ids"]
    assert ids == ad._chat_ids(n, "What happens?", None)[0]
    ip = AutoImageProcessor.from_pretrained(out)
    assert ip.crop_size == {"height": ad.crop, "width": ad.crop} and list(ip.image_mean) == list(ad.image_mean)


@pytest.mark.ecosystem
@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-internvl",
                                    "tiny-llava-onevision", "tiny-llava-next-video"])
def test_export_loads_with_auto_processor_and_generates(tmp_path, preset):
    """The ecosystem path (AutoProcessor + AutoModelForImageTextToText, what lmms-eval / VLMEvalKit / vLLM call)
    on every family's export, from an image and from a video. transformers' video processors need
    torchvision, which does not import beside this machine's CPU torch 2.13: `make test-ecosystem` runs
    these in a venv with torch 2.14.1 + torchvision 0.29.1."""
    pytest.importorskip("torchvision")
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = _export(tmp_path, preset)
    proc = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(proc).__name__ == json.loads((out / "preprocessor_config.json").read_text())["processor_class"]
    image = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))

    def ask(kind: str, media: dict):
        msgs = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "Hi"}]}]
        inputs = proc(text=[proc.apply_chat_template(msgs, add_generation_prompt=True)], return_tensors="pt", **media)
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert ids.shape[1] > inputs["input_ids"].shape[1]  # the model consumed the media and generated
        return inputs

    img = ask("image", {"images": [image]})
    vid = ask("video", {"videos": [[np.asarray(image)] * 4]})
    # the processor expanded the media into the model's own placeholder tokens
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    video_id = getattr(cfg, "video_token_id", None) or getattr(cfg, "video_token_index", None) or image_id
    assert int((img["input_ids"] == image_id).sum()) > 1
    assert int((vid["input_ids"] == video_id).sum()) > 1