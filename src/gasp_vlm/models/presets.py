"""Tiny random-initialised presets of the real architectures, built in code (nothing downloaded).

They use the real HF model classes with small sizes, so every code path (vision tower, M-RoPE,
pooling, GQA, LoRA targeting, save/load) is the one a 7B checkpoint takes.
Sizes: LLM hidden 256, 8 layers, 4 query / 2 kv heads (GQA), head_dim 64 (~5 M LLM parameters);
vision towers of depth 2; 224 x 224 frames give 8 x 8 = 64 tokens per frame (28 px per token).
Any config field can be overridden, e.g. ``load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 2})``
(text fields) or ``{"vision.depth": 1}`` (vision fields).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gasp_vlm.models.internvl import INTERNVL_SPECIAL_TOKENS, InternVLAdapter
from gasp_vlm.models.llava_next_video import LLAVA_SPECIAL_TOKENS, LlavaNextVideoAdapter
from gasp_vlm.models.llava_onevision import ONEVISION_SPECIAL_TOKENS, LlavaOnevisionAdapter
from gasp_vlm.models.qwen import QWEN_SPECIAL_TOKENS, Qwen2VLAdapter, QwenVLAdapter
from gasp_vlm.models.qwen3_vl import Qwen3VLAdapter
from gasp_vlm.models.tokenizer import build_byte_tokenizer

TEXT_DEFAULTS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6)


def _split_overrides(overrides: dict[str, Any] | None) -> tuple[dict, dict]:
    text, vision = {}, {}
    for k, v in (overrides or {}).items():
        (vision if k.startswith("vision.") else text)[k.removeprefix("vision.")] = v
    return text, vision


def _qwen_tokenizer():
    return build_byte_tokenizer(QWEN_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _vocab(tok) -> int:
    return (len(tok) + 63) // 64 * 64


def _qwen_ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def _text_cfg(tok, text_over: dict, rope: dict) -> dict:
    cfg = dict(TEXT_DEFAULTS, vocab_size=_vocab(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, rope_parameters=rope)
    cfg.update(text_over)
    return cfg


def _mrope(head_dim: int) -> dict:
    # mrope sections (t, h, w) must sum to head_dim / 2; the real 7B uses [16, 24, 24] for 128.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [t, h, half - t - h]}


def _build_tiny_qwen(config_cls, model_cls, vision: dict, seed: int, overrides: dict | None, dtype,
                     rope: dict | None = None):
    text_over, vis_over = _split_overrides(overrides)
    tok = _qwen_tokenizer()
    text = _text_cfg(tok, text_over, {})
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {**_mrope(head_dim), **(rope or {})}
    if config_cls.__name__ == "Qwen3VLConfig":  # its text config states head_dim (default 128)
        text.setdefault("head_dim", head_dim)
    vision = {**vision, **vis_over}
    # the tower's merger projects to the LLM width
    vision[("out_hidden_size" if "out_hidden_size" in vision else "hidden_size")] = text["hidden_size"]
    cfg = config_cls(text_config=text, vision_config=vision, **_qwen_ids(tok))
    torch.manual_seed(seed)
    return model_cls(cfg).to(dtype).eval(), tok


def build_tiny_qwen2_5_vl(seed: int = 0, overrides: dict | None = None, dtype=torch.float32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=None,
                  fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2)
    return _build_tiny_qwen(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, vision, seed, overrides, dtype)


def build_tiny_qwen2_vl(seed: int = 0, overrides: dict | None = None, dtype=torch.float32):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    # Qwen2-VL names the tower width embed_dim and the merger output hidden_size.
    vision = dict(depth=2, embed_dim=128, hidden_size=None, mlp_ratio=2, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return _build_tiny_qwen(Qwen2VLConfig, Qwen2VLForConditionalGeneration, vision, seed, overrides, dtype)


def build_tiny_qwen3_vl(seed: int = 0, overrides: dict | None = None, dtype=torch.float32):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    # DeepStack from both tower layers into LLM layers 0 and 1 (the 8B: vision layers 8/16/24 -> LLM 0..2);
    # 64 learned position embeddings = an 8 x 8 grid of 16 px patches, interpolated to any frame size
    vision = dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=None,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 1])
    return _build_tiny_qwen(Qwen3VLConfig, Qwen3VLForConditionalGeneration, vision, seed, overrides, dtype,
                            rope={"rope_theta": 5e6, "mrope_interleaved": True})


def build_tiny_llava_next_video(seed: int = 0, overrides: dict | None = None, dtype=torch.float32):
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    text_over, vis_over = _split_overrides(overrides)
    tok = build_byte_tokenizer(LLAVA_SPECIAL_TOKENS, eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"bos_token": "<s>", "unk_token": "<unk>"})
    text = _text_cfg(tok, text_over, {"rope_type": "default", "rope_theta": 10000.0})
    text.update(model_type="llama", bos_token_id=tok.bos_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, image_size=224, patch_size=14, projection_dim=128)
    vision.update(vis_over)
    c = tok.convert_tokens_to_ids
    cfg = LlavaNextVideoConfig(text_config=text, vision_config=vision, image_token_index=c("<image>"),
                               video_token_index=c("<video>"), vision_feature_layer=-1,
                               spatial_pool_stride=2, spatial_pool_mode="average",
                               # the 7B's AnyRes grids (1x2, 2x1, 2x2, 3x1, 1x3 tiles) in this tower's 224 px tiles
                               image_grid_pinpoints=[[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]])
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(cfg).to(dtype).eval()
    return model, tok


def build_tiny_internvl(seed: int = 0, overrides: dict | None = None, dtype=torch.float32):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text_over, vis_over = _split_overrides(overrides)
    tok = build_byte_tokenizer(INTERNVL_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text = _text_cfg(tok, text_over, {"rope_type": "default", "rope_theta": 1e6})
    text.update(model_type="qwen2")  # InternVL3's LLM is a Qwen2.5
    # 224 px tiles of 14 px patches, 2 x 2 pixel shuffle: 8 x 8 tokens of 28 px per tile (the 8B: 448 -> 16 x 16)
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  image_size=[224, 224], patch_size=[14, 14])
    vision.update(vis_over)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(cfg).to(dtype).eval(), tok


def build_tiny_llava_onevision(seed: int = 0, overrides: dict | None = None, dtype=torch.float32):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    text_over, vis_over = _split_overrides(overrides)
    tok = build_byte_tokenizer(ONEVISION_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    text = _text_cfg(tok, text_over, {"rope_type": "default", "rope_theta": 1e6})
    text.update(model_type="qwen2")
    # 112 px SigLIP frames of 14 px patches: 8 x 8 patches, pooled to 4 x 4 tokens of 28 px per video frame
    # (the 7B: 384 px, 27 x 27 -> 14 x 14 of 27 px); AnyRes tiles of 112 up to 3 x 3 (the 7B: 384, 6 x 6)
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, image_size=112, patch_size=14, vision_use_head=False)
    vision.update(vis_over)
    s = vision["image_size"]
    c = tok.convert_tokens_to_ids
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=c("<image>"),
                               video_token_index=c("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                               image_grid_pinpoints=[[s * i, s * j] for i in range(1, 4) for j in range(1, 4)])
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).to(dtype).eval(), tok


# name -> (builder, adapter class, adapter kwargs)
PRESETS: dict[str, tuple[Callable, type, dict]] = {
    "tiny-qwen2.5-vl": (build_tiny_qwen2_5_vl, QwenVLAdapter, {"min_pixels": 56 * 56, "max_pixels": 224 * 224}),
    "tiny-qwen2-vl": (build_tiny_qwen2_vl, Qwen2VLAdapter, {"min_pixels": 56 * 56, "max_pixels": 224 * 224}),
    "tiny-qwen3-vl": (build_tiny_qwen3_vl, Qwen3VLAdapter, {"min_pixels": 64 * 64, "max_pixels": 224 * 224}),
    "tiny-internvl": (build_tiny_internvl, InternVLAdapter, {"max_tiles": 4}),
    "tiny-llava-next-video": (build_tiny_llava_next_video, LlavaNextVideoAdapter, {}),
    "tiny-llava-onevision": (build_tiny_llava_onevision, LlavaOnevisionAdapter, {}),
}
