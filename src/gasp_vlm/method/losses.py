"""GASP losses (§4.1 InfoNCE, §4.2 depth consistency) on correspondence-head embeddings.

Notation for one sample (all indices are *global visual indices* v = slot * S + idx_in_slot, see
models/layout.py; S = tokens per slot, N = num_slots * S visual tokens):

    emb             (N, D)   head embeddings of every visual token (normalised inside)
    anchor_tokens   (M,)     long, visual index of each anchor point's token
    target_tokens   (M, T)   long, visual index of the GT token in target slot t, or -1
    valid           (M, T)   bool, the pair (anchor m, target t) has a usable GT match
    target_depth    (M, T)   float, GT z-depth of the point in target frame t (<= 0: invalid)
    target_slots    (T,)     long, slot of each target frame
    token_depth     (N,)     float, per-token (pooled) depth
    token_depth_valid (N,)   bool

Similarities: logits[m, j] = cos(z_{a_m}, z_j) / τ, computed once per anchor as an (M, N) fp32
matrix -- never N×N, and never one row per (anchor, target) pair: the T targets of one anchor share
the same row, only the positive differs.

InfoNCE, per valid pair (m, t): candidates = every visual token of every slot except the anchor token
itself; positive = target_tokens[m, t]; loss = logsumexp_{j≠a} logits[m, j] − logits[m, pos].
The mean is over valid pairs.

Depth consistency, per pair (m, t) with valid[m, t] and target_depth > 0: p = softmax over the
tokens of slot target_slots[t] only; Ê = Σ_j p_j d_j; loss = |Ê − d*| / d*; mean over such pairs.
Tokens with invalid depth are removed from that softmax (masked to −inf, i.e. p is renormalised
over valid-depth tokens) because their depth value is a placeholder (0) that would pull Ê towards 0;
the anchor token is removed too, consistent with the InfoNCE candidate set (only matters when the
anchor's own slot is a target, e.g. Qwen's native two-frame slots). A pair whose target slot has no
valid-depth candidate is skipped.

Pairs whose GT token *is* the anchor token (same slot, same token -- a trivial match) are dropped
from both terms: the positive would not be a candidate.

No valid pair: the loss is 0 but still a function of ``emb`` (``emb.sum() * 0``), so every head
parameter gets a zero gradient rather than None and DDP/ZeRO never wait on a missing gradient.
All similarity math runs in fp32 with autocast disabled (cos/τ with τ = 0.07 magnifies bf16 error).

Multi-layer driver (``gasp_losses``): the targets, hence every mask above, are the same for every
supervised layer, so by default (``batched=True``) all L layers are processed at once: the heads as one
batched MLP on the stacked (L, ΣN_b, D) features, one (L, M, N) ``bmm`` per sample, both terms
vectorised over L with the masks built once per step outside the checkpointed region. The term
functions below take logits of shape (..., M, N) and broadcast the (M, ·) masks over the leading
dims, so the per-sample functions and both driver paths share one implementation of the math.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from gasp_vlm.method.heads import CorrespondenceHeads, _stack_compatible, stacked_heads_forward

DEFAULT_TAU = 0.07


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def anchor_similarity_logits(emb: Tensor, anchor_idx: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """cos(z_a, z_j) / τ for every anchor a and every token j: (N, D), (M,) -> (M, N) fp32.

    The anchor's own column is *not* masked here (callers decide).
    """
    with _no_autocast(emb.device):
        z = F.normalize(emb.float(), dim=-1, eps=1e-6)  # (N, D)
        return (z[anchor_idx] @ z.T) / tau  # (M, N)


def pair_mask(anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor, num_visual: int) -> Tensor:
    """(M, T) bool: pairs usable for InfoNCE (valid, GT token in range and not the anchor itself)."""
    return (valid.bool() & (target_tokens >= 0) & (target_tokens < num_visual)
            & (target_tokens != anchor_tokens[:, None]))


def depth_pair_mask(anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor, target_depth: Tensor,
                    num_visual: int) -> Tensor:
    """(M, T) bool: pairs usable for the depth term (a usable match and a finite GT depth > 0)."""
    return pair_mask(anchor_tokens, target_tokens, valid, num_visual) & torch.isfinite(target_depth) & (target_depth > 0)


class FlatPairs(NamedTuple):
    """Valid (anchor, target) pairs flattened to rows, P = number of valid pairs."""

    anchor_idx: Tensor  # (P,) long, global visual index of the anchor token
    pos_idx: Tensor  # (P,) long, global visual index of the GT token
    row: Tensor  # (P,) long, anchor row m
    col: Tensor  # (P,) long, target column t
    target_depth: Tensor | None  # (P,) float
    target_slot: Tensor | None  # (P,) long


def flatten_valid_pairs(anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor,
                        target_depth: Tensor | None = None, target_slots: Tensor | None = None,
                        num_visual: int | None = None) -> FlatPairs:
    """(M,), (M, T), (M, T) [, (M, T), (T,)] -> one row per valid pair (see ``FlatPairs``)."""
    n = int(num_visual) if num_visual is not None else torch.iinfo(torch.long).max
    mask = pair_mask(anchor_tokens, target_tokens, valid, n)
    row, col = mask.nonzero(as_tuple=True)
    return FlatPairs(
        anchor_idx=anchor_tokens[row], pos_idx=target_tokens[row, col], row=row, col=col,
        target_depth=None if target_depth is None else target_depth[row, col],
        target_slot=None if target_slots is None else target_slots[col])


class _NceMasks(NamedTuple):
    """Layer-independent inputs of the InfoNCE sums of one sample (M anchors, T targets, N tokens)."""

    cand_out: Tensor  # (M, N) bool, tokens removed from the candidates (the anchor itself [+ extras])
    pos: Tensor  # (M, T) long, positive token clamped into [0, N) (any value where not ``ok``)
    ok: Tensor  # (M, T) bool, pairs that contribute


def _nce_masks(anchor_idx: Tensor, pos_idx: Tensor, pair_ok: Tensor, num_visual: int,
               extra_exclude: Tensor | None = None) -> _NceMasks:
    m, n = anchor_idx.shape[0], int(num_visual)
    cand_out = torch.zeros(m, n, dtype=torch.bool, device=anchor_idx.device)
    cand_out[torch.arange(m, device=anchor_idx.device), anchor_idx] = True  # never its own candidate
    if extra_exclude is not None:
        cand_out |= extra_exclude
    return _NceMasks(cand_out, pos_idx.clamp(0, n - 1), pair_ok.bool())


def _nce_sums(logits: Tensor, k: _NceMasks) -> Tensor:
    """Sum of the InfoNCE terms: logits (..., M, N) raw cos/τ -> (...) (the masks broadcast over ...)."""
    lse = torch.logsumexp(logits.masked_fill(k.cand_out, float("-inf")), dim=-1)  # (..., M)
    pos = k.pos.expand(*logits.shape[:-2], *k.pos.shape)
    pos_logit = logits.gather(-1, pos)  # (..., M, T), from the unmasked (finite) logits
    per_pair = lse[..., None] - pos_logit
    per_pair = torch.where(k.ok, per_pair, torch.zeros_like(per_pair))
    return per_pair.sum((-2, -1))


def _infonce_terms(logits: Tensor, anchor_idx: Tensor, pos_idx: Tensor, pair_ok: Tensor,
                   extra_exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sum and count of the InfoNCE terms.

    logits (M, N) raw cos/τ (or (..., M, N): one sum per leading index); anchor_idx (M,); pos_idx
    (M, T) (any value where not ``pair_ok``); pair_ok (M, T) bool; extra_exclude (M, N) bool
    candidates to drop besides the anchor.
    """
    k = _nce_masks(anchor_idx, pos_idx, pair_ok, logits.shape[-1], extra_exclude)
    return _nce_sums(logits, k), k.ok.sum()


