"""LLaVA-OneVision / LLaVA-Video (Qwen2 LLM) adapter (HF ``LlavaOnevisionForConditionalGeneration``).

Token layout facts (checked by tests/test_models_layout.py and tests/test_models_llava_onevision.py):
- SigLIP on S x S frames (S = 384 at 7B) embeds P x P patches of 14 px (P = 27; no CLS token).
- Video (the GASP path, frame mode ``video``): every frame resized to S x S (aspect not kept), its P x P
  patch features projected and bilinearly pooled to ceil(P/2)^2 tokens (14 x 14 = 196 at 7B) in raster
  order; the frames' tokens follow each other and **one newline token** (the learned ``image_newline``)
  ends the video. Token (r, c) is taken to cover the ``token_px`` = 14 P / ceil(P/2) px cell (27 px at
  7B) of the P*14 px the patches cover (the last S - 14 P px of a row are never embedded): its bilinear
  sample point sits at that cell's centre (between two patches when P is odd, so its features blend the
  two). The newline's position is ``layout.meta["newline_positions"]``; it shows no frame and is no target.
- Images (benchmarks): one image -> AnyRes-max-9 (a base 384 view of P^2 tokens, then the best-fitting
  tile grid, unpadded, bilinearly shrunk to at most 9 tiles' worth, one newline token after every
  row); several images -> each padded to a square with the mean colour, P^2 + 1 newline tokens each.
  Pixels and token counts are computed as the HF processor does (tested equal); ``anyres_token_map``
  gives every image token's kind (base / tile grid / newline) and its box in original pixels.
- Chat: LLaVA's ``qwen_1_5`` conversation (the format the models were trained and are scored with in
  lmms-eval): ChatML with "You are a helpful assistant.", media tokens then "\\n" before the user text.
- Positions are plain 1-D RoPE (Qwen2).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from gasp_vlm.models.base import PreparedBatch, VLMAdapter, text_only_layout
from gasp_vlm.models.layout import FrameTransform, TokenLayout
from gasp_vlm.models.qwen import normalize_frames

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
ONEVISION_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
SYSTEM_PROMPT = "You are a helpful assistant."


def anyres_grid(orig_hw: tuple[int, int], best_hw: tuple[int, int], tile: int, patches: int,
                max_tiles: int = 9) -> tuple[int, int, int, int, int, int]:
    """The tile grid of one AnyRes image in feature units (one per 14 px patch of the padded canvas):
    (rows, cols) after the padding rows/cols are removed, the (top, left) feature rows/cols removed, and
    the (rows, cols) the model shrinks them to (bilinearly) when they exceed ``max_tiles`` tiles' worth by
    more than 10 % (LLaVA-OneVision's anyres_max rule; equal to both otherwise)."""
    h, w = orig_hw
    cur_h, cur_w = patches * (best_hw[0] // tile), patches * (best_hw[1] // tile)
    top = left = 0
    if w / h > cur_w / cur_h:
        top = (cur_h - int(round(h * (cur_w / w), 7))) // 2
        cur_h -= 2 * top
    else:
        left = (cur_w - int(round(w * (cur_h / h), 7))) // 2
        cur_w -= 2 * left
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * patches ** 2))
    out_h, out_w = (int(cur_h // ratio), int(cur_w // ratio)) if ratio > 1.1 else (cur_h, cur_w)
    return cur_h, cur_w, top, left, out_h, out_w


def anyres_token_count(orig_hw: tuple[int, int], best_hw: tuple[int, int], tile: int, patches: int,
                       max_tiles: int = 9) -> tuple[int, int]:
    """(tile-grid tokens, newline tokens) of one AnyRes image: one newline after every grid row."""
    *_, out_h, out_w = anyres_grid(orig_hw, best_hw, tile, patches, max_tiles)
    return out_h * out_w, out_h


class LlavaOnevisionAdapter(VLMAdapter):
    family = "llava_onevision"
    hf_model_types = ("llava_onevision",)
    hf_class = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    default_frame_mode = "video"
    frame_modes = ("video",)
    system_prompt = SYSTEM_PROMPT

    def __init__(self, model, tokenizer, processor=None, preset=None, frame_mode=None,
                 image_mean: Sequence[float] = SIGLIP_MEAN, image_std: Sequence[float] = SIGLIP_STD) -> None:
        super().__init__(model, tokenizer, processor, preset, frame_mode)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "full":
            raise ValueError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}: the adapter "
                             f"expects 'full' (SigLIP, no CLS token), as every LLaVA-OneVision checkpoint has")
        self.size = int(cfg.vision_config.image_size)
        self.patch = int(cfg.vision_config.patch_size)
        self.patches = self.size // self.patch  # P patches per side
        self.grid = math.ceil(self.patches / 2)  # pooled tokens per side of a video frame
        covered = self.patches * self.patch
        if covered % self.grid:
            raise ValueError(f"{self.patches} patches pool to {self.grid} tokens of a non-integer pixel size")
        self.token_px = covered // self.grid
        self.pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
        self.max_tiles = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
        tid = tokenizer.convert_tokens_to_ids
        self.ids = {name: tid(tok) for name, tok in [("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"),
                                                      ("image", "<image>"), ("video", "<video>")]}
        if (self.ids["image"], self.ids["video"]) != (cfg.image_token_id, cfg.video_token_id):
            raise ValueError(f"tokenizer and config disagree on the media token ids "
                             f"({self.ids['image']}, {self.ids['video']} vs {cfg.image_token_id}, {cfg.video_token_id})")

    def vision_module(self):
        return self.model.model.vision_tower

    # ---- text ----------------------------------------------------------------------------------
    def _chat_ids(self, media: list[int], prompt: str | None, answer: str | None,
                  turns: Sequence[tuple[str, str]] | None = None) -> tuple[list[int], list[int]]:
        """qwen_1_5 ChatML; ``media`` (the expanded media tokens) then "\\n" open the first user turn."""
        return self._chatml(self.system_prompt, media + self._text("\n") if media else [], prompt, answer, turns)

    # ---- pixels --------------------------------------------------------------------------------
    def _to_tensor(self, img: np.ndarray, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, h, w): PIL bicubic resize to ``hw`` (if given), /255, normalise."""
        return normalize_frames([img], hw or img.shape[:2], self.image_mean, self.image_std)[0]

    def _anyres_canvas(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """The best pinpoint (bh, bw), the aspect-kept resize (nh, nw) and its paste offset (py, px) in it."""
        from transformers.image_processing_utils import select_best_resolution

        bh, bw = select_best_resolution((h, w), self.pinpoints)
        s_w, s_h = bw / w, bh / h
        nh, nw = (min(math.ceil(h * s_w), bh), bw) if s_w < s_h else (bh, min(math.ceil(w * s_h), bw))
        return (bh, bw), (nh, nw), ((bh - nh) // 2, (bw - nw) // 2)

    def anyres_image(self, img: np.ndarray) -> tuple[torch.Tensor, int]:
        """One image alone -> ((1 + tiles), 3, S, S) base view + tiles, and its number of LLM tokens."""
        h, w = img.shape[:2]
        (bh, bw), (nh, nw), (py, px) = self._anyres_canvas(h, w)
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), resample=Image.BICUBIC))
        canvas = np.zeros((bh, bw, 3), np.uint8)  # zero padding, as HF's processor pads
        canvas[py:py + nh, px:px + nw] = resized
        s = self.size
        views = [self._to_tensor(img, (s, s))]
        views += [self._to_tensor(canvas[r:r + s, c:c + s]) for r in range(0, bh, s) for c in range(0, bw, s)]
        unpadded, newlines = anyres_token_count((h, w), (bh, bw), s, self.patches, self.max_tiles)
        return torch.stack(views), self.patches ** 2 + unpadded + newlines

    def anyres_token_map(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """What each LLM token of one AnyRes image shows, in the model's order: ``kind`` (n,) 0 = base view,
        1 = tile grid, 2 = newline; ``boxes`` (n, 4) [x0, y0, x1, y1] in original-image pixels (NaN for
        newlines). Base token (r, c) is patch (r, c) of the S x S resize; a tile-grid token is its feature
        cell of the padded canvas (tiles of S px, P patches of 14 px each), mapped back through the paste
        and the resize; when the grid is shrunk, a token spans the fraction of feature cells it samples."""
        s, p, q = self.size, self.patches, self.patch
        (bh, bw), (nh, nw), (py, px) = self._anyres_canvas(h, w)
        cur_h, cur_w, top, left, out_h, out_w = anyres_grid((h, w), (bh, bw), s, p, self.max_tiles)
        r, c = np.divmod(np.arange(p * p), p)
        base = np.stack([c * q * w / s, r * q * h / s, (c + 1) * q * w / s, (r + 1) * q * h / s], 1).astype(float)

        def canvas_px(f: np.ndarray) -> np.ndarray:  # feature coordinate -> canvas pixels (tiles of S px)
            t = np.minimum(np.floor(f / p), np.ceil(f / p) - 1).clip(0)  # a cell edge on a tile seam: the earlier tile
            return t * s + (f - t * p) * q

        ys = top + np.arange(out_h + 1) * cur_h / out_h  # feature-row edges of the (shrunk) grid
        xs = left + np.arange(out_w + 1) * cur_w / out_w
        y0, y1 = (canvas_px(ys[:-1]) - py) * h / nh, (canvas_px(ys[1:]) - py) * h / nh
        x0, x1 = (canvas_px(xs[:-1]) - px) * w / nw, (canvas_px(xs[1:]) - px) * w / nw
        kinds, boxes = [np.zeros(p * p, int)], [base]
        for i in range(out_h):
            row = np.stack([x0, np.full(out_w, y0[i]), x1, np.full(out_w, y1[i])], 1)
            kinds += [np.ones(out_w, int), np.array([2])]
            boxes += [row, np.full((1, 4), np.nan)]
        return np.concatenate(kinds), np.concatenate(boxes)

    def square_image(self, img: np.ndarray) -> torch.Tensor:
        """One of several images -> (1, 3, S, S): padded to a square with the mean colour, resized."""
        h, w = img.shape[:2]
        m = max(h, w)
        canvas = np.empty((m, m, 3), np.uint8)
        canvas[:] = [int(v * 255) for v in self.image_mean]
        canvas[(m - h) // 2:(m - h) // 2 + h, (m - w) // 2:(m - w) // 2 + w] = img
        return self._to_tensor(canvas, (self.size, self.size))[None]

    # ---- frames -> inputs ---------------------------------------------------------------------
    def _encode_sample(self, frames: list[np.ndarray], prompt: str | None, answer: str | None, mode: str,
                       turns: Sequence[tuple[str, str]] | None = None) -> dict:
        if not frames:
            ids, labels = self._chat_ids([], prompt, answer, turns)
            return {"ids": ids, "labels": labels, "pixels": None,
                    "layout": text_only_layout(self.family, mode, self.token_px)}
        n = len(frames)
        pix = torch.stack([self._to_tensor(f, (self.size, self.size)) for f in frames])  # (T, 3, S, S)
        ids, labels = self._chat_ids([self.ids["video"]] * (n * self.grid ** 2 + 1), prompt, answer, turns)
        vid = torch.nonzero(torch.tensor(ids) == self.ids["video"]).squeeze(1)
        h, w = frames[0].shape[:2]
        covered = self.grid * self.token_px
        tf = FrameTransform((h, w), (covered, covered), (self.size / w, self.size / h))  # resize, keep top-left
        layout = TokenLayout(self.family, mode, n, (self.grid, self.grid), self.token_px, tuple((f,) for f in range(n)),
                             vid[:-1], tf, {"newline_positions": vid[-1:]})
        return {"ids": ids, "labels": labels, "pixels": pix, "layout": layout}

    def _collate(self, encoded: list[dict]) -> PreparedBatch:
        inputs: dict[str, Any] = self._token_rows([e["ids"] for e in encoded])
        pix = [e["pixels"] for e in encoded if e["pixels"] is not None]
        if len(pix) == len(encoded) and len({p.shape for p in pix}) == 1:
            inputs["pixel_values_videos"] = torch.stack(pix)  # (B, T, 3, S, S): the model's own batched path
        elif pix:
            # clips of different lengths (or text rows): every clip ends in its own newline token, which a
            # single concatenated clip would not give, so encode_visual_frozen embeds them one by one
            inputs["pixel_values_videos"] = torch.cat(pix)[None]
            inputs["video_frame_counts"] = [len(p) for p in pix]
        return self._prepared(encoded, inputs)

    def encode_visual_frozen(self, batch: PreparedBatch) -> dict:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        inputs = dict(batch.inputs)
        if "pixel_values_videos" not in inputs:
            return inputs
        pix = inputs.pop("pixel_values_videos").to(self.vision_module().dtype)
        counts = inputs.pop("video_frame_counts", None)
        clips = torch.split(pix[0], counts) if counts is not None else [pix]
        with torch.no_grad():
            feats = [self.model.model.get_video_features(c if c.dim() == 5 else c[None], return_dict=True).pooler_output
                     for c in clips]
        # (clips, T*G^2 + 1, D) each; the model flattens them in order onto the video tokens
        out = torch.cat([f.flatten(0, 1) for f in feats])[None]
        inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=out)}
        return inputs

    # ---- generation ---------------------------------------------------------------------------
    def _encode_generation(self, request: dict) -> dict:
        """One image: AnyRes-max; several images: each a padded square; a video: the pooled frames (as
        LLaVA-OneVision's lmms-eval model does). Images come before the video."""
        images = [np.asarray(im.convert("RGB")) for im in request.get("images") or []]
        video = [np.asarray(f.convert("RGB")) for f in request.get("video") or []]
        media: list[int] = []
        out: dict[str, Any] = {}
        if images:
            if len(images) == 1:
                views, n_tok = self.anyres_image(images[0])
                parts, counts = [views], [n_tok]
            else:
                parts, counts = [self.square_image(im) for im in images], [self.patches ** 2 + 1] * len(images)
            for k, n_tok in enumerate(counts):  # "<image> <image>\n": LLaVA's multi-image prompt
                media += ([] if k == 0 else self._text(" ")) + [self.ids["image"]] * n_tok
            out.update(pixel_values=self._pad_views(parts), image_sizes=torch.tensor([im.shape[:2] for im in images]),
                       batch_num_images=[len(images)])
        if video:
            if media:
                media += self._text("\n")
            media += [self.ids["video"]] * (len(video) * self.grid ** 2 + 1)
            out["pixel_values_videos"] = torch.stack([self._to_tensor(f, (self.size, self.size)) for f in video])[None]
        ids, _ = self._chat_ids(media, request["prompt"], None)
        t = torch.tensor([ids])
        out.update(input_ids=t, attention_mask=torch.ones_like(t))
        return out

    @staticmethod
    def _pad_views(parts: list[torch.Tensor]) -> torch.Tensor:
        """Views of each image, zero-padded to one count -> (images, views, 3, S, S) (HF's batch layout;
        the model reads each image's own count from its size)."""
        m = max(len(p) for p in parts)
        return torch.stack([torch.cat([p, p.new_zeros(m - len(p), *p.shape[1:])]) for p in parts])

    def _collate_generation(self, encoded: list[dict]) -> dict | None:
        """Right-pad the rows; images concatenate in row order, the clips of the rows that have one stack
        when they have one length (otherwise: None, one request at a time)."""
        clips = [e["pixel_values_videos"][0] for e in encoded if "pixel_values_videos" in e]
        if len({c.shape for c in clips}) > 1:  # one newline per clip: clips of one length stack, others do not
            return None
        out: dict[str, Any] = self._token_rows([e["input_ids"][0].tolist() for e in encoded])
        imgs = [e for e in encoded if "pixel_values" in e]
        if imgs:
            out["pixel_values"] = self._pad_views([v for e in imgs for v in e["pixel_values"]])
            out["image_sizes"] = torch.cat([e["image_sizes"] for e in imgs])
            out["batch_num_images"] = [n for e in encoded for n in e.get("batch_num_images", [0])]
        if clips:
            out["pixel_values_videos"] = torch.stack(clips)
        return out
