"""Export: heads dropped, LoRA merged, a plain HF checkpoint the base class loads with the same logits."""

import json

import pytest
import torch

from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.recipe import GaspRecipe

torch.set_num_threads(1)


@pytest.mark.parametrize("preset, lora", [("tiny-qwen2.5-vl", True), ("tiny-llava-next-video", False)])
def test_export_loads_in_plain_transformers_with_identical_logits(tmp_path, preset, lora):
    from click.testing import CliRunner
    from transformers import LlavaNextVideoForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

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

    cls = {"tiny-qwen2.5-vl": Qwen2_5_VLForConditionalGeneration,
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
    prepared = recipe.micro_batch(7)[0].batch
    with torch.no_grad():
        trained = recipe.adapter.model(**prepared.inputs).logits
        exported = plain(**prepared.inputs).logits
        untrained = base(**prepared.inputs).logits
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)
    assert (untrained - trained).abs().max() > 1e-2  # training changed the model, so the check has teeth

    res = CliRunner().invoke(main, ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    assert res.exit_code != 0 and "already exists" in res.output
