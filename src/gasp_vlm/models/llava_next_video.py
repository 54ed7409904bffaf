"""LLaVA-NeXT-Video adapter (HF ``LlavaNextVideoForConditionalGeneration``).

Token layout facts (checked by tests with pixel-encoded frames):
- Each frame is resized (shortest edge = the CLIP image size, bicubic) and centre-cropped to a square,
  the CLIP tower gives (S/14)^2 patch features, a 2 x 2 average pool gives (S/28)^2 tokens per frame
  (12 x 12 = 144 at S = 336) in raster order; frames are concatenated with no newline tokens.
  One token therefore covers 28 x 28 input pixels; points outside the crop have no token.
- Positions are plain 1-D RoPE (Llama).
- Multi-image benchmark inputs are fed as frames of one video (all cropped to the square), the
  LLaVA-NeXT-Video way of seeing several views; this is documented in the README.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from gasp_vlm.models.base import PreparedBatch, VLMAdapter, as_turns, text_only_layout
from gasp_vlm.models.layout import FrameTransform, TokenLayout
from gasp_vlm.models.qwen import CLIP_MEAN, CLIP_STD

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]


def resize_shortest_edge_size(h: int, w: int, shortest: int) -> tuple[int, int]:
    """HF's shortest-edge rule: the short side becomes ``shortest``, the long side int(shortest*long/short)."""
    if h <= w:
        return shortest, int(shortest * w / h)
    return int(shortest * h / w), shortest


