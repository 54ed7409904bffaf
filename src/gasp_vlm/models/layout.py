"""TokenLayout: where every visual token of a sample sits, in the sequence and in the frames.

Every loss, target and metric in gasp-vlm finds visual tokens through this one object.

Vocabulary
- *frame*: one RGB frame the user gave (index f in 0..num_frames-1), original size ``orig_hw``.
- *input frame*: that frame after the model's resize / centre crop, size ``input_hw``.
- *slot*: one temporal group of merged tokens. In ``frame`` modes a slot is exactly one frame; in
  Qwen's native ``pair`` mode slot g covers frames (2g, 2g+1) (an odd count repeats the last frame).
- *token grid*: each slot has ``grid_hw = (Hm, Wm)`` merged tokens in raster order; token (r, c)
  covers input-frame pixels [c*P, (c+1)*P) x [r*P, (r+1)*P) with P = ``token_px``.
- *visual index*: tokens of a sample numbered slot-major, raster within a slot:
  v = slot * Hm * Wm + r * Wm + c. ``positions[v]`` is its index in the token sequence.

Pixel convention: uv = (x, y) continuous, pixel centres at +0.5 (see geometry/cameras.py).
uv_input = uv_orig * scale - offset  (resize by ``scale`` = (sx, sy), then crop ``offset`` = (ox, oy)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class FrameTransform:
    """Original frame pixels -> model input frame pixels (resize, then crop)."""

    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale: tuple[float, float]  # (sx, sy)
    offset: tuple[float, float] = (0.0, 0.0)  # (ox, oy), subtracted after scaling

    @classmethod
    def resize(cls, orig_hw: tuple[int, int], input_hw: tuple[int, int]) -> "FrameTransform":
        """A plain (possibly anisotropic) resize to ``input_hw``."""
        return cls(orig_hw, input_hw, (input_hw[1] / orig_hw[1], input_hw[0] / orig_hw[0]), (0.0, 0.0))

    @classmethod
    def resize_center_crop(cls, orig_hw: tuple[int, int], shortest_edge: int, crop_hw: tuple[int, int],
                           resized_hw: tuple[int, int] | None = None) -> "FrameTransform":
        """Resize so the shortest edge is ``shortest_edge`` (aspect kept), then centre-crop ``crop_hw``.

        ``resized_hw`` may be given when the resize rounding is known (HF rounds the long side with int()).
        """
        h, w = orig_hw
        if resized_hw is None:
            s = shortest_edge / min(h, w)
            resized_hw = (int(round(h * s)), int(round(w * s)))
        rh, rw = resized_hw
        ch, cw = crop_hw
        # HF center_crop: top = (h - ch) // 2, left = (w - cw) // 2 (integer pixels)
        oy, ox = (rh - ch) // 2, (rw - cw) // 2
        return cls(orig_hw, (ch, cw), (rw / w, rh / h), (float(ox), float(oy)))

    def to_input(self, uv: np.ndarray) -> np.ndarray:
        uv = np.asarray(uv, dtype=np.float64)
        return uv * np.array(self.scale) - np.array(self.offset)

    def to_orig(self, uv_input: np.ndarray) -> np.ndarray:
        uv_input = np.asarray(uv_input, dtype=np.float64)
        return (uv_input + np.array(self.offset)) / np.array(self.scale)


@dataclass
class TokenLayout:
    """Token layout of one sample (see module docstring)."""

    family: str
    frame_mode: str  # "video_dup" | "images" | "pair" | "video" (LLaVA)
    num_frames: int
    grid_hw: tuple[int, int]
    token_px: int
    slot_frames: tuple[tuple[int, ...], ...]
    positions: torch.Tensor  # (num_visual,) long, sequence index of each visual token
    transform: FrameTransform
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = self.num_slots * self.tokens_per_slot
        if self.positions.numel() != expected:
            raise ValueError(
                f"TokenLayout: {self.positions.numel()} visual positions but {self.num_slots} slots x "
                f"{self.grid_hw} grid = {expected}")
        hin, win = self.transform.input_hw
        if hin != self.grid_hw[0] * self.token_px or win != self.grid_hw[1] * self.token_px:
            raise ValueError(f"TokenLayout: input frame {self.transform.input_hw} is not grid {self.grid_hw} x {self.token_px}px")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return len(self.slot_frames)

    @property
    def tokens_per_slot(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def num_visual(self) -> int:
        return self.num_slots * self.tokens_per_slot

    @property
    def one_frame_per_slot(self) -> bool:
        return all(len(set(f)) == 1 for f in self.slot_frames)

    # ---- index maps --------------------------------------------------------------------------
    def slot_of_frame(self, frame: int) -> int:
        """The slot whose tokens show ``frame`` (the first one if a frame is repeated)."""
        for s, frames in enumerate(self.slot_frames):
            if frame in frames:
                return s
        raise IndexError(f"frame {frame} is not in this layout ({self.num_frames} frames)")

    def visual_index(self, slot: int | np.ndarray, row: int | np.ndarray, col: int | np.ndarray):
        hm, wm = self.grid_hw
        return slot * hm * wm + row * wm + col

    def token_slot_row_col(self) -> torch.Tensor:
        """(num_visual, 3) long: slot, row, col of every visual token."""
        hm, wm = self.grid_hw
        v = torch.arange(self.num_visual)
        return torch.stack([v // (hm * wm), (v % (hm * wm)) // wm, v % wm], dim=1)

    def slot_token_range(self, slot: int) -> tuple[int, int]:
        """[start, end) visual indices of a slot."""
        return slot * self.tokens_per_slot, (slot + 1) * self.tokens_per_slot

    # ---- pixels <-> tokens -------------------------------------------------------------------
    def token_boxes_input(self) -> np.ndarray:
        """(Hm*Wm, 4) [x0, y0, x1, y1] of each token of a slot, in input-frame pixels."""
        hm, wm = self.grid_hw
        p = self.token_px
        r, c = np.divmod(np.arange(hm * wm), wm)
        return np.stack([c * p, r * p, (c + 1) * p, (r + 1) * p], axis=1).astype(np.float64)

    def token_boxes_orig(self) -> np.ndarray:
        """(Hm*Wm, 4) token boxes mapped back to original-frame pixels."""
        b = self.token_boxes_input()
        lo = self.transform.to_orig(b[:, :2])
        hi = self.transform.to_orig(b[:, 2:])
        return np.concatenate([lo, hi], axis=1)

    def token_centers_orig(self) -> np.ndarray:
        """(Hm*Wm, 2) uv of each token centre in original-frame pixels."""
        b = self.token_boxes_input()
        return self.transform.to_orig((b[:, :2] + b[:, 2:]) / 2)

    def pixel_to_token(self, uv_orig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Original-frame uv (..., 2) -> (token index within a slot (...), inside mask (...)).

        ``inside`` is False for points outside the (cropped) input frame; their index is -1.
        """
        uv_in = self.transform.to_input(uv_orig)
        hm, wm = self.grid_hw
        col = np.floor(uv_in[..., 0] / self.token_px).astype(np.int64)
        row = np.floor(uv_in[..., 1] / self.token_px).astype(np.int64)
        inside = (col >= 0) & (col < wm) & (row >= 0) & (row < hm)
        idx = np.where(inside, row * wm + col, -1)
        return idx, inside

    def uv_to_token_units(self, uv_orig: np.ndarray) -> np.ndarray:
        """Original-frame uv (..., 2) -> continuous token-grid coordinates (x, y) in token units."""
        return self.transform.to_input(uv_orig) / self.token_px
