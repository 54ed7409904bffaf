"""Qwen2-VL and Qwen2.5-VL adapters.

Token layout facts (checked by tests/test_models_layout.py with pixel-encoded frames):
- The vision tower embeds (temporal 2) x 14 x 14 patches and merges 2 x 2 of them into one LLM token,
  so an LLM token covers 28 x 28 input pixels of *two* consecutive frames; tokens come out in raster
  order over (t, h/28, w/28) (Qwen2.5's window permutation is undone inside the tower).
- Frame modes:
  ``video_dup`` (default for GASP): every frame is fed twice, so each temporal slot is exactly one
      frame and video M-RoPE semantics are kept (the ViT does 2x the work, the LLM sees T slots).
  ``pair``: the native video path; slot g covers frames (2g, 2g+1), an odd count repeats the last frame.
      Targets must then require visibility in both frames of a slot.
  ``images``: each frame is its own image (its own vision_start/end block, image M-RoPE).
- 3-D M-RoPE positions are only built when ``mm_token_type_ids`` reaches the model (transformers 5.x);
  without it Qwen silently falls back to 1-D positions. ``second_per_grid_ts`` is set to 1.0 so
  temporal ids stay distinct (an fps > 2 value is truncated to 0 in some versions).

Pixels are prepared here (smart resize to multiples of 28, bicubic, CLIP normalisation, patch
flattening) exactly as the HF image processor does — tests compare the two — so the same code serves
real checkpoints and the tiny presets, and needs no torchvision.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from gasp_vlm.models.base import PreparedBatch, VLMAdapter, pad_sequences, text_only_layout
from gasp_vlm.models.layout import FrameTransform, TokenLayout

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM_PROMPT = "You are a helpful assistant."
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Nearest size with both sides multiples of ``factor`` and area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def normalize_frames(frames: Sequence[np.ndarray], size_hw: tuple[int, int],
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 (H, W, 3) frames -> float32 (T, 3, h, w): bicubic resize, /255, normalise."""
    h, w = size_hw
    out = []
    for f in frames:
        if f.shape[:2] != (h, w):
            f = np.asarray(Image.fromarray(f).resize((w, h), resample=Image.BICUBIC))
        out.append(torch.from_numpy(np.array(f, dtype=np.uint8)).permute(2, 0, 1))  # copy: frames may be read-only
    x = torch.stack(out).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def patchify(frames: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, 3, H, W) with T a multiple of ``temporal`` -> (grid_t*gh*gw, 3*temporal*patch*patch) rows in the
    vision tower's order: temporal group, merge-block row, merge-block col, inner row, inner col."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, bh, bw, mh, mw, c, tp, ph, pw
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