class LlavaNextVideoAdapter(VLMAdapter):
    family = "llava_next_video"
    hf_model_types = ("llava_next_video",)
    hf_class = "LlavaNextVideoForConditionalGeneration"
    processor_class = "LlavaNextVideoProcessor"
    default_frame_mode = "video"
    frame_modes = ("video",)

    def __init__(self, model, tokenizer, processor=None, preset=None, frame_mode=None,
                 image_mean: Sequence[float] = CLIP_MEAN, image_std: Sequence[float] = CLIP_STD) -> None:
        super().__init__(model, tokenizer, processor, preset, frame_mode)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        vcfg = model.config.vision_config
        self.crop = int(vcfg.image_size)
        self.patch = int(vcfg.patch_size)
        self.pool = int(model.config.spatial_pool_stride)
        self.grid = self.crop // self.patch // self.pool
        self.video_id = model.config.video_token_id
        self.system = "A chat between a curious human and an artificial intelligence assistant."

    def vision_module(self):
        return self.model.model.vision_tower

    def _chat_ids(self, n_video_tokens: int, prompt: str | None, answer: str | None,
                  turns: Sequence[tuple[str, str]] | None = None) -> tuple[list[int], list[int]]:
        """Vicuna-style '{system} USER: <video>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: ...' with the
        video token expanded in the first user turn; labels cover each ' {answer}</s>'."""
        turns = as_turns(prompt, answer, turns)
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids: list[int] = []
        labels: list[int] = []
        for k, (role, text) in enumerate(turns):
            if role == "user":
                if k == 0:  # system and first user text tokenized as one string, as before multi-turn
                    head = bos + self._text(f"{self.system} USER: ") + [self.video_id] * n_video_tokens
                    head += self._text(f"\n{text} ASSISTANT:")
                else:
                    head = self._text(f"USER: {text} ASSISTANT:")
                ids += head
                labels += [-100] * len(head)
            else:
                ans = self._text(f" {text}") + [self.tokenizer.eos_token_id]
                ids += ans
                labels += ans
        return ids, labels

    def _pixels(self, frames: list[np.ndarray]) -> tuple[torch.Tensor, FrameTransform]:
        """uint8 frames -> (T, 3, S, S) normalised; resize shortest edge, centre crop (as the HF processor)."""
        h, w = frames[0].shape[:2]
        rh, rw = resize_shortest_edge_size(h, w, self.crop)
        tf = FrameTransform.resize_center_crop((h, w), self.crop, (self.crop, self.crop), resized_hw=(rh, rw))
        ox, oy = int(tf.offset[0]), int(tf.offset[1])
        out = []
        for f in frames:
            r = f if f.shape[:2] == (rh, rw) else np.asarray(Image.fromarray(f).resize((rw, rh), resample=Image.BICUBIC))
            out.append(torch.from_numpy(np.array(r[oy:oy + self.crop, ox:ox + self.crop])).permute(2, 0, 1))
        x = torch.stack(out).float() / 255.0
        x = (x - torch.tensor(self.image_mean).view(1, 3, 1, 1)) / torch.tensor(self.image_std).view(1, 3, 1, 1)
        return x, tf

    def _encode_sample(self, frames: list[np.ndarray], prompt: str | None, answer: str | None, mode: str,
                       turns: Sequence[tuple[str, str]] | None = None) -> dict:
        if not frames:  # text-only sample
            ids, labels = self._chat_ids(0, prompt, answer, turns)
            return {"ids": ids, "labels": labels, "pixels": None,
                    "layout": text_only_layout(self.family, mode, self.patch * self.pool)}
        x, tf = self._pixels(frames)
        n = len(frames)
        ids, labels = self._chat_ids(n * self.grid * self.grid, prompt, answer, turns)
        positions = torch.nonzero(torch.tensor(ids) == self.video_id).squeeze(1)
        layout = TokenLayout(self.family, mode, n, (self.grid, self.grid), self.patch * self.pool,
                             tuple((f,) for f in range(n)), positions, tf)
        return {"ids": ids, "labels": labels, "pixels": x, "layout": layout}

    def _collate(self, encoded: list[dict]) -> PreparedBatch:
        inputs: dict[str, Any] = self._token_rows([e["ids"] for e in encoded])
        pix = [e["pixels"] for e in encoded if e["pixels"] is not None]
        if len(pix) == len(encoded) and len({p.shape for p in pix}) == 1:
            inputs["pixel_values_videos"] = torch.stack(pix)
        elif pix:
            # different frame counts (or text-only samples): one (1, sum T) video; the model scatters the
            # frames' tokens over the video positions in row-major order, i.e. sample by sample
            inputs["pixel_values_videos"] = torch.cat(pix)[None]
        return self._prepared(encoded, inputs)

    def encode_visual_frozen(self, batch: PreparedBatch) -> dict:
        inputs = dict(batch.inputs)
        if "pixel_values_videos" not in inputs:  # text-only batch
            return inputs
        with torch.no_grad():
            pix = inputs.pop("pixel_values_videos").to(self.vision_module().dtype)
            inputs["mm_encoder_outputs"] = {"video": self.model.model.get_video_features(pix, return_dict=True)}
        return inputs

    def _encode_generation(self, request: dict) -> dict:
        frames = list(request.get("video") or []) + list(request.get("images") or [])
        if not frames:
            ids, _ = self._chat_ids(0, request["prompt"], None)
            t = torch.tensor([ids])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        arrs = [np.asarray(f.convert("RGB")) for f in frames]
        # Views of different sizes are each resized + cropped to the same square.
        x = torch.cat([self._pixels([a])[0] for a in arrs])
        ids, _ = self._chat_ids(len(arrs) * self.grid * self.grid, request["prompt"], None)
        t = torch.tensor([ids])
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "pixel_values_videos": x[None]}

    def _collate_generation(self, encoded: list[dict]) -> dict:
        """Right-pad the token rows; clips of one frame count stack into (B, T, 3, H, W), others (or text
        rows) concatenate into one (1, sum T) video whose tokens the model fills in row order, as
        ``_collate`` does for training."""
        out: dict[str, Any] = self._token_rows([e["input_ids"][0].tolist() for e in encoded])
        pix = [e["pixel_values_videos"][0] for e in encoded if "pixel_values_videos" in e]
        if len(pix) == len(encoded) and len({p.shape for p in pix}) == 1:
            out["pixel_values_videos"] = torch.stack(pix)
        elif pix:
            out["pixel_values_videos"] = torch.cat(pix)[None]
        return out
