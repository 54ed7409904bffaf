"""The GASP training wrapper: backbone VLM + per-layer correspondence heads + the total loss.

    L = L_LM + λ_corr · L_corr + λ_depth · L_depth

``GaspModel`` is the single ``nn.Module`` every engine (DDP, DeepSpeed ZeRO-2) wraps: the backbone
(the HF model, or the PeftModel around it) and the heads are both registered submodules, the heads
*outside* PEFT (no ``modules_to_save`` copies; saved separately as ``heads.safetensors``).

One forward per micro-batch (its geometry and instruction parts in turn, train/stream.py):
``adapter.forward_capture`` runs the frozen vision tower under ``no_grad``
(``mm_encoder_outputs``, no ViT graph), captures the supervised layers' visual-token hidden states
*with* their graph, and returns the LM loss from the labels (answer tokens only). Heads and losses run
after the forward on those slices (``gasp_losses``): by default all supervised layers at once
(``gasp.batched_layers``: the heads as one batched MLP on the stacked features, the losses vectorised
over layers, one checkpointed region), so the GASP part launches O(1) kernels in the number of layers;
``batched_layers: false`` selects the per-layer path (one checkpointed head call + loss per layer), same math.

The LM-only control (λ_corr = λ_depth = 0) is a first-class path with *no heads at all*: no hooks,
no head parameters, so its step cost is the true baseline and DDP has no parameter that could miss a
gradient. With heads, every head runs every step on every rank (``gasp_losses`` makes a zero-weighted
dummy call on batches without correspondences), so DDP/ZeRO see the same calls everywhere.

Choice of λ_depth = 0.5 (default): the depth term is a relative error |Ê − d*|/d* of order 0.1–1, the
InfoNCE term is of order log(N) ≈ 5–8 at init; 0.5 keeps the depth term a secondary signal that still
shapes the soft-argmax sharpness without dominating the matching objective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from gasp_vlm.method.heads import CorrespondenceHeads, resolve_layer_indices
from gasp_vlm.method.losses import DEFAULT_TAU, gasp_losses


@dataclass
class GaspLossConfig:
    """Heads + loss settings (``gasp`` section of the training config)."""

    tau: float = DEFAULT_TAU
    lambda_corr: float = 1.0
    lambda_depth: float = 0.5  # see module docstring
    layers: list[int] | None = None  # supervised decoder layers; None = all
    max_anchors: int | None = None  # per sample, drawn once per step and shared by all layers
    d_hidden: int = 1024
    d_out: int = 256
    checkpoint: bool = True  # non-reentrant checkpoint around the heads + loss (see batched_layers)
    # All layers' heads + losses in one batched pass (O(1) ops in the number of layers, one checkpoint
    # region; transient memory in gasp_losses' docstring) instead of one pass per layer. Same math.
    batched_layers: bool = True
    calib_tokens: int = 512  # hidden states used to calibrate the SVD init (0 = none)
    head_init: str = "svd"  # svd: the paper's init from each layer's q_proj | random: PyTorch default (ablation)
    # Which q_proj initialises the head on layer l's output: "next" (layer l+1's: the projection that
    # actually reads that output; the last layer keeps its own) or "same" (layer l's, the paper's wording).
    # With head_norm "rms" (the head reads the RMS-normalised stream, as every q_proj does after its
    # RMSNorm; the gain is folded into the SVD init) the head starts as the real query of that stream.
    # Measured on the demo preset, 3 seeds, same data and steps (README, Method choices): next+rms gives
    # the model's own qk PCK@1 0.076 ± 0.005 (GASP full) / 0.074 ± 0.010 (corr-only) against 0.068 ± 0.005 /
    # 0.060 ± 0.002 for same+none, hidden PCK@1 0.557 vs 0.579 (within one sd).
    head_init_layer: str = "next"
    head_norm: str = "rms"

    @property
    def lm_only(self) -> bool:
        return self.lambda_corr == 0 and self.lambda_depth == 0

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_layers(num_layers: int, layers: Sequence[int] | None) -> list[int]:
    """``gasp.layers`` -> decoder-layer indices (the heads' own rule), errors naming the config key."""
    try:
        return resolve_layer_indices(num_layers, layers)
    except (IndexError, ValueError) as e:
        raise ValueError(f"gasp.layers: {e}") from None


@torch.no_grad()
def calibration_hidden(adapter, batch, layers: Sequence[int], max_tokens: int) -> dict[int, Tensor]:
    """{layer: (n, D) fp32} visual-token hidden states of ``batch`` (no grad), n <= max_tokens."""
    cap = adapter.forward_capture(batch, what=("hidden",), layers=list(layers), grad=False)
    out = {}
    for l in layers:
        h = cap.hidden[l].reshape(-1, cap.hidden[l].shape[-1]).float()
        if h.shape[0] > max_tokens:  # evenly spaced rows: deterministic and spread over frames
            h = h[torch.linspace(0, h.shape[0] - 1, max_tokens).long()]
        out[l] = h
    return out


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / RMS(x) over the last dim, in fp32 (the parameter-free half of an RMSNorm), back in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def build_heads(adapter, cfg: GaspLossConfig, calib_batch=None) -> CorrespondenceHeads | None:
    """Heads for ``cfg.layers`` SVD-initialised from each layer's q_proj (fp32, before LoRA/sharding).

    Head l reads the *output* of decoder layer l and is initialised from layer l's own q_proj
    (``head_init_layer: same``) or from layer l+1's (``next``: the q_proj that reads that output), with
    that q_proj's input RMSNorm gain factored in (``norm_weight``) and, when ``calib_batch`` is given,
    the head's real inputs (layer l's output at visual tokens, RMS-normalised under ``head_norm: rms``)
    as calibration for the GELU operating point. Returns None for the LM-only control.
    Must be called on the un-wrapped model: LoRA would change nothing at init (B = 0) but the
    weights must be read before any engine shards them.
    """
    if cfg.lm_only:
        return None
    layers = resolve_layers(adapter.num_layers, cfg.layers)
    if cfg.head_init == "random":
        heads = CorrespondenceHeads.random_init(adapter.hidden_size, adapter.num_layers, layers, d_hidden=cfg.d_hidden,
                                                d_out=cfg.d_out, seed=0)
        return heads.to(adapter.device)
    if cfg.head_init != "svd":
        raise ValueError(f"gasp.head_init must be 'svd' or 'random', got {cfg.head_init!r}")
    if cfg.head_init_layer not in ("same", "next") or cfg.head_norm not in ("none", "rms"):
        raise ValueError(f"gasp.head_init_layer must be same|next and gasp.head_norm none|rms, got "
                         f"{cfg.head_init_layer!r}, {cfg.head_norm!r}")
    calib = (calibration_hidden(adapter, calib_batch, layers, cfg.calib_tokens)
             if calib_batch is not None and cfg.calib_tokens > 0 else None)
    if calib is not None and cfg.head_norm == "rms":
        calib = {l: rms_normalize(h) for l, h in calib.items()}
    q_w, q_b, norm_w = {}, {}, {}
    dec = adapter.decoder_layers()
    for l in layers:
        src = min(l + 1, adapter.num_layers - 1) if cfg.head_init_layer == "next" else l
        q, _ = adapter.attn_projections(src)
        q_w[l] = q.weight.detach().float()
        q_b[l] = q.bias.detach().float() if q.bias is not None else None
        ln = getattr(dec[src], "input_layernorm", None)
        norm_w[l] = ln.weight.detach().float() if ln is not None and getattr(ln, "weight", None) is not None else None
    gen = torch.Generator().manual_seed(0)
    heads = CorrespondenceHeads.from_q_projs(q_w, q_b, layers=layers, d_hidden=cfg.d_hidden, d_out=cfg.d_out,
                                             norm_weights=norm_w, calib_inputs=calib, generator=gen)
    heads.input_norm = cfg.head_norm  # read by every consumer of the heads (training, diagnose)
    return heads.to(adapter.device)


class GaspModel(nn.Module):
    """Backbone + heads; ``forward(batch, targets) -> dict`` of loss terms (see module docstring)."""

    def __init__(self, backbone: nn.Module, adapter, heads: CorrespondenceHeads | None,
                 loss_cfg: GaspLossConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.loss_cfg = loss_cfg
        # The adapter is plain Python (not a Module): it drives the backbone's in-place-LoRA'd HF model.
        self._adapter = adapter
        if heads is None and not loss_cfg.lm_only:
            raise ValueError("GaspModel: λ_corr/λ_depth > 0 need heads (build_heads)")

    @property
    def adapter(self):
        return self._adapter

    @property
    def lm_only(self) -> bool:
        return self.heads is None

    def forward(self, batch, targets: Sequence[Any | None] | None = None, rows: Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """batch: PreparedBatch (labels on answer tokens, or None), or a list of ``Part``s run in this
        one forward (a geometry and an instruction part: the paper's whole objective in one backward);
        targets: one TokenTargets-like object (or None) per sample; rows (B, N): sequence positions the
        heads read (default: the visual tokens; instruction batches pass any valid positions, their
        heads see a zero loss).

        Returns dict(loss, lm, corr, depth [, per_layer_corr (L,), per_layer_depth (L,), n_pairs]):
        ``loss`` the sum over parts, each term from the parts that carry it.
        """
        parts = list(batch) if isinstance(batch, (list, tuple)) else [Part(batch, targets, rows)]
        outs = {p.kind: self._forward_part(p, generator) for p in parts}
        if len(outs) != len(parts):
            raise ValueError(f"GaspModel: at most one part per kind, got {[p.kind for p in parts]}")
        if len(outs) == 1:
            return next(iter(outs.values()))
        # lm from the instruction part, corr/depth (+ per-layer terms) from the geometry part; the
        # other part's term is an exact 0 that only keeps every parameter in the graph
        total = dict(outs["geo"])
        total["loss"] = outs["geo"]["loss"] + outs["instr"]["loss"]
        total["lm"] = outs["instr"]["lm"]
        return total

    def _forward_part(self, part: "Part", generator: torch.Generator | None) -> dict[str, Tensor]:
        batch, targets, rows = part.batch, part.targets, part.rows
        layers = [] if self.heads is None else self.heads.layer_indices
        cap = self._adapter.forward_capture(batch, what=("hidden",), layers=layers, grad=True,
                                            freeze_vision=True, rows=rows)
        if cap.loss is not None:
            lm = cap.loss.float()
        else:
            # No answer tokens: LM term 0, but tied to the (last-position) logits so lm_head/final norm
            # get a zero (not a missing) gradient -- DDP/ZeRO wait for every trainable parameter.
            lm = cap.logits.float().sum() * 0.0
        zero = lm.new_zeros(())
        if self.heads is None:
            return dict(loss=lm, lm=lm.detach(), corr=zero, depth=zero)
        b = batch.inputs["input_ids"].shape[0]
        targets = list(targets) if targets is not None else [None] * b
        feats = [cap.hidden[l] for l in layers]  # each (B, N, D)
        if self.loss_cfg.head_norm == "rms":
            feats = [rms_normalize(f) for f in feats]
        if rows is not None:
            tps = 1
        else:
            tps = [lay.tokens_per_slot for lay in batch.layouts]
        c = self.loss_cfg
        geo = gasp_losses(feats, self.heads, targets, tps, tau=c.tau, lambda_corr=c.lambda_corr,
                          lambda_depth=c.lambda_depth, checkpoint=c.checkpoint, max_anchors=c.max_anchors,
                          generator=generator, batched=c.batched_layers)
        loss = lm + geo.loss
        return dict(loss=loss, lm=lm.detach(), corr=geo.corr.detach(), depth=geo.depth.detach(),
                    per_layer_corr=geo.per_layer_corr, per_layer_depth=geo.per_layer_depth,
                    n_pairs=torch.tensor(float(geo.n_pairs)))


@dataclass
class Part:
    """One part of a micro-batch: a PreparedBatch with its targets (geometry) or head rows (instructions)."""

    batch: Any
    targets: Sequence[Any | None] | None = None
    rows: Tensor | None = None  # set for instruction parts (no visual-token targets)

    @property
    def kind(self) -> str:
        return "geo" if self.rows is None else "instr"
