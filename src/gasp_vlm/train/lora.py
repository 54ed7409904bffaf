"""LoRA on the LLM decoder only.

peft full-matches a string ``target_modules`` as a regex against module names. Suffix lists such as
["q_proj", ...] or "all-linear" would also hit the vision towers (Qwen's ViT has mlp.gate/up/down_proj,
LLaVA's CLIP has self_attn.q_proj), so the pattern is anchored on ``language_model.layers``.
"""

from __future__ import annotations

from torch import nn

LLM_LORA_PATTERN = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
VISION_MODULE_MARKERS = ("visual", "vision_tower", "multi_modal_projector", "vision_resampler")


def apply_lora(model: nn.Module, r: int = 64, alpha: int = 128, dropout: float = 0.0,
               target_pattern: str = LLM_LORA_PATTERN, use_rslora: bool = False) -> nn.Module:
    """Wrap ``model`` in a PeftModel with LoRA adapters on the LLM decoder's linear layers only."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern,
                     use_rslora=use_rslora, bias="none")
    peft_model = get_peft_model(model, cfg)
    touched = lora_module_names(peft_model)
    bad = [n for n in touched if any(m in n for m in VISION_MODULE_MARKERS)]
    if bad:  # a custom pattern must never adapt the (frozen) vision side
        raise ValueError(f"LoRA pattern {target_pattern!r} touches vision modules, e.g. {bad[:3]}")
    if not touched:
        raise ValueError(f"LoRA pattern {target_pattern!r} matched no module")
    return peft_model


def lora_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry LoRA adapters."""
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0]
