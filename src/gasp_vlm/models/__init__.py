"""VLM adapters: one interface over Qwen3-VL, Qwen2.5-VL, Qwen2-VL, InternVL3, LLaVA-OneVision
and LLaVA-NeXT-Video (see docs/DESIGN.md)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from gasp_vlm.models.base import ModelLoadError, PreparedBatch, VLMAdapter
from gasp_vlm.models.capture import CaptureResult
from gasp_vlm.models.layout import FrameTransform, TokenLayout
from gasp_vlm.models.internvl import InternVLAdapter
from gasp_vlm.models.llava_next_video import LlavaNextVideoAdapter
from gasp_vlm.models.llava_onevision import LlavaOnevisionAdapter
from gasp_vlm.models.presets import PRESETS
from gasp_vlm.models.qwen import Qwen2VLAdapter, QwenVLAdapter
from gasp_vlm.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[VLMAdapter]] = {
    cls.family: cls for cls in (QwenVLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, InternVLAdapter, LlavaOnevisionAdapter,
                LlavaNextVideoAdapter)
}

__all__ = ["ADAPTERS", "PRESETS", "CaptureResult", "FrameTransform", "ModelLoadError", "PreparedBatch",
           "TokenLayout", "VLMAdapter", "load_adapter", "family_of"]


def _parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(table)}")
    return table[dtype]


def family_of(config_or_dir: Any) -> str:
    """Adapter family of an HF config (object, dict, or checkpoint directory)."""
    if isinstance(config_or_dir, (str, Path)):
        cfg_path = Path(config_or_dir) / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{config_or_dir}: no config.json — not a Hugging Face model directory")
        try:
            model_type = json.loads(cfg_path.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from e
    elif isinstance(config_or_dir, dict):
        model_type = config_or_dir.get("model_type")
    else:
        model_type = getattr(config_or_dir, "model_type", None)
    for fam, cls in ADAPTERS.items():
        if model_type in cls.hf_model_types:
            return fam
    raise ModelLoadError(f"unsupported model family {model_type!r}; gasp-vlm supports "
                         f"{sorted(t for c in ADAPTERS.values() for t in c.hf_model_types)}")


PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def _processor_configs(path: Path) -> dict[str, dict]:
    """The processor config files of a checkpoint directory, parsed (read once for the check and the settings)."""
    out = {}
    for name in PROCESSOR_FILES:
        f = path / name
        if f.is_file():
            try:
                out[name] = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{f}: invalid JSON ({e})") from e
    return out


def _check_processor(path: Path, cls: type[VLMAdapter], configs: dict[str, dict]) -> None:
    """Refuse a processor config written for another family or another tower (checked before any weight
    is read): its pixels would be cut into patches the model does not expect (a Qwen2.5-VL processor,
    14 px, beside a Qwen3-VL model, 16 px)."""
    patch = (json.loads((path / "config.json").read_text()).get("vision_config") or {}).get("patch_size")
    for name, cfg in configs.items():
        f = path / name
        theirs = cfg.get("processor_class")
        if theirs and theirs != cls.processor_class:
            raise ModelLoadError(f"{f}: processor_class {theirs!r}, but config.json is a {cls.family} model "
                                 f"(processor {cls.processor_class!r}); copy the processor files of the same model")
        if patch is not None and "patch_size" in cfg and int(cfg["patch_size"]) != int(patch):
            raise ModelLoadError(f"{f}: patch_size {cfg['patch_size']}, but the model's vision tower uses {patch} "
                                 f"(a processor from another model?)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer
MODEL_FOLDER = ("a Hugging Face model folder holds config.json, the weights (*.safetensors), the tokenizer "
                "(tokenizer.json or tokenizer.model or vocab.json) and the image processor "
                "(preprocessor_config.json); `gasp export` writes all of them")


def _check_complete(path: Path, configs: dict[str, dict], saved: dict) -> None:
    """Refuse a model folder whose tokenizer or image processor is missing, before any weight is read:
    without the processor the pixel settings (normalisation, pixel budget) would silently fall back to the
    family's defaults, so a base model and its GASP export could be scored at different settings."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"{path}: no tokenizer ({' / '.join(TOKENIZER_FILES)}); {MODEL_FOLDER}. Copy the "
                             f"tokenizer files of the model it came from")
    if "preprocessor_config.json" not in configs and not saved:  # gasp_adapter.json carries gasp's own settings
        raise ModelLoadError(f"{path}: no preprocessor_config.json, so the model's image processor cannot be "
                             f"found; {MODEL_FOLDER}. Copy it from the model it came from")


