"""A built-in geometric sequence source with exact ground truth, for tests, benches and smoke runs.

Scene: a random colour texture with a smooth random z-depth field attached to it (2–6 m), seen by an
*orthographic* camera that translates parallel to the image plane. Under orthographic projection a
lateral translation shifts every point by the same pixel offset whatever its depth, and z-depth is
unchanged by it -- so frame t is an exact crop of the texture at offset o_t, a point at frame-0 pixel
u appears at u + (o_0 − o_t) in frame t, and its GT depth there equals its depth in frame 0.
Offsets move in whole-token steps (``token_px``) so correspondences sit on token centres.

Targets follow the ``TokenTargets`` contract of data/targets.py (anchor frame 0, every token of slot
0 an anchor, one target per other frame) and are computed from the model's ``TokenLayout``, so they
are correct for any family / frame mode whose layout has one frame per slot.
"""

from __future__ import annotations

import numpy as np
import torch

from gasp_vlm.data.targets import TokenTargets


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) smooth random field in [0, 1] (bilinear upsampling of a coarse random grid)."""
    from PIL import Image

    coarse = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse).resize((w, h), resample=Image.BILINEAR)  # float32 array -> mode "F"
    f = np.asarray(img, dtype=np.float32)
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


class OrthoShiftSequences:
    """Deterministic map-style source: item i -> dict(frames, shifts_px, depth_fields, kind="geo")."""

    def __init__(self, num_sequences: int = 64, frame_hw: tuple[int, int] = (112, 112), token_px: int = 28,
                 max_step_tokens: int = 1, seed: int = 0) -> None:
        self.n, self.hw, self.token_px = int(num_sequences), tuple(frame_hw), int(token_px)
        self.max_step, self.seed = int(max_step_tokens), int(seed)

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int, num_frames: int) -> dict:
        h, w = self.hw
        rng = np.random.default_rng([self.seed, int(index)])
        # Offsets: a random walk in whole tokens, kept inside a texture 2 tokens larger per side.
        margin = 2 * self.token_px
        steps = rng.integers(-self.max_step, self.max_step + 1, size=(num_frames, 2)) * self.token_px
        steps[0] = 0
        off = np.clip(np.cumsum(steps, 0), -margin, margin)  # (F, 2) x, y in px
        th, tw = h + 2 * margin, w + 2 * margin
        colour = np.stack([_smooth_field(rng, th, tw, 12) for _ in range(3)], -1)
        colour = (0.7 * colour + 0.3 * rng.random((th, tw, 3))) * 255  # smooth + fine grain
        depth = 2.0 + 4.0 * _smooth_field(rng, th, tw, 6)  # (th, tw) metres
        frames, depths = [], []
        for ox, oy in off:
            y0, x0 = margin + int(oy), margin + int(ox)
            frames.append(colour[y0:y0 + h, x0:x0 + w].astype(np.uint8))
            depths.append(depth[y0:y0 + h, x0:x0 + w].astype(np.float32))
        return dict(kind="geo", frames=frames, offsets_px=off.astype(np.float64), depths=depths)


def ortho_targets(layout, item: dict) -> TokenTargets:
    """Exact targets of an ``OrthoShiftSequences`` item for a model ``layout`` (one frame per slot)."""
    if not layout.one_frame_per_slot:
        raise ValueError(f"toy geometry needs one frame per slot; frame mode {layout.frame_mode!r} pairs frames")
    s = layout.tokens_per_slot
    centres = layout.token_centers_orig()  # (S, 2) uv in frame pixels
    boxes = layout.token_boxes_orig()  # (S, 4)
    off = item["offsets_px"]
    n_frames = len(item["frames"])
    # Per-token depth: mean of the depth field over the token's box, per slot.
    token_depth = np.zeros(layout.num_visual, dtype=np.float32)
    for slot, frames in enumerate(layout.slot_frames):
        d = item["depths"][frames[0]]
        for j, (x0, y0, x1, y1) in enumerate(boxes):
            patch = d[max(int(y0), 0):max(int(np.ceil(y1)), 1), max(int(x0), 0):max(int(np.ceil(x1)), 1)]
            token_depth[slot * s + j] = float(patch.mean()) if patch.size else 0.0
    anchor_slot = layout.slot_of_frame(0)
    anchors = np.arange(s) + anchor_slot * s  # every token of frame 0
    tgt_frames = [f for f in range(1, n_frames)]
    tgt_slots = [layout.slot_of_frame(f) for f in tgt_frames]
    d0 = item["depths"][0]
    a_depth = np.array([d0[min(int(v), d0.shape[0] - 1), min(int(u), d0.shape[1] - 1)] for u, v in centres])
    tt = np.full((s, len(tgt_frames)), -1, dtype=np.int64)
    valid = np.zeros((s, len(tgt_frames)), dtype=bool)
    target_uv = np.full((s, len(tgt_frames), 2), np.nan, dtype=np.float32)
    for k, (f, slot) in enumerate(zip(tgt_frames, tgt_slots)):
        uv_t = centres + (off[0] - off[f])[None, :]  # same scene point seen in frame f
        idx, inside = layout.pixel_to_token(uv_t)
        tt[:, k] = np.where(inside, idx + slot * s, -1)
        valid[:, k] = inside
        target_uv[inside, k] = uv_t[inside]
    return TokenTargets(
        anchor_frame=0, anchor_tokens=torch.from_numpy(anchors).long(),
        query_uv=torch.from_numpy(centres.astype(np.float32)),
        target_frames=torch.tensor(tgt_frames, dtype=torch.long),
        target_slots=torch.tensor(tgt_slots, dtype=torch.long),
        target_tokens=torch.from_numpy(tt), valid=torch.from_numpy(valid),
        target_uv=torch.from_numpy(target_uv),
        target_depth=torch.from_numpy(np.where(valid, a_depth[:, None], 0.0)).float(),
        token_depth=torch.from_numpy(token_depth), token_depth_valid=torch.from_numpy(token_depth > 0))
