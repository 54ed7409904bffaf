"""Qwen3-VL adapter (HF ``Qwen3VLForConditionalGeneration``, dense models: 2B / 4B / 8B / 32B).

What differs from Qwen2.5-VL (models/qwen.py), each checked by tests/test_models_qwen3_vl.py:
- Vision tower: 16 x 16 patches, 2 x 2 merge, so one LLM token covers **32 x 32** input pixels (of two
  consecutive frames in the tower's temporal patch, as before); learned position embeddings, bilinearly
  interpolated to the grid; SigLIP-style normalisation (mean = std = 0.5).
- Video: time is *text*. Every temporal slot is its own block ``<{t:.1f} seconds><|vision_start|>
  <|video_pad|> x (Hm*Wm) <|vision_end|>`` (the HF processor's layout), so the visual tokens of a clip
  are not contiguous; ``TokenLayout.positions`` lists them as they sit. M-RoPE is *interleaved* and the
  model splits the video grid into one t=1 grid per slot (positions restart after each timestamp).
  ``t`` is the mean time of the slot's frames; frame f is at ``f / video_fps`` seconds unless a
  benchmark request gives ``video_times`` (default ``video_fps`` 2.0: Qwen3-VL's own sampling rate).
- DeepStack: features of vision layers ``deepstack_visual_indexes`` are *added* to the visual tokens of
  the LLM stream after decoder layers 0..k-1 (k = number of DeepStack layers, 3 at 8B). The per-layer
  hidden state gasp-vlm reads at layer l (heads, diagnostic) is therefore the stream **after** that
  injection, i.e. the input of layer l+1 -- what layer l+1's query reads (``adds_between_layers``).
  The last layer is read at its output, before the final norm, as for every family.
- QK-norm: queries and keys are RMS-normalised per head before RoPE; the diagnostic's q/k are taken
  after that norm (models/capture.py), the head's SVD init still comes from ``q_proj``.
- Chat: no default system turn (Qwen3-VL's template adds none unless the conversation has one).
Frame modes, pixel budget (per frame) and patch flattening are Qwen2.5-VL's.
"""

from __future__ import annotations

from typing import Sequence

from gasp_vlm.models.qwen import QwenVLAdapter

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    hf_model_types = ("qwen3_vl",)
    hf_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    timed_video = False  # time is in the timestamp text, not in second_per_grid_ts
    system_prompt = None
    adds_between_layers = True  # DeepStack
    patch = 16

    def __init__(self, model, tokenizer, processor=None, preset=None, frame_mode=None,
                 min_pixels: int = 64 * 64, max_pixels: int = 32 * 32 * 1280,
                 image_mean: Sequence[float] = SIGLIP_MEAN, image_std: Sequence[float] = SIGLIP_STD,
                 video_fps: float = 2.0) -> None:
        super().__init__(model, tokenizer, processor, preset, frame_mode, min_pixels, max_pixels, image_mean, image_std)
        if float(video_fps) <= 0:
            raise ValueError(f"video_fps must be > 0, got {video_fps}")
        self.video_fps = float(video_fps)
        vcfg = model.config.vision_config
        if (vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size) != (self.patch, self.merge, self.temporal):
            raise ValueError(f"Qwen3-VL vision config has patch {vcfg.patch_size}, merge {vcfg.spatial_merge_size}, "
                             f"temporal {vcfg.temporal_patch_size}; the adapter expects {self.patch}/{self.merge}/"
                             f"{self.temporal}")

    def extra_state(self) -> dict:
        return {**super().extra_state(), "video_fps": self.video_fps}

    def slot_times(self, slot_frames: Sequence[Sequence[int]], times: Sequence[float] | None = None) -> list[float]:
        """Seconds of each temporal slot: the mean of its first and last frame's time (HF's rule)."""
        t = list(times) if times is not None else None
        if t is not None and len(t) <= max(max(s) for s in slot_frames):
            raise ValueError(f"video_times has {len(t)} entries for {max(max(s) for s in slot_frames) + 1} frames")
        at = (lambda f: float(t[f])) if t is not None else (lambda f: f / self.video_fps)
        return [(at(s[0]) + at(s[-1])) / 2 for s in slot_frames]

    def _video_blocks(self, slot_frames, per_slot, times=None):
        return [("video_pad", per_slot, f"<{t:.1f} seconds>") for t in self.slot_times(slot_frames, times)]
