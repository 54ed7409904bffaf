"""``gasp eval --backend vllm``: the benchmark requests of the HF path, answered by vLLM.

vLLM loads a plain HF folder, so only ``gasp export`` folders (weights + the processor files and chat
template the adapter was trained with, models/processors.py) are accepted. Each request becomes the prompt
the export's chat template gives (the text the HF path tokenises, one pad token per image / video that
vLLM's processor expands) and ``multi_modal_data`` holding frames already resized to the size the HF path
picks, so vLLM's processor (given the same pixel budget) leaves them as they are and normalises them as
the HF path does. Qwen2-VL / Qwen2.5-VL only: their video tokenisation (``video_dup``: one frame per
temporal token) is reproduced by feeding every frame twice. Decoding: greedy, the benchmark's
max_new_tokens, all requests of a call in one ``LLM.generate`` (vLLM batches them itself).

Request building is pure and tested on CPU; the ``vllm`` calls need a GPU and are untested here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

VLLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
EXPORT_META = "gasp_export.json"  # train/export.py's marker (not imported: that pulls the training stack)


class VLLMBackendError(ValueError):
    """A model or setting the vLLM backend cannot serve; the message says what to do instead."""


def check_export(model: str | Path) -> str:
    """The family of a ``gasp export`` folder vLLM can serve; refuses anything else with the reason."""
    path = Path(model).expanduser()
    if not (path / EXPORT_META).is_file():
        raise VLLMBackendError(f"--backend vllm needs a folder written by `gasp export` (with {EXPORT_META}); "
                               f"{model!r} is not one. vLLM loads plain HF folders with their processor files and "
                               f"chat template, which `gasp export` writes: export the checkpoint, or use --backend hf")
    family = json.loads((path / EXPORT_META).read_text()).get("family")
    if family not in VLLM_FAMILIES:
        raise VLLMBackendError(f"{model}: a {family} export; --backend vllm covers {', '.join(VLLM_FAMILIES)} "
                               f"(their frame tokenisation is reproduced exactly); use --backend hf")
    return family


def load_preparer(export_dir: str | Path, dtype: str = "bfloat16") -> Any:
    """The export's adapter with its weights on the meta device (none read): tokenizer, chat format and
    pixel settings for building requests, at no memory cost (vLLM holds the real weights)."""
    from gasp_vlm.models import load_adapter

    check_export(export_dir)
    return load_adapter(export_dir, dtype=dtype, device="meta")


def _resize(im: Image.Image, size_hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 at ``size_hw``: the resize the HF path does (models/qwen.py ``normalize_frames``)."""
    arr = np.asarray(im.convert("RGB"))
    h, w = size_hw
    if arr.shape[:2] != (h, w):
        arr = np.asarray(Image.fromarray(arr).resize((w, h), resample=Image.BICUBIC))
    return arr


@dataclass
class VLLMRequest:
    """One vLLM input: ``as_input()`` is what ``LLM.generate`` takes."""

    prompt: str
    images: list[np.ndarray] | None
    video: np.ndarray | None  # (T, H, W, 3) uint8, already in the temporal layout the adapter uses

    def as_input(self) -> dict[str, Any]:
        mm: dict[str, Any] = {}
        if self.images:
            mm["image"] = self.images
        if self.video is not None:
            mm["video"] = self.video
        return {"prompt": self.prompt, **({"multi_modal_data": mm} if mm else {})}


def build_vllm_request(adapter: Any, request: dict) -> VLLMRequest:
    """A ``gasp eval`` request (dict(prompt, images, video, min/max_pixels)) -> the vLLM input the HF path's
    ``adapter.generate`` is equivalent to: chat-template prompt with one placeholder per medium, frames
    resized as the adapter resizes them, video frames laid out per its frame mode."""
    images, video = request.get("images") or [], request.get("video") or []
    min_p, max_p = request.get("min_pixels"), request.get("max_pixels")
    parts: list[dict] = [{"type": "image"} for _ in images] + ([{"type": "video"}] if video else [])
    parts.append({"type": "text", "text": request["prompt"]})
    prompt = adapter.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                   add_generation_prompt=True)
    imgs = [_resize(im, adapter._size(*np.asarray(im).shape[:2], min_p, max_p)) for im in images] or None
    clip = None
    if video:
        size = adapter._size(*np.asarray(video[0]).shape[:2], min_p, max_p)
        frames = [_resize(f, size) for f in video]
        if adapter.frame_mode == "video_dup":  # vLLM pairs consecutive frames per temporal token: one frame each
            frames = [f for f in frames for _ in range(adapter.temporal)]
        else:  # pair: an odd count repeats the last frame, as the adapter does
            frames += [frames[-1]] * (-len(frames) % adapter.temporal)
        clip = np.stack(frames)
    return VLLMRequest(prompt, imgs, clip)


def sampling_kwargs(generation: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's decoding settings -> vllm.SamplingParams kwargs (greedy unless it samples)."""
    known = {"max_new_tokens", "do_sample", "temperature", "top_p", "num_beams"}
    unknown = sorted(set(generation) - known)
    if unknown or int(generation.get("num_beams") or 1) != 1:
        raise VLLMBackendError(f"generation settings {unknown or ['num_beams']} have no vLLM mapping here")
    sample = bool(generation.get("do_sample"))
    out: dict[str, Any] = {"max_tokens": int(generation.get("max_new_tokens", 16)),
                           "temperature": float(generation.get("temperature", 1.0)) if sample else 0.0}
    if sample and generation.get("top_p") is not None:
        out["top_p"] = float(generation["top_p"])
    return out


def pixel_budget(adapter: Any, pixels: dict[str, int] | None) -> dict[str, int]:
    """The processor budget vLLM gets: the run's (else the adapter's), so frames the HF path already sized
    within it pass through its resize unchanged."""
    pixels = pixels or {}
    return {"min_pixels": int(pixels.get("min_pixels") or adapter.min_pixels),
            "max_pixels": int(pixels.get("max_pixels") or adapter.max_pixels)}


class VLLMGenerator:
    """A bench ``Generator`` over ``vllm.LLM`` for an exported model."""

    def __init__(self, export_dir: str | Path, generation: dict[str, Any], pixels: dict[str, int] | None = None,
                 dtype: str = "bfloat16", seed: int = 0, max_images: int = 16, **llm_kwargs: Any) -> None:
        self.adapter = load_preparer(export_dir, dtype)  # run.json's model_info reads it (family, pixels, dtype)
        self.sampling = sampling_kwargs(generation)
        try:
            import vllm
        except ImportError as e:
            raise VLLMBackendError("--backend vllm needs vLLM: `pip install vllm` (a CUDA GPU is required); "
                                   f"or use --backend hf ({e})") from None
        self._vllm = vllm
        self.llm = vllm.LLM(model=str(export_dir), dtype=dtype, seed=seed,
                            limit_mm_per_prompt={"image": max_images, "video": 1},
                            mm_processor_kwargs=pixel_budget(self.adapter, pixels), **llm_kwargs)

    def __call__(self, requests: list[dict]) -> list[str]:
        inputs = [build_vllm_request(self.adapter, r).as_input() for r in requests]
        outs = self.llm.generate(inputs, self._vllm.SamplingParams(**self.sampling), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

