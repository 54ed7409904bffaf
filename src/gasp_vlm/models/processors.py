"""Processor files written beside an exported model, so the tools that score models load it as they load
the base checkpoint: ``AutoProcessor.from_pretrained(dir)`` (lmms-eval, VLMEvalKit, vLLM) needs the
image processor, the video processor, the chat template and the generation config, not just weights.

Every value comes from the adapter the model was trained with (its pixel budget, normalisation, token
grid, chat format), so the exported processor produces the inputs the adapter's own pixel path does
(tests compare both). Written from the real transformers classes where they need no extra library;
the video processor configs (whose classes need torchvision to instantiate) are plain JSON with the
fields those classes read.

Chat templates: written here for the adapters' own chat formats (models/qwen.py, llava_next_video.py);
HF's template engine runs with trim_blocks/lstrip_blocks, so every character of output comes from a
``{{ ... }}`` expression and no template whitespace leaks into the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

def chatml_template(system: str | None, image: str, video: str) -> str:
    """A ChatML chat template: a default system turn (unless ``system`` is None or the conversation starts
    with one), each message as <|im_start|>role\\n ... <|im_end|>\\n, an image / video part rendered by the
    jinja expressions ``image`` / ``video`` (the placeholder the family's processor expands)."""
    default = "" if system is None else (
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\n" + system + "<|im_end|>\\n' }}"
        "{%- endif -%}")
    return ("{%- for message in messages -%}" + default +
            "{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] == 'image' -%}{{ " + image + " }}"
            "{%- elif part['type'] == 'video' -%}{{ " + video + " }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
            "{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{ '<|im_end|>\\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


# Qwen2/2.5-VL: images/videos as vision blocks holding one pad token the processor expands to the frame's
# token count; Qwen3-VL the same without a default system turn (its processor also replaces a video's
# block by one "<t seconds><|vision_start|>pads<|vision_end|>" block per temporal slot)
QWEN_CHAT_TEMPLATE = chatml_template("You are a helpful assistant.", "'<|vision_start|><|image_pad|><|vision_end|>'",
                                     "'<|vision_start|><|video_pad|><|vision_end|>'")
QWEN3_VL_CHAT_TEMPLATE = chatml_template(None, "'<|vision_start|><|image_pad|><|vision_end|>'",
                                         "'<|vision_start|><|video_pad|><|vision_end|>'")

# LLaVA-NeXT-Video (Vicuna) format: "{system} USER: <video>\n{text} ASSISTANT: {answer}</s>"
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}"
    "{%- else -%}"
    "{%- if loop.first -%}{{ 'A chat between a curious human and an artificial intelligence assistant.' }}"
    "{%- endif -%}"
    "{{ ' USER: ' if message['role'] == 'user' else ' ASSISTANT: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<video>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)

# LLaVA-OneVision (LLaVA's qwen_1_5 conversation): media first, images as "<image> <image>\\n", a video as
# "<video>\\n" (the processor expands each to its tokens), then the text
ONEVISION_CHAT_TEMPLATE = chatml_template(
    "You are a helpful assistant.",
    "'<image>' + (' ' if (loop.nextitem is defined and loop.nextitem['type'] == 'image') else '\\n')", "'<video>\\n'")


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _patch_json(path: Path, **fields: Any) -> None:
    _write_json(path, {**json.loads(path.read_text()), **fields})


# what every exported video processor does to the frames it is given (callers pick the frames, as in training)
VIDEO_STEPS = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "do_convert_rgb": True, "do_sample_frames": False}