class _DepthMasks(NamedTuple):
    """Layer-independent inputs of the depth sums of one sample (see ``_depth_terms``)."""

    t_slots: Tensor  # (T,) long
    keep: Tensor  # (M, T, S) bool, candidates of the soft-argmax (valid depth, not the anchor)
    fill: Tensor  # (M, T, 1) float, value where not ``keep``: −inf, or 0 for rows without any candidate
    d_safe: Tensor  # (M, T, S) float, token depth (0 where not ``keep``)
    d_star: Tensor  # (M, T) float, GT depth (1 where not ``ok``)
    ok: Tensor  # (M, T) bool, pairs that contribute
    num_slots: int
    tokens_per_slot: int


def _depth_masks(anchor_idx: Tensor, depth_ok: Tensor, target_depth: Tensor, target_slots: Tensor,
                 token_depth: Tensor, token_depth_valid: Tensor, tokens_per_slot: int,
                 num_visual: int) -> _DepthMasks:
    n, s = int(num_visual), int(tokens_per_slot)
    if n % s:
        raise ValueError(f"{n} visual tokens is not a multiple of tokens_per_slot={s}")
    num_slots = n // s
    t_slots = target_slots.long()
    # Slot-major layout: slot t's tokens are the contiguous range [t*S, (t+1)*S).
    d = token_depth.float().view(num_slots, s)[t_slots]  # (T, S)
    keep = token_depth_valid.bool().view(num_slots, s)[t_slots] & torch.isfinite(d)  # (T, S)
    # Drop the anchor token where its own slot is a target slot.
    a_slot, a_pos = anchor_idx // s, anchor_idx % s  # (M,)
    is_anchor = (a_slot[:, None, None] == t_slots[None, :, None]) & (
        torch.arange(s, device=anchor_idx.device)[None, None, :] == a_pos[:, None, None])  # (M, T, S)
    keep = keep[None] & ~is_anchor  # (M, T, S)
    has_cand = keep.any(-1)  # (M, T)
    ok = depth_ok & has_cand
    # Rows without any candidate get a dummy all-zero row: a −inf row would give NaN gradients.
    fill = torch.where(has_cand, float("-inf"), 0.0)[..., None].to(torch.float32)  # (M, T, 1)
    d_safe = torch.where(keep, d[None], torch.zeros((), device=d.device))  # (M, T, S)
    d_star = torch.where(ok, target_depth.float(), torch.ones((), device=d.device))
    return _DepthMasks(t_slots, keep, fill, d_safe, d_star, ok, num_slots, s)