def _preprocessor_settings(cls: type[VLMAdapter], configs: dict[str, dict]) -> dict:
    """Pixel settings a checkpoint's processor config fixes (mean/std, and what the family reads:
    Qwen's min/max pixels, InternVL's tile counts)."""
    out: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        if name in configs:
            out.update(cls.processor_settings(name, configs[name]))
    return out


def load_adapter(name_or_path: str | Path, dtype: Any = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa", seed: int = 0, frame_mode: str | None = None,
                 overrides: dict | None = None, trust_remote_code: bool = False, **adapter_kwargs) -> VLMAdapter:
    """A preset name, a local HF directory, or a hub id -> adapter (model in eval mode on ``device``).

    Real checkpoints load with ``from_pretrained`` (safetensors only, no remote code unless asked);
    ``device="meta"`` reads no weights (the tokenizer and pixel settings of a checkpoint served elsewhere).
    """
    dtype = _parse_dtype(dtype)
    name = str(name_or_path)
    if name in PRESETS:
        builder, cls, kw = PRESETS[name]
        model, tok = builder(seed=seed, overrides=overrides, dtype=dtype)
        model.config._attn_implementation = attn_implementation
        adapter = cls(model.to(device), tok, preset=name, frame_mode=frame_mode, **{**kw, **adapter_kwargs})
        return adapter
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: not a directory (expected a Hugging Face model directory or a preset: "
                                 f"{sorted(PRESETS)})")
        family = family_of(path)
        configs = _processor_configs(path)
        _check_processor(path, ADAPTERS[family], configs)
        note = path / "gasp_adapter.json"
        saved = json.loads(note.read_text()) if note.is_file() else {}
        _check_complete(path, configs, saved)
        src = str(path)
    elif name.count("/") == 1 and not name.startswith((".", "/")):
        from transformers import AutoConfig  # hub id: resolved from the local HF cache or the hub

        try:
            family = family_of(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))
        except OSError as e:
            raise ModelLoadError(f"cannot load {name!r}: not a preset, not a local directory, and the hub/cache "
                                 f"lookup failed ({e})") from e
        saved, src, configs = {}, name, {}
    else:
        raise ModelLoadError(f"{name!r}: no such directory and not a preset (presets: {sorted(PRESETS)})")

    import transformers
    from transformers import AutoProcessor, AutoTokenizer

    cls = ADAPTERS[family]
    model_cls = getattr(transformers, cls.hf_class)
    if str(device) == "meta":  # no weights read: tokenizer + pixel settings only (vLLM's request builder)
        with torch.device("meta"):
            model = model_cls._from_config(model_cls.config_class.from_pretrained(src), dtype=dtype)
    else:
        model = model_cls.from_pretrained(src, dtype=dtype, attn_implementation=attn_implementation,
                                          use_safetensors=True, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    try:  # the full HF processor needs torchvision for video; gasp-vlm prepares pixels itself
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - optional
        processor = None
    kw = _preprocessor_settings(cls, configs)
    params = inspect.signature(cls.__init__).parameters  # the adapter's extra_state comes back through __init__
    kw.update({k: v for k, v in saved.items() if k in params and k not in ("frame_mode", "preset", "image_mean",
                                                                            "image_std")})
    kw.update(adapter_kwargs)
    return cls(model.to(device).eval(), tok, processor=processor, preset=saved.get("preset"),
               frame_mode=frame_mode or saved.get("frame_mode"), **kw)