class QwenVLAdapter(VLMAdapter):
    """Qwen2.5-VL (family ``qwen2_5_vl``); Qwen2-VL subclasses it."""

    family = "qwen2_5_vl"
    hf_model_types = ("qwen2_5_vl",)
    default_frame_mode = "video_dup"
    frame_modes = ("video_dup", "pair", "images")
    timed_video = True  # video inputs carry second_per_grid_ts (1.0: distinct temporal ids)
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    system_prompt: str | None = SYSTEM_PROMPT  # the chat template's default system turn (None: no turn)
    patch = 14
    merge = 2
    temporal = 2

    def __init__(self, model, tokenizer, processor=None, preset=None, frame_mode=None,
                 min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD) -> None:
        super().__init__(model, tokenizer, processor, preset, frame_mode)
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        tid = tokenizer.convert_tokens_to_ids
        self.ids = {name: tid(tok) for name, tok in [
            ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"), ("image_pad", "<|image_pad|>"), ("video_pad", "<|video_pad|>")]}
        cfg = model.config
        if self.ids["video_pad"] != cfg.video_token_id or self.ids["image_pad"] != cfg.image_token_id:
            raise ValueError(f"tokenizer and config disagree on the vision token ids "
                             f"({self.ids['video_pad']} vs {cfg.video_token_id})")

    def vision_module(self):
        return self.model.model.visual

    def extra_state(self) -> dict:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}

    @classmethod
    def processor_settings(cls, name: str, cfg: dict) -> dict:
        out = super().processor_settings(name, cfg)
        size = cfg.get("size") or {}
        min_p, max_p = cfg.get("min_pixels", size.get("shortest_edge")), cfg.get("max_pixels", size.get("longest_edge"))
        if min_p and max_p and name == "preprocessor_config.json":  # the per-frame (image) budget
            out.update(min_pixels=int(min_p), max_pixels=int(max_p))
        return out

    # ---- text ----------------------------------------------------------------------------------
    def _video_blocks(self, slot_frames: Sequence[Sequence[int]], per_slot: int,
                      times: Sequence[float] | None = None) -> list[tuple[str, int, str]]:
        """The vision blocks of one video: Qwen2/2.5 put every slot in one block (time is in M-RoPE)."""
        return [("video_pad", len(slot_frames) * per_slot, "")]

    def _chat_ids(self, vision_blocks: list[tuple[str, int, str]], prompt: str | None, answer: str | None,
                  turns: Sequence[tuple[str, str]] | None = None) -> tuple[list[int], list[int]]:
        """Qwen chat format with vision blocks (kind, n tokens, text before the block) in the first user turn."""
        media: list[int] = []
        for kind, n, prefix in vision_blocks:
            media += (self._text(prefix) if prefix else []) + [self.ids["vision_start"]]
            media += [self.ids[kind]] * n + [self.ids["vision_end"]]
        return self._chatml(self.system_prompt, media, prompt, answer, turns)

    # ---- frames -> inputs ---------------------------------------------------------------------
    def _size(self, h: int, w: int, min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
        return smart_resize(h, w, self.patch * self.merge, min_pixels or self.min_pixels, max_pixels or self.max_pixels)

    def _to_slots(self, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, tuple[tuple[int, ...], ...]]:
        """(T, 3, h, w) frames -> the tower's input frames and the frames each temporal slot shows.
        video_dup / images: every frame twice (one frame per slot); pair: consecutive frames share a slot,
        an odd count repeats the last frame."""
        n = len(x)
        if mode != "pair":
            return x.repeat_interleave(self.temporal, dim=0), tuple((f,) for f in range(n))
        idx = list(range(n)) + [n - 1] * (-n % self.temporal)
        return x[idx], tuple(tuple(idx[g:g + self.temporal]) for g in range(0, len(idx), self.temporal))

    def _encode_sample(self, frames: list[np.ndarray], prompt: str | None, answer: str | None, mode: str,
                       turns: Sequence[tuple[str, str]] | None = None) -> dict:
        n = len(frames)
        if n == 0:  # text-only sample
            ids, labels = self._chat_ids([], prompt, answer, turns)
            return {"ids": ids, "labels": labels, "pixels": None, "grids": None, "mode": mode,
                    "layout": text_only_layout(self.family, mode, self.patch * self.merge)}
        orig_hw = frames[0].shape[:2]
        size = self._size(*orig_hw)
        x = normalize_frames(frames, size, self.image_mean, self.image_std)  # (T, 3, h, w)
        x, slot_frames = self._to_slots(x, mode)
        pix, (gt, gh, gw) = patchify(x, self.patch, self.merge, self.temporal)
        per_slot = gh * gw // (self.merge ** 2)
        if mode == "images":
            blocks = [("image_pad", per_slot, "")] * n
            grids = torch.tensor([[1, gh, gw]] * n)
        else:
            blocks = self._video_blocks(slot_frames, per_slot)
            grids = torch.tensor([[gt, gh, gw]])
        ids, labels = self._chat_ids(blocks, prompt, answer, turns)
        ids_t = torch.tensor(ids)
        pad_id = self.ids["image_pad" if mode == "images" else "video_pad"]
        positions = torch.nonzero(ids_t == pad_id).squeeze(1)
        layout = TokenLayout(self.family, mode, n, (gh // self.merge, gw // self.merge), self.patch * self.merge,
                             slot_frames, positions, FrameTransform.resize(orig_hw, size))
        return {"ids": ids, "labels": labels, "pixels": pix, "grids": grids, "mode": mode, "layout": layout}

    def _collate(self, encoded: list[dict]) -> PreparedBatch:
        inputs: dict[str, Any] = self._token_rows([e["ids"] for e in encoded])
        ids = inputs["input_ids"]
        type_ids = torch.zeros_like(ids)
        type_ids[ids == self.ids["image_pad"]] = 1
        type_ids[ids == self.ids["video_pad"]] = 2
        inputs["mm_token_type_ids"] = type_ids
        visual = [e for e in encoded if e["pixels"] is not None]  # text-only samples add no pixels
        if visual:
            pixels = torch.cat([e["pixels"] for e in visual])
            grids = torch.cat([e["grids"] for e in visual])
            if encoded[0]["mode"] == "images":
                inputs.update(pixel_values=pixels, image_grid_thw=grids)
            else:
                inputs.update(pixel_values_videos=pixels, video_grid_thw=grids)
                if self.timed_video:
                    inputs["second_per_grid_ts"] = torch.ones(len(grids), dtype=torch.float32)
        return self._prepared(encoded, inputs)

    def encode_visual_frozen(self, batch: PreparedBatch) -> dict:
        inputs = dict(batch.inputs)
        dtype = self.vision_module().dtype
        enc = {}
        with torch.no_grad():
            if "pixel_values_videos" in inputs:
                enc["video"] = self.model.model.get_video_features(
                    inputs.pop("pixel_values_videos").to(dtype), inputs["video_grid_thw"], return_dict=True)
            if "pixel_values" in inputs:
                enc["image"] = self.model.model.get_image_features(
                    inputs.pop("pixel_values").to(dtype), inputs["image_grid_thw"], return_dict=True)
        inputs["mm_encoder_outputs"] = enc
        return inputs

    # ---- generation ---------------------------------------------------------------------------
    def _encode_generation(self, request: dict) -> dict:
        """Images -> one image block each (own size); video -> the adapter's frame mode, so a model is scored
        with the tokenisation it was trained with: ``video_dup`` (the training default, one frame per
        temporal token) or ``pair`` (Qwen's processor: two frames per token)."""
        images, video = request.get("images") or [], request.get("video") or []
        min_p, max_p = request.get("min_pixels"), request.get("max_pixels")
        blocks, inputs = [], {}
        type_of = {}
        if images:
            pix, grids = [], []
            for im in images:
                arr = np.asarray(im.convert("RGB"))
                x = normalize_frames([arr], self._size(*arr.shape[:2], min_p, max_p), self.image_mean, self.image_std)
                p, (gt, gh, gw) = patchify(x.repeat_interleave(self.temporal, 0), self.patch, self.merge, self.temporal)
                pix.append(p)
                grids.append([1, gh, gw])
                blocks.append(("image_pad", gh * gw // self.merge ** 2, ""))
            inputs.update(pixel_values=torch.cat(pix), image_grid_thw=torch.tensor(grids))
            type_of["image_pad"] = 1
        if video:
            frames = [np.asarray(f.convert("RGB")) for f in video]
            x = normalize_frames(frames, self._size(*frames[0].shape[:2], min_p, max_p), self.image_mean, self.image_std)
            # the tokenisation GASP trained with: video_dup = one frame per token, pair = Qwen's processor
            x, slots = self._to_slots(x, "video_dup" if self.frame_mode == "video_dup" else "pair")
            p, (gt, gh, gw) = patchify(x, self.patch, self.merge, self.temporal)
            blocks += self._video_blocks(slots, gh * gw // self.merge ** 2, request.get("video_times"))
            inputs.update(pixel_values_videos=p, video_grid_thw=torch.tensor([[gt, gh, gw]]))
            if self.timed_video:
                inputs["second_per_grid_ts"] = torch.ones(1)
            type_of["video_pad"] = 2
        ids, _ = self._chat_ids(blocks, request["prompt"], None)
        ids_t = torch.tensor([ids])
        type_ids = torch.zeros_like(ids_t)
        for name, v in type_of.items():
            type_ids[ids_t == self.ids[name]] = v
        inputs.update(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), mm_token_type_ids=type_ids)
        return inputs

    def _collate_generation(self, encoded: list[dict]) -> dict:
        """Right-pad the token rows; pixels and grids concatenate in request order (how Qwen's model reads a
        batch: the i-th image block of the batch takes the i-th grid)."""
        out: dict[str, Any] = self._token_rows([e["input_ids"][0].tolist() for e in encoded])
        out["mm_token_type_ids"], _ = pad_sequences([e["mm_token_type_ids"][0].tolist() for e in encoded], 0)
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            parts = [e[key] for e in encoded if key in e]
            if parts:
                out[key] = torch.cat(parts)
        return out


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    hf_model_types = ("qwen2_vl",)
    hf_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    timed_video = False  # Qwen2-VL has no second_per_grid_ts (generate refuses unknown model kwargs)