def _depth_sums(logits: Tensor, k: _DepthMasks) -> Tensor:
    """Sum of |Ê − d*| / d*: logits (..., M, N) raw cos/τ -> (...) (the masks broadcast over ...)."""
    lead, m = logits.shape[:-2], logits.shape[-2]
    slot_logits = logits.reshape(*lead, m, k.num_slots, k.tokens_per_slot).index_select(-2, k.t_slots)  # (..., M, T, S)
    masked = torch.where(k.keep, slot_logits, k.fill)
    p = torch.softmax(masked, dim=-1)  # (..., M, T, S)
    e_depth = (p * k.d_safe).sum(-1)  # (..., M, T) expected depth Ê
    rel = (e_depth - k.d_star).abs() / k.d_star
    rel = torch.where(k.ok, rel, torch.zeros_like(rel))
    return rel.sum((-2, -1))


def _depth_terms(logits: Tensor, anchor_idx: Tensor, depth_ok: Tensor, target_depth: Tensor,
                 target_slots: Tensor, token_depth: Tensor, token_depth_valid: Tensor,
                 tokens_per_slot: int) -> tuple[Tensor, Tensor]:
    """Sum and count of |Ê − d*| / d* (see module docstring); logits (M, N) (or (..., M, N)) raw cos/τ."""
    k = _depth_masks(anchor_idx, depth_ok, target_depth, target_slots, token_depth, token_depth_valid,
                     tokens_per_slot, logits.shape[-1])
    return _depth_sums(logits, k), k.ok.sum()


def _zero_like_graph(emb: Tensor) -> Tensor:
    """A 0 that still depends on ``emb`` (zero, not None, gradients downstream)."""
    return emb.float().sum() * 0.0


def _mean(total: Tensor, count: Tensor, emb: Tensor) -> Tensor:
    # Branch-free: with no pair, total == 0 and the result is emb.sum() * 0.
    return total / count.clamp_min(1).to(total.dtype) + _zero_like_graph(emb)


# --------------------------------------------------------------------------------------------
# Public per-sample losses
# --------------------------------------------------------------------------------------------
def infonce_loss(emb: Tensor, anchor_idx: Tensor, pos_idx: Tensor, tau: float = DEFAULT_TAU,
                 valid: Tensor | None = None) -> Tensor:
    """InfoNCE for one sample with one row per pair.

    emb (N, D); anchor_idx (P,) and pos_idx (P,) global visual indices; valid (P,) bool or None.
    Candidates: all N tokens except the row's anchor. Returns the mean over valid rows (a scalar).
    """
    n = emb.shape[0]
    valid = torch.ones_like(anchor_idx, dtype=torch.bool) if valid is None else valid.bool()
    ok = pair_mask(anchor_idx, pos_idx[:, None], valid[:, None], n)  # (P, 1)
    logits = anchor_similarity_logits(emb, anchor_idx, tau)  # (P, N)
    total, count = _infonce_terms(logits, anchor_idx, pos_idx[:, None], ok)
    return _mean(total, count, emb)


def infonce_loss_from_targets(emb: Tensor, anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor,
                              tau: float = DEFAULT_TAU) -> Tensor:
    """InfoNCE for one sample from per-anchor targets: (N, D), (M,), (M, T), (M, T) -> scalar.

    Same value as ``infonce_loss`` on ``flatten_valid_pairs(...)``, but with M×N logits (one row per anchor).
    """
    logits = anchor_similarity_logits(emb, anchor_tokens, tau)
    ok = pair_mask(anchor_tokens, target_tokens, valid, emb.shape[0])
    total, count = _infonce_terms(logits, anchor_tokens, target_tokens, ok)
    return _mean(total, count, emb)


