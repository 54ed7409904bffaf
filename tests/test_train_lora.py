"""LoRA targets the LLM decoder and provably nothing of the vision side."""

import pytest

from gasp_vlm.models import load_adapter
from gasp_vlm.train.lora import VISION_MODULE_MARKERS, apply_lora, lora_module_names


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-internvl", "tiny-llava-onevision", "tiny-llava-next-video"])
def test_lora_touches_only_llm_decoder_linears(preset):
    ad = load_adapter(preset, overrides={"num_hidden_layers": 2})
    vision_linears = [n for n, _ in ad.model.named_modules()
                      if any(m in n for m in VISION_MODULE_MARKERS) and n.endswith(("q_proj", "gate_proj", "proj", "fc1"))]
    assert vision_linears, "the vision tower has linears a naive suffix list would hit"
    peft_model = apply_lora(ad.model, r=4, alpha=8)
    names = lora_module_names(peft_model)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 decoder layers
    assert all("language_model.layers." in n for n in names)
    assert not any(m in n for n in names for m in VISION_MODULE_MARKERS)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_pattern_that_hits_vision_is_refused():
    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="touches vision modules"):
        apply_lora(ad.model, r=4, target_pattern=r".*mlp\.(gate|up|down)_proj")