def write_processor_files(adapter, out_dir: str | Path) -> list[str]:
    """Write the processor side of an export into ``out_dir`` (model + tokenizer already there) and
    return the file names written. Pixel settings are the adapter's (the budget it was trained with)."""
    out = Path(out_dir)
    family = adapter.family
    proc_cls = adapter.processor_class
    if not proc_cls:
        raise ValueError(f"no processor export for family {family!r}: its adapter names no processor_class")
    processor: dict | None = None
    if family.startswith("qwen"):
        from transformers import Qwen2VLImageProcessorPil

        pixels = dict(min_pixels=adapter.min_pixels, max_pixels=adapter.max_pixels, patch_size=adapter.patch,
                      temporal_patch_size=adapter.temporal, merge_size=adapter.merge,
                      image_mean=list(adapter.image_mean), image_std=list(adapter.image_std))
        Qwen2VLImageProcessorPil(**pixels).save_pretrained(out)
        video = {**pixels, "video_processor_type": "Qwen2VLVideoProcessor",
                 "size": {"shortest_edge": adapter.min_pixels, "longest_edge": adapter.max_pixels}}
        template = QWEN_CHAT_TEMPLATE
        if family == "qwen3_vl":  # its video processor reads the clip's fps for the timestamps
            video.update(video_processor_type="Qwen3VLVideoProcessor", fps=adapter.video_fps)
            template = QWEN3_VL_CHAT_TEMPLATE
    elif family == "internvl":
        from transformers import GotOcr2ImageProcessorPil

        tile = {"height": adapter.tile, "width": adapter.tile}
        pixels = dict(size=tile, image_mean=list(adapter.image_mean), image_std=list(adapter.image_std))
        GotOcr2ImageProcessorPil(**pixels, crop_to_patches=True, min_patches=adapter.min_tiles,
                                 max_patches=adapter.max_tiles).save_pretrained(out)
        video = {**pixels, "video_processor_type": "InternVLVideoProcessor", "resample": 3}
        processor = {"image_seq_length": adapter.grid * adapter.grid}
        # InternVL's own system message; an image part is <IMG_CONTEXT>, which InternVLProcessor expands to
        # <img><IMG_CONTEXT> x N</img>; a video part is <video>, expanded to "Frame{i}: <img>...</img>" lines
        template = chatml_template(adapter.system_prompt, "'<IMG_CONTEXT>\\n'", "'<video>\\n'")
        cfg_path = out / "tokenizer_config.json"
        if cfg_path.is_file():  # the names InternVLProcessor reads its tokens by
            _patch_json(cfg_path, extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    elif family == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessorPil

        pixels = dict(size={"height": adapter.size, "width": adapter.size}, image_mean=list(adapter.image_mean),
                      image_std=list(adapter.image_std))
        LlavaOnevisionImageProcessorPil(**pixels, image_grid_pinpoints=adapter.pinpoints).save_pretrained(out)
        video = {**pixels, "video_processor_type": "LlavaOnevisionVideoProcessor", "resample": 3}
        processor = {"num_image_tokens": adapter.patches ** 2, "vision_feature_select_strategy": "full",
                     "vision_aspect_ratio": f"anyres_max_{adapter.max_tiles}"}
        template = ONEVISION_CHAT_TEMPLATE
    else:
        from transformers import LlavaNextImageProcessorPil

        crop = {"height": adapter.crop, "width": adapter.crop}
        pixels = dict(size={"shortest_edge": adapter.crop}, crop_size=crop, do_center_crop=True,
                      image_mean=list(adapter.image_mean), image_std=list(adapter.image_std))
        cfg = adapter.model.config
        # AnyRes grids as the model's config has them: the model splits an image's tiles by the same list
        LlavaNextImageProcessorPil(**pixels, image_grid_pinpoints=cfg.image_grid_pinpoints).save_pretrained(out)
        video = {**pixels, "video_processor_type": "LlavaNextVideoVideoProcessor", "resample": 3}
        # LlavaNextVideoProcessor counts a clip's <video> tokens from these (without them it cannot expand
        # a video prompt): CLIP patches, the 'default' strategy that drops the CLS token (+1 for images)
        processor = {"patch_size": adapter.patch, "num_additional_image_tokens": 1,
                     "vision_feature_select_strategy": cfg.vision_feature_select_strategy}
        template = LLAVA_CHAT_TEMPLATE
    files = ["preprocessor_config.json", "video_preprocessor_config.json", "chat_template.jinja",
             "generation_config.json"]
    _patch_json(out / "preprocessor_config.json", processor_class=proc_cls)
    _write_json(out / "video_preprocessor_config.json", {**video, **VIDEO_STEPS, "processor_class": proc_cls})
    if processor is not None:  # processor-level settings (InternVL's tokens per tile, OneVision's AnyRes, LLaVA's patches)
        _write_json(out / "processor_config.json", {"processor_class": proc_cls, **processor})
        files.append("processor_config.json")
    (out / "chat_template.jinja").write_text(template)
    # the tokenizer carries the template too (tokenizer.apply_chat_template without a processor)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        _patch_json(cfg_path, chat_template=template, processor_class=proc_cls)
    _write_generation_config(adapter, out)
    return files


def _write_generation_config(adapter, out: Path) -> None:
    """Greedy decoding that stops at the chat format's end-of-turn token (what the benchmarks use)."""
    from transformers import GenerationConfig

    tok = adapter.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    GenerationConfig(do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id).save_pretrained(out)
