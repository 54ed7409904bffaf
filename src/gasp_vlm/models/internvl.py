"""InternVL3 / InternVL2.5 adapter (HF ``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

Token layout facts (checked by tests/test_models_layout.py with pixel-encoded frames and
tests/test_models_internvl.py):
- InternViT embeds 14 x 14 patches of a square tile (448 px at 8B); the CLS token is dropped and a 2 x 2
  pixel shuffle folds each 2 x 2 block of patches into one LLM token, so a token covers **28 x 28** tile
  pixels, ``(tile / 28)^2`` = 256 tokens per tile, raster order within the tile. No temporal merging:
  a token shows exactly one frame.
- Frame modes:
  ``video`` (default for GASP): InternVL's video path -- every frame resized (bicubic, aspect not kept)
      to one tile, prompted ``Frame{i}: <img><IMG_CONTEXT> x 256</img>\\n`` per frame (the HF processor's
      and the original chat code's format). 256 tokens per frame at 8B.
  ``tiles``: InternVL's image path -- every frame cut into the dynamic tile grid its aspect ratio picks
      (``min_tiles``..``max_tiles`` tiles, HF's rule) plus a thumbnail tile when there is more than one
      tile, ``<img>...</img>\\n`` per frame. The layout's token grid spans the tile grid
      (rows*16 x cols*16 tokens, each 28 px of the resized frame); ``positions`` maps each grid token to
      its place inside its tile's run. The thumbnail's tokens (a coarser second view of the whole frame)
      are listed in ``layout.meta["thumbnail_positions"]`` and are not targets.
- Positions are 1-D RoPE (a Qwen2.5 LLM at InternVL3-8B); no tokens between a frame's visual tokens.
- Benchmark images take the dynamic tiles (as InternVL's own evaluation); videos take the video path.
Pixels are prepared here exactly as the HF image processor (GotOcr2) does -- tested equal.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from gasp_vlm.models.base import PreparedBatch, VLMAdapter, text_only_layout
from gasp_vlm.models.layout import FrameTransform, TokenLayout
from gasp_vlm.models.qwen import normalize_frames

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# InternVL2.5 / 3's default system message (its chat template and the original conversation code)
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>"]


def tile_grid(height: int, width: int, tile: int, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """(cols, rows) of the tile canvas whose aspect ratio is closest to the image's; on a tie the larger
    canvas wins while the image has more than half its area (HF GotOcr2's rule, used by InternVL-hf)."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


class InternVLAdapter(VLMAdapter):
    family = "internvl"
    hf_model_types = ("internvl",)
    hf_class = "InternVLForConditionalGeneration"
    processor_class = "InternVLProcessor"
    default_frame_mode = "video"
    frame_modes = ("video", "tiles")
    system_prompt = INTERNVL_SYSTEM

    def __init__(self, model, tokenizer, processor=None, preset=None, frame_mode=None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 min_tiles: int = 1, max_tiles: int = 12) -> None:
        super().__init__(model, tokenizer, processor, preset, frame_mode)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        if not 1 <= int(min_tiles) <= int(max_tiles):
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        self.min_tiles, self.max_tiles = int(min_tiles), int(max_tiles)
        cfg = model.config
        vcfg = cfg.vision_config
        size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        patch = vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0]
        self.tile, self.patch = int(size), int(patch)
        self.shuffle = int(round(1 / cfg.downsample_ratio))  # 2: a 2 x 2 block of patches per token
        self.token_px = self.patch * self.shuffle
        if self.tile % self.token_px:
            raise ValueError(f"tile size {self.tile} is not a multiple of {self.token_px} px tokens")
        self.grid = self.tile // self.token_px
        tid = tokenizer.convert_tokens_to_ids
        self.ids = {name: tid(tok) for name, tok in [("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"),
                                                      ("img_start", "<img>"), ("img_end", "</img>"),
                                                      ("context", "<IMG_CONTEXT>")]}
        if self.ids["context"] != cfg.image_token_id:
            raise ValueError(f"tokenizer and config disagree on the image token id "
                             f"({self.ids['context']} vs {cfg.image_token_id})")

    def vision_module(self):
        return self.model.model.vision_tower

    def extra_state(self) -> dict:
        return {"min_tiles": self.min_tiles, "max_tiles": self.max_tiles}

    @classmethod
    def processor_settings(cls, name: str, cfg: dict) -> dict:
        out = super().processor_settings(name, cfg)
        if name == "preprocessor_config.json" and cfg.get("crop_to_patches"):
            out.update(min_tiles=int(cfg.get("min_patches", 1)), max_tiles=int(cfg.get("max_patches", 12)))
        return out

    # ---- text ----------------------------------------------------------------------------------
    def _media_ids(self, blocks: Sequence[tuple[str, int]]) -> list[int]:
        """(text before, n context tokens) per frame -> ``{text}<img><IMG_CONTEXT> x n</img>\\n`` each."""
        out: list[int] = []
        for prefix, n in blocks:
            out += self._text(prefix) + [self.ids["img_start"]] + [self.ids["context"]] * n
            out += [self.ids["img_end"]] + self._text("\n")
        return out

    def _chat_ids(self, blocks: Sequence[tuple[str, int]], prompt: str | None, answer: str | None,
                  turns: Sequence[tuple[str, str]] | None = None) -> tuple[list[int], list[int]]:
        """ChatML with InternVL's system turn, the frames before the first user text."""
        return self._chatml(self.system_prompt, self._media_ids(blocks), prompt, answer, turns)

    # ---- pixels --------------------------------------------------------------------------------
    def _normalize(self, img: np.ndarray, hw: tuple[int, int]) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, h, w): bicubic resize (PIL, as HF's PIL processor), /255, normalise."""
        return normalize_frames([img], hw, self.image_mean, self.image_std)[0]

    def tiles_of(self, img: np.ndarray, max_tiles: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (n, 3, tile, tile) tiles, row-major, + a thumbnail when n > 1; and (cols, rows)."""
        cols, rows = tile_grid(*img.shape[:2], self.tile, self.min_tiles, max_tiles or self.max_tiles)
        canvas = self._normalize(img, (rows * self.tile, cols * self.tile))
        t = self.tile
        tiles = [canvas[:, r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
        if len(tiles) > 1:
            tiles.append(self._normalize(img, (t, t)))
        return torch.stack(tiles), (cols, rows)

    # ---- frames -> inputs ---------------------------------------------------------------------
    def _encode_sample(self, frames: list[np.ndarray], prompt: str | None, answer: str | None, mode: str,
                       turns: Sequence[tuple[str, str]] | None = None) -> dict:
        n = len(frames)
        if n == 0:
            ids, labels = self._chat_ids([], prompt, answer, turns)
            return {"ids": ids, "labels": labels, "pixels": None,
                    "layout": text_only_layout(self.family, mode, self.token_px)}
        orig_hw = frames[0].shape[:2]
        per_tile = self.grid * self.grid
        if mode == "video":
            pix = torch.stack([self._normalize(f, (self.tile, self.tile)) for f in frames])
            cols = rows = 1
            blocks = [(f"Frame{i + 1}: ", per_tile) for i in range(n)]
        else:
            parts = [self.tiles_of(f) for f in frames]
            cols, rows = parts[0][1]
            pix = torch.cat([p for p, _ in parts])
            blocks = [("", len(p) * per_tile) for p, _ in parts]
        ids, labels = self._chat_ids(blocks, prompt, answer, turns)
        ctx = torch.nonzero(torch.tensor(ids) == self.ids["context"]).squeeze(1)  # every context token, in order
        # raster grid token (R, C) of a frame sits in tile (R // g, C // g) at inner (R % g, C % g)
        g = self.grid
        hm, wm = rows * g, cols * g
        rr, cc = np.divmod(np.arange(hm * wm), wm)
        in_frame = ((rr // g) * cols + cc // g) * per_tile + (rr % g) * g + cc % g
        per_frame = blocks[0][1]
        index = torch.from_numpy(np.concatenate([f * per_frame + in_frame for f in range(n)]))
        positions = ctx[index]
        meta = {}
        if mode == "tiles" and rows * cols > 1:
            thumb = torch.cat([ctx[f * per_frame + rows * cols * per_tile:(f + 1) * per_frame] for f in range(n)])
            meta["thumbnail_positions"] = thumb
        layout = TokenLayout(self.family, mode, n, (hm, wm), self.token_px, tuple((f,) for f in range(n)), positions,
                             FrameTransform.resize(orig_hw, (rows * self.tile, cols * self.tile)), meta)
        return {"ids": ids, "labels": labels, "pixels": pix, "layout": layout}

    def _collate(self, encoded: list[dict]) -> PreparedBatch:
        inputs: dict[str, Any] = self._token_rows([e["ids"] for e in encoded])
        pix = [e["pixels"] for e in encoded if e["pixels"] is not None]
        if pix:  # the model fills the context tokens in row-major order: sample by sample, tile by tile
            inputs["pixel_values"] = torch.cat(pix)
        return self._prepared(encoded, inputs)

    def encode_visual_frozen(self, batch: PreparedBatch) -> dict:
        inputs = dict(batch.inputs)
        if "pixel_values" not in inputs:  # text-only batch
            return inputs
        with torch.no_grad():
            pix = inputs.pop("pixel_values").to(self.vision_module().dtype)
            inputs["mm_encoder_outputs"] = {"image": self.model.model.get_image_features(pix, return_dict=True)}
        return inputs

    # ---- generation ---------------------------------------------------------------------------
    def _encode_generation(self, request: dict) -> dict:
        """Images -> dynamic tiles + thumbnail each (``<img>...</img>\\n``); video -> one tile per frame with
        ``Frame{i}:`` (InternVL's own evaluation settings)."""
        per_tile = self.grid * self.grid
        blocks, pix = [], []
        for im in request.get("images") or []:
            tiles, _ = self.tiles_of(np.asarray(im.convert("RGB")))
            pix.append(tiles)
            blocks.append(("", len(tiles) * per_tile))
        for i, f in enumerate(request.get("video") or []):
            pix.append(self._normalize(np.asarray(f.convert("RGB")), (self.tile, self.tile))[None])
            blocks.append((f"Frame{i + 1}: ", per_tile))
        ids, _ = self._chat_ids(blocks, request["prompt"], None)
        t = torch.tensor([ids])
        out: dict[str, Any] = {"input_ids": t, "attention_mask": torch.ones_like(t)}
        if pix:
            out["pixel_values"] = torch.cat(pix)
        return out

    def _collate_generation(self, encoded: list[dict]) -> dict:
        """Right-pad the token rows; tiles concatenate in row order (how the model fills the context tokens)."""
        out: dict[str, Any] = self._token_rows([e["input_ids"][0].tolist() for e in encoded])
        pix = [e["pixel_values"] for e in encoded if "pixel_values" in e]
        if pix:
            out["pixel_values"] = torch.cat(pix)
        return out