def depth_consistency_loss(emb: Tensor, anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor,
                           target_depth: Tensor, target_slots: Tensor, token_depth: Tensor,
                           token_depth_valid: Tensor, tokens_per_slot: int,
                           tau: float = DEFAULT_TAU) -> Tensor:
    """Mean |Ê − d*| / d* over depth-valid pairs of one sample (shapes: module docstring) -> scalar."""
    logits = anchor_similarity_logits(emb, anchor_tokens, tau)
    ok = depth_pair_mask(anchor_tokens, target_tokens, valid, target_depth, emb.shape[0])
    total, count = _depth_terms(logits, anchor_tokens, ok, target_depth, target_slots, token_depth,
                                token_depth_valid, tokens_per_slot)
    return _mean(total, count, emb)


def gasp_layer_sums(emb: Tensor, anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor,
                    target_depth: Tensor, target_slots: Tensor, token_depth: Tensor,
                    token_depth_valid: Tensor, tokens_per_slot: int, tau: float = DEFAULT_TAU,
                    compute_depth: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(corr_sum, n_pairs, depth_sum, n_depth_pairs) of one sample, sharing one (M, N) similarity."""
    n = emb.shape[0]
    logits = anchor_similarity_logits(emb, anchor_tokens, tau)  # (M, N), shared by both terms
    ok = pair_mask(anchor_tokens, target_tokens, valid, n)
    corr_sum, n_pairs = _infonce_terms(logits, anchor_tokens, target_tokens, ok)
    if compute_depth:
        dok = ok & torch.isfinite(target_depth) & (target_depth > 0)
        depth_sum, n_depth = _depth_terms(logits, anchor_tokens, dok, target_depth, target_slots,
                                          token_depth, token_depth_valid, tokens_per_slot)
    else:
        depth_sum, n_depth = corr_sum * 0.0, torch.zeros_like(n_pairs)
    return corr_sum, n_pairs, depth_sum, n_depth


def gasp_layer_losses(emb: Tensor, anchor_tokens: Tensor, target_tokens: Tensor, valid: Tensor,
                      target_depth: Tensor, target_slots: Tensor, token_depth: Tensor,
                      token_depth_valid: Tensor, tokens_per_slot: int,
                      tau: float = DEFAULT_TAU) -> dict[str, Tensor]:
    """Both GASP terms of one sample and one layer from one shared (M, N) similarity.

    Returns dict(corr=scalar, depth=scalar, n_pairs=long, n_depth_pairs=long).
    """
    corr_sum, n_pairs, depth_sum, n_depth = gasp_layer_sums(
        emb, anchor_tokens, target_tokens, valid, target_depth, target_slots, token_depth,
        token_depth_valid, tokens_per_slot, tau)
    return dict(corr=_mean(corr_sum, n_pairs, emb), depth=_mean(depth_sum, n_depth, emb),
                n_pairs=n_pairs, n_depth_pairs=n_depth)


# --------------------------------------------------------------------------------------------
# Batched, multi-layer driver
# --------------------------------------------------------------------------------------------
@dataclass
class GaspLossOutput:
    """Result of ``gasp_losses``. ``loss`` = λ_corr·corr + λ_depth·depth (add it to the LM loss)."""

    loss: Tensor  # scalar, differentiable
    corr: Tensor  # scalar, differentiable: InfoNCE averaged over supervised layers
    depth: Tensor  # scalar, differentiable: depth term averaged over supervised layers
    per_layer_corr: Tensor  # (L,) detached, for logging
    per_layer_depth: Tensor  # (L,) detached
    n_pairs: int  # valid (anchor, target) pairs in the batch (after anchor subsampling)
    n_depth_pairs: int

    def log_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss_geo": self.loss.detach().item(), f"{prefix}loss_corr": self.corr.detach().item(),
               f"{prefix}loss_depth": self.depth.detach().item(), f"{prefix}n_pairs": float(self.n_pairs),
               f"{prefix}n_depth_pairs": float(self.n_depth_pairs)}
        for i, (c, d) in enumerate(zip(self.per_layer_corr.tolist(), self.per_layer_depth.tolist())):
            out[f"{prefix}layer{i}/loss_corr"] = c
            out[f"{prefix}layer{i}/loss_depth"] = d
        return out


_TARGET_FIELDS = ("anchor_tokens", "target_tokens", "valid", "target_depth", "target_slots",
                  "token_depth", "token_depth_valid")


def _select_anchors(targets: Any, num_visual: int, max_anchors: int | None,
                    generator: torch.Generator | None) -> dict[str, Tensor] | None:
    """One sample's target fields (on their own device), restricted to anchors with a usable pair.

    The random anchor subset (``max_anchors``) is drawn here, once per step, from ``generator``.
    """
    if targets is None:
        return None
    t = {f: torch.as_tensor(getattr(targets, f)) for f in _TARGET_FIELDS}
    keep = pair_mask(t["anchor_tokens"], t["target_tokens"], t["valid"], num_visual).any(1)  # (M,)
    rows = keep.nonzero(as_tuple=True)[0]
    if max_anchors is not None and rows.numel() > max_anchors:
        perm = torch.randperm(rows.numel(), generator=generator, device="cpu")[:max_anchors]
        rows = rows[perm.to(rows.device).sort().values]
    if rows.numel() == 0:
        return None
    for f in ("anchor_tokens", "target_tokens", "valid", "target_depth"):
        t[f] = t[f][rows]
    return t


def _to_device(t: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    def move(v: Tensor) -> Tensor:
        if v.device == device:
            return v
        if device.type == "cuda" and v.device.type == "cpu" and not v.is_pinned():
            # A pageable host->device copy may synchronise with the stream (it would wait for the
            # whole queued forward); from (cached) pinned memory the copy is truly asynchronous.
            v = v.pin_memory()
        return v.to(device, non_blocking=True)

    return {f: move(v) for f, v in t.items()}


def _prepare_targets(targets: Any, num_visual: int, device: torch.device, max_anchors: int | None,
                     generator: torch.Generator | None) -> dict[str, Tensor] | None:
    """Move one sample's targets to ``device`` and keep only anchors with a usable pair.

    Runs outside the checkpointed region so the forward and its recompute see identical rows and
    the random anchor subset is drawn once per step (shared by all layers).
    """
    t = _select_anchors(targets, num_visual, max_anchors, generator)
    return None if t is None else _to_device(t, device)


class _SampleTargets(NamedTuple):
    """Everything layer-independent about one sample's loss terms (built once per step, on device)."""

    anchor: Tensor  # (M,) long
    nce: _NceMasks
    depth: _DepthMasks | None  # None when the depth term is not computed
    n_pairs: int  # host-side counts (no device sync when the targets come from the CPU)
    n_depth_pairs: int


def _host_pair_counts(t: dict[str, Tensor], num_visual: int, tokens_per_slot: int,
                      compute_depth: bool) -> tuple[int, int]:
    """(#InfoNCE pairs, #depth pairs) of selected targets, on their own device: O(M·T), no (M, T, S).

    Same rule as ``_nce_masks``/``_depth_masks``: the depth row of a pair needs at least one valid-depth
    token in the target slot other than the anchor token itself.
    """
    anchor, tgt = t["anchor_tokens"], t["target_tokens"]
    ok = pair_mask(anchor, tgt, t["valid"], num_visual)
    if not compute_depth:
        return int(ok.sum()), 0
    td = t["target_depth"]
    dok = ok & torch.isfinite(td) & (td > 0)
    n, s = int(num_visual), int(tokens_per_slot)
    if n % s:
        raise ValueError(f"{n} visual tokens is not a multiple of tokens_per_slot={s}")
    t_slots = t["target_slots"].long()
    d = t["token_depth"].float().view(n // s, s)[t_slots]  # (T, S)
    keep = t["token_depth_valid"].bool().view(n // s, s)[t_slots] & torch.isfinite(d)  # (T, S)
    a_slot, a_pos = anchor // s, anchor % s  # (M,)
    anchor_kept = (a_slot[:, None] == t_slots[None, :]) & keep[:, a_pos].T  # (M, T)
    has_cand = keep.sum(-1)[None, :] - anchor_kept.long() > 0
    return int(ok.sum()), int((dok & has_cand).sum())


def _prepare_sample(targets: Any, num_visual: int, tokens_per_slot: int, device: torch.device,
                    max_anchors: int | None, generator: torch.Generator | None,
                    compute_depth: bool) -> _SampleTargets | None:
    t = _select_anchors(targets, num_visual, max_anchors, generator)
    if t is None:
        return None
    n_pairs, n_depth = _host_pair_counts(t, num_visual, tokens_per_slot, compute_depth)
    t = _to_device(t, device)
    anchor, tgt = t["anchor_tokens"], t["target_tokens"]
    ok = pair_mask(anchor, tgt, t["valid"], num_visual)
    nce = _nce_masks(anchor, tgt, ok, num_visual)
    depth = None
    if compute_depth:
        dok = ok & torch.isfinite(t["target_depth"]) & (t["target_depth"] > 0)
        depth = _depth_masks(anchor, dok, t["target_depth"], t["target_slots"], t["token_depth"],
                             t["token_depth_valid"], tokens_per_slot, num_visual)
    return _SampleTargets(anchor, nce, depth, n_pairs, n_depth)


def gasp_losses(
    per_layer_visual_feats: Sequence[Tensor | Sequence[Tensor]],
    heads: Sequence[nn.Module],
    targets_list: Sequence[Any | None],
    tokens_per_slot: int | Sequence[int],
    tau: float = DEFAULT_TAU,
    lambda_corr: float = 1.0,
    lambda_depth: float = 1.0,
    checkpoint: bool = True,
    max_anchors: int | None = None,
    generator: torch.Generator | None = None,
    batched: bool = True,
    layer_chunk: int | None = None,
) -> GaspLossOutput:
    """GASP geometric losses of a batch, averaged over the supervised layers.

    Args:
        per_layer_visual_feats: one entry per supervised layer l (aligned with ``heads``): a
            (B, N, D_model) tensor of visual-token hidden states, or a list of B (N_b, D_model)
            tensors when samples have different token counts.
        heads: head l is applied to entry l (a ``CorrespondenceHeads``, or any sequence of modules).
        targets_list: B objects with the ``TokenTargets`` fields (anchor_tokens, target_tokens,
            valid, target_depth, target_slots, token_depth, token_depth_valid) or None for samples
            without geometry (e.g. instruction-tuning samples).
        tokens_per_slot: S, an int or one per sample (``layout.tokens_per_slot``).
        checkpoint: non-reentrant ``torch.utils.checkpoint`` around the heads + loss (batched: one
            region for all layers, or one per ``layer_chunk``; per-layer: one region per layer).
        max_anchors: keep at most this many anchors (those with a usable pair) per sample, drawn
            with ``generator``; the same subset serves every layer.
        batched: run all layers at once (default): the heads as one batched MLP on the stacked
            (L, ΣN_b, D_model) features (``CorrespondenceHeads.forward``), the similarities as one
            (L, M, N) ``bmm`` per sample and both terms vectorised over L with the target masks
            built once per step (they are the same for every layer). O(1) ops in L instead of O(L):
            the per-layer path launches ~40 small kernels per layer, ×3 with checkpoint recompute and
            backward, which makes a 28-layer step CPU (launch/dispatch) bound. Same math; False
            selects the per-layer path (one head call + loss per layer).
        layer_chunk: batched path only: process the layers in chunks of this many (one checkpoint
            region each) to bound the transient memory; None = all layers in one chunk.

    Transient memory of the batched path (alive only inside the checkpointed region, i.e. during its
    forward and again during its recompute in backward), for K = layer_chunk or L layers, R = ΣN_b
    head rows, M anchors, N visual tokens, S tokens per slot, T target frames:
    stacked inputs K·R·D_model (input dtype) + hidden activations 2·K·R·d_hidden (autocast dtype) +
    stacked head weights K·(d_hidden·D_model + d_out·d_hidden) fp32 (+ autocast copy) + fp32
    similarity work per sample ≈ 3·K·M·N (logits, masked copy, exp) + 3·K·M·T·S (depth softmax).
    E.g. K = 28, R = N = 4096, D_model = 3584, d_hidden = 1024, M = 512, T·S = 3584, bf16 autocast:
    0.8 + 0.4 + 0.6 + 0.7 + 0.6 GiB ≤ 3.1 GiB, not all alive at once: 2.5 GiB peak measured on an
    H100 (per-layer path: 0.84 GiB). Use ``layer_chunk`` when this does not fit.

    Every head runs exactly once per step (on the concatenated visual tokens of the samples that
    have targets, or on one dummy row when none has), so every rank runs every head each step and
    all head parameters receive a gradient (zero when there is nothing to supervise).
    Pairs are pooled over the batch: layer l's term = Σ_b sum_b / Σ_b count_b.
    With ``lambda_depth == 0`` the depth term is not computed (reported as 0, n_depth_pairs 0).
    The λ = 0 LM-only control should not call this at all (and build no heads).
    """
    num_layers = len(per_layer_visual_feats)
    if num_layers != len(heads):
        raise ValueError(f"{num_layers} feature layers but {len(heads)} heads")
    if num_layers == 0:
        raise ValueError("gasp_losses needs at least one supervised layer")
    fn = _gasp_losses_batched if batched else _gasp_losses_per_layer
    kw = dict(layer_chunk=layer_chunk) if batched else {}
    return fn(per_layer_visual_feats, heads, targets_list, tokens_per_slot, tau, lambda_corr, lambda_depth,
              checkpoint, max_anchors, generator, **kw)


def _output(corr_sums: Tensor, depth_sums: Tensor, n_pair: Tensor, n_depth: Tensor, lambda_corr: float,
            lambda_depth: float, n_pairs: int, n_depth_pairs: int) -> GaspLossOutput:
    """(L,) per-layer sums of both terms; n_pair/n_depth: pair counts (the same for every layer)."""
    corr_l = corr_sums / n_pair.clamp_min(1.0)  # (L,)
    depth_l = depth_sums / n_depth.clamp_min(1.0)
    corr, depth = corr_l.mean(), depth_l.mean()
    loss = lambda_corr * corr + lambda_depth * depth
    return GaspLossOutput(
        loss=loss, corr=corr, depth=depth, per_layer_corr=corr_l.detach(), per_layer_depth=depth_l.detach(),
        n_pairs=int(n_pairs), n_depth_pairs=int(n_depth_pairs))


def _apply_heads(heads: Sequence[nn.Module], x: Tensor, lo: int, hi: int) -> Tensor:
    """Heads lo..hi-1 on x (hi-lo, R, D_model) -> (hi-lo, R, D_out): one batched MLP when possible."""
    if isinstance(heads, CorrespondenceHeads) and lo == 0 and hi == len(heads) and heads.stackable:
        return heads(x)  # through Module.__call__: hooks on the container fire once
    chunk = [heads[i] for i in range(lo, hi)]
    if _stack_compatible(chunk):
        return stacked_heads_forward(chunk, x)
    outs = [h(x[i]) for i, h in enumerate(chunk)]  # generic heads: one call each, loss still batched
    if len({o.shape for o in outs}) != 1:
        raise ValueError("gasp_losses(batched=True) needs heads with one output shape; use batched=False")
    return torch.stack(outs)


def _gasp_losses_batched(per_layer_visual_feats, heads, targets_list, tokens_per_slot, tau, lambda_corr,
                         lambda_depth, checkpoint, max_anchors, generator, layer_chunk=None) -> GaspLossOutput:
    num_layers = len(per_layer_visual_feats)
    entries = list(per_layer_visual_feats)
    tensor_form = all(isinstance(e, Tensor) for e in entries)
    if tensor_form:
        shape = entries[0].shape
        if any(e.shape != shape for e in entries):
            raise ValueError(f"per-layer features of different shapes: {[tuple(e.shape) for e in entries]}")
        batch, sizes = shape[0], [shape[1]] * shape[0]
        device = entries[0].device
    else:
        entries = [list(e.unbind(0)) if isinstance(e, Tensor) else list(e) for e in entries]
        batch, sizes = len(entries[0]), [x.shape[0] for x in entries[0]]
        for li, e in enumerate(entries):
            if len(e) != batch:
                raise ValueError(f"layer {li}: {len(e)} samples, expected {batch}")
        device = entries[0][0].device
    if len(targets_list) != batch:
        raise ValueError(f"{batch} samples of features but {len(targets_list)} targets")
    tps = [int(tokens_per_slot)] * batch if isinstance(tokens_per_slot, int) else [int(s) for s in tokens_per_slot]
    compute_depth = lambda_depth != 0

    # Layer-independent, once per step and outside the checkpointed region: anchor draw, transfer,
    # every mask and count (the recompute reuses them).
    prepared = [_prepare_sample(tg, sizes[b], tps[b], device, max_anchors, generator, compute_depth)
                for b, tg in enumerate(targets_list)]
    active = [b for b in range(batch) if prepared[b] is not None]
    n_pairs = sum(prepared[b].n_pairs for b in active)
    n_depth_pairs = sum(prepared[b].n_depth_pairs for b in active)
    if active:
        counts = [prepared[b].nce.ok.sum() for b in active]
        n_pair_t = (counts[0] if len(counts) == 1 else torch.stack(counts).sum()).float()
        if compute_depth:
            dcounts = [prepared[b].depth.ok.sum() for b in active]
            n_depth_t = (dcounts[0] if len(dcounts) == 1 else torch.stack(dcounts).sum()).float()
        else:
            n_depth_t = torch.zeros((), device=device)
    else:
        n_pair_t = n_depth_t = torch.zeros((), device=device)

    def head_inputs(chunk: list) -> Tensor:
        """(K, R, D_model): the active samples' rows of every layer of the chunk (one dummy row if none)."""
        if tensor_form:
            x = torch.stack(chunk)  # (K, B, N, D)
            if not active:
                return x[:, 0, :1].contiguous()
            if len(active) == batch:
                return x.flatten(1, 2)
            return torch.cat([x[:, b] for b in active], 1)
        if not active:
            return torch.stack([e[0][:1] for e in chunk])
        per_sample = [torch.stack([e[b] for e in chunk]) for b in active]  # (K, N_b, D) each
        return per_sample[0] if len(per_sample) == 1 else torch.cat(per_sample, 1)

    def chunk_fn(lo: int, hi: int, *flat: Tensor) -> Tensor:
        """Layers lo..hi-1 -> (K, 2) [corr_sum, depth_sum] per layer."""
        chunk = list(flat) if tensor_form else [list(flat[i * batch:(i + 1) * batch]) for i in range(hi - lo)]
        z = _apply_heads(heads, head_inputs(chunk), lo, hi)  # (K, R, D_out)
        with _no_autocast(z.device):
            zero = z.float().sum((1, 2)) * 0.0  # (K,): keeps every head in the graph
            if not active:
                return torch.stack([zero, zero], 1)
            zn = F.normalize(z.float(), dim=-1, eps=1e-6)  # (K, R, D_out)
            corr, depth = zero, zero
            for b, zb in zip(active, zn.split([sizes[b] for b in active], 1)):
                st = prepared[b]
                logits = torch.bmm(zb.index_select(1, st.anchor), zb.transpose(1, 2)) / tau  # (K, M, N)
                corr = corr + _nce_sums(logits, st.nce)
                if compute_depth:
                    depth = depth + _depth_sums(logits, st.depth)
            if not compute_depth:
                depth = corr * 0.0
            return torch.stack([corr, depth], 1)

    step = num_layers if layer_chunk is None else max(1, int(layer_chunk))
    outs = []
    for lo in range(0, num_layers, step):
        hi = min(num_layers, lo + step)
        flat = entries[lo:hi] if tensor_form else [x for e in entries[lo:hi] for x in e]
        if checkpoint and torch.is_grad_enabled():
            outs.append(_checkpoint(chunk_fn, lo, hi, *flat, use_reentrant=False))
        else:
            outs.append(chunk_fn(lo, hi, *flat))
    sums = outs[0] if len(outs) == 1 else torch.cat(outs, 0)  # (L, 2)
    return _output(sums[:, 0], sums[:, 1], n_pair_t, n_depth_t, lambda_corr, lambda_depth, n_pairs, n_depth_pairs)


def _gasp_losses_per_layer(per_layer_visual_feats, heads, targets_list, tokens_per_slot, tau, lambda_corr,
                           lambda_depth, checkpoint, max_anchors, generator) -> GaspLossOutput:
    """The per-layer path (``gasp_losses(batched=False)``): one head call + loss (+ checkpoint) per layer.
    (``gasp_losses`` has checked the layer / head counts.)"""
    def split(entry) -> list[Tensor]:
        return list(entry.unbind(0)) if isinstance(entry, Tensor) else list(entry)

    compute_depth = lambda_depth != 0  # a corr-only ablation skips the (M, T, S) softmax
    first = split(per_layer_visual_feats[0])
    batch = len(first)
    if len(targets_list) != batch:
        raise ValueError(f"{batch} samples of features but {len(targets_list)} targets")
    tps = [int(tokens_per_slot)] * batch if isinstance(tokens_per_slot, int) else [int(s) for s in tokens_per_slot]
    device = first[0].device

    prepared = [_prepare_targets(tg, x.shape[0], device, max_anchors, generator) for tg, x in zip(targets_list, first)]
    active = [b for b in range(batch) if prepared[b] is not None]
    sizes = [first[b].shape[0] for b in active]

    def layer_fn(head: nn.Module, *feats: Tensor) -> Tensor:
        """feats: the active samples' (N_b, D_model) features -> (4,) [corr_sum, n, depth_sum, n_depth]."""
        if not active:
            dummy = head(feats[0][:1])  # keep the head in the graph: one call, zero loss
            z = _zero_like_graph(dummy)
            return torch.stack([z, z.detach(), z, z.detach()])
        emb_all = head(torch.cat(feats, 0))  # (Σ N_b, D_out): one call per layer
        zero = _zero_like_graph(emb_all)
        sums = [zero, zero.detach(), zero, zero.detach()]
        for b, emb in zip(active, emb_all.split(sizes, 0)):
            tg = prepared[b]
            cs, n, ds, nd = gasp_layer_sums(emb, tg["anchor_tokens"], tg["target_tokens"], tg["valid"],
                                            tg["target_depth"], tg["target_slots"], tg["token_depth"],
                                            tg["token_depth_valid"], tps[b], tau,
                                            compute_depth=compute_depth)
            sums = [sums[0] + cs, sums[1] + n.float(), sums[2] + ds, sums[3] + nd.float()]
        return torch.stack(sums)

    per_layer = []
    for li, (head, entry) in enumerate(zip(heads, per_layer_visual_feats)):
        feats = split(entry)
        if len(feats) != batch:
            raise ValueError(f"layer {li}: {len(feats)} samples, expected {batch}")
        args = [feats[b] for b in active] if active else [feats[0]]
        if checkpoint and torch.is_grad_enabled():
            out = _checkpoint(layer_fn, head, *args, use_reentrant=False)
        else:
            out = layer_fn(head, *args)
        per_layer.append(out)

    stacked = torch.stack(per_layer)  # (L, 4)
    return _output(stacked[:, 0], stacked[:, 2], stacked[:, 1], stacked[:, 3], lambda_corr, lambda_depth,
                   int(stacked[0, 1].item()), int(stacked[0, 3].item()))
