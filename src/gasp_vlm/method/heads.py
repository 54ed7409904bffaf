"""Per-layer correspondence heads (GASP §4.1), initialised from an SVD of the layer's ``q_proj``.

A head maps one decoder layer's visual hidden states to a low-dimensional matching space:

    z = W2 · GELU(W1 · x + b1) + b2,     x: (..., d_model)  ->  z: (..., d_out)

with W1: (d_hidden, d_model), W2: (d_out, d_hidden). Defaults d_hidden = 1024, d_out = 256.

SVD initialisation (``CorrespondenceHead.from_q_proj``)
------------------------------------------------------
Let the layer's pretrained query projection be q(x) = W_q x + b_q, W_q: (d_q, d_model), and take its
thin SVD in fp32, W_q = U S Vᵀ (rank R = min(d_q, d_model), singular values descending).
With r = min(d_hidden, R) hidden units carrying singular directions and k = min(d_out, r) output dims:

    W1[:r]   = α · √S_r · V_rᵀ                 (row space of W1[:r] == span of the top-r right singular vectors)
    W2[:k,:r] = [ diag(√S_k) | 0 ] / (α · g1)  (the "projection of U_r √S_r onto d_out dims": U_kᵀ U_r √S_r)
    b1       = c − W1 μ                       (every hidden unit operates around the GELU point c)
    b2       = U_kᵀ b_q + S_k V_kᵀ μ − g0 · W2 · 1

where c = √2 is the inflection point of GELU (GELU''(z) = φ(z)(2 − z²) vanishes there), g0 = GELU(c),
g1 = GELU'(c) ≈ 1.129, μ the centre of the expected inputs (0 unless ``calib_inputs`` are given) and
α a global scale chosen so that the largest hidden pre-activation has standard deviation
``preact_std`` (default 0.5) around c.

Why: linearising GELU at c, GELU(c + δ) = g0 + g1 δ + O(δ³) -- the quadratic term is zero at the
inflection point, so with |δ| ≲ 0.5 the relative non-linearity is ~1 %. The linearised head is then

    z(x) ≈ S_k V_kᵀ x + U_kᵀ b_q = U_kᵀ · (U_k U_kᵀ q(x)),

i.e. the projection of the query onto its dominant rank-k output subspace (the rank-d_out truncation
of q_proj, bias projected too), expressed in the orthonormal basis U_k. Because U_k has orthonormal
columns, inner products, norms and cosine similarities of z equal those of the truncated queries:
at init the head reproduces the geometry of the dominant query subspace. W1 and W2 share √S
(a balanced factorisation, up to α) so both layers start with comparable gradient scales.

Padding: hidden units r..d_hidden (only when d_hidden > R) get small random W1 rows (std
``pad_std`` relative to the mean W1 row norm) so they are not symmetric, and zero W2 columns so the
init output is unchanged; the same holds for hidden units k..r (they carry singular directions but
have zero W2 columns). Output dims k..d_out (only when d_out > r) start at zero.

Inputs: the head reads the raw residual stream, whereas q_proj reads its RMS-normalised copy. Pass
the layer's ``input_layernorm`` weight as ``norm_weight`` to factor W_q·diag(g) instead (cosine
similarities of a linear map are invariant to the per-token RMS scale), and pass ``calib_inputs`` (a
few hundred hidden states of that layer) so α and μ match the real input scale -- residual streams
are far from unit scale, and without calibration GELU may leave its near-linear regime.
Which layer's q_proj initialises which head is the caller's choice (the paper: "the same layer").

All layers at once (``CorrespondenceHeads.forward`` / ``stacked_heads_forward``)
------------------------------------------------------------------------------
Each head stays its own module (state-dict names ``{i}.fc1.weight`` ... and the SVD init unchanged,
so checkpoints are compatible), but the L heads can also run as *one* batched MLP on stacked inputs
(L, R, d_model): the per-layer weights are ``torch.stack``-ed on every call (differentiable -- the
backward of the stack hands every per-layer parameter its own slice of the gradient) and applied
with two ``baddbmm``. That is O(1) kernel launches in L instead of 6·L, which matters when the step
is bound by Python dispatch / launch overhead (many small per-layer ops) rather than GPU time.
Transient memory of one call: the stacked weights (L·(d_hidden·d_model + d_out·d_hidden) in the
parameter dtype, plus their autocast copies) and the hidden activations (L·R·d_hidden, two copies:
pre- and post-GELU, saved for backward).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GELU_INFLECTION = math.sqrt(2.0)  # GELU''(z) = φ(z)(2 − z²) = 0 at z = √2


def _gelu_value_and_slope(c: float) -> tuple[float, float]:
    """GELU(c) and GELU'(c) for the exact (erf) GELU that nn.GELU() uses."""
    cdf = 0.5 * (1.0 + math.erf(c / math.sqrt(2.0)))
    pdf = math.exp(-0.5 * c * c) / math.sqrt(2.0 * math.pi)
    return c * cdf, cdf + c * pdf


def correspondence_head_num_params(d_model: int, d_hidden: int = 1024, d_out: int = 256, bias: bool = True) -> int:
    """Parameter count of one d_model -> d_hidden -> d_out head."""
    n = d_model * d_hidden + d_hidden * d_out
    return n + (d_hidden + d_out if bias else 0)


class CorrespondenceHead(nn.Module):
    """Linear(d_model→d_hidden) → GELU → Linear(d_hidden→d_out). Input (..., d_model), output (..., d_out)."""

    def __init__(self, d_model: int, d_hidden: int = 1024, d_out: int = 256) -> None:
        super().__init__()
        self.d_model, self.d_hidden, self.d_out = d_model, d_hidden, d_out
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, hidden_states: Tensor) -> Tensor:  # (..., d_model) -> (..., d_out)
        return self.fc2(self.act(self.fc1(hidden_states)))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    @torch.no_grad()
    def from_q_proj(
        cls,
        q_weight: Tensor,
        q_bias: Tensor | None = None,
        d_hidden: int = 1024,
        d_out: int = 256,
        *,
        norm_weight: Tensor | None = None,
        calib_inputs: Tensor | None = None,
        input_rms: float = 1.0,
        preact_std: float = 0.5,
        gelu_center: float = GELU_INFLECTION,
        pad_std: float = 1e-2,
        generator: torch.Generator | None = None,
    ) -> "CorrespondenceHead":
        """Build a head whose init reproduces the rank-d_out truncation of ``q_proj`` (module docstring).

        Args:
            q_weight: (d_q, d_model) plain tensor of the pretrained q_proj weight (before LoRA/sharding).
            q_bias: (d_q,) or None.
            norm_weight: (d_model,) RMSNorm gain applied before q_proj; factored in when given.
            calib_inputs: (n, d_model) example head inputs; sets the centre μ and the scale α.
            input_rms: per-coordinate RMS assumed for inputs when ``calib_inputs`` is None.
            preact_std: std of the largest hidden pre-activation around ``gelu_center``.
            gelu_center: operating point of the GELU (√2 = inflection point; 0 gives the naive scheme).
            pad_std: init std of padded hidden rows, relative to the mean singular-row norm.
        The returned module is fp32 on ``q_weight``'s device.
        """
        device = q_weight.device
        w = q_weight.detach().to(torch.float32)  # (d_q, d_model); SVD always in fp32
        d_q, d_model = w.shape
        if norm_weight is not None:
            w = w * norm_weight.detach().to(device, torch.float32)[None, :]
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (d_q,R), s (R,), vh (R,d_model)
        rank = s.numel()
        r = min(d_hidden, rank)
        k = min(d_out, r)
        sqrt_s = s[:r].clamp_min(0).sqrt()  # (r,)
        w1_core = sqrt_s[:, None] * vh[:r]  # (r, d_model) = √S_r V_rᵀ

        # Centre μ and scale α of the hidden pre-activations.
        if calib_inputs is not None:
            x = calib_inputs.detach().reshape(-1, d_model).to(device, torch.float32)
            mu = x.mean(0)  # (d_model,)
            pre_std = ((x - mu) @ w1_core.T).std(0, unbiased=False) if x.shape[0] > 1 else sqrt_s * input_rms
            top = float(pre_std.max()) if pre_std.numel() else 0.0
        else:
            mu = torch.zeros(d_model, device=device)
            top = float(sqrt_s[0]) * input_rms if r else 0.0
        alpha = preact_std / top if top > 0 else 1.0
        g0, g1 = _gelu_value_and_slope(gelu_center)

        head = cls(d_model, d_hidden, d_out).to(device=device, dtype=torch.float32)
        w1 = torch.zeros(d_hidden, d_model, device=device)
        w1[:r] = alpha * w1_core
        if d_hidden > r:
            # Small random rows break the symmetry of padded units; W2 columns stay 0 (no effect at init).
            row_norm = float(w1[:r].norm(dim=1).mean()) if r else 1.0
            pad = torch.randn(d_hidden - r, d_model, generator=generator, device="cpu").to(device)
            w1[r:] = pad * (pad_std * row_norm / math.sqrt(d_model))
        b1 = gelu_center - w1 @ mu  # (d_hidden,) every unit sits at c for x = μ

        w2 = torch.zeros(d_out, d_hidden, device=device)
        w2[torch.arange(k), torch.arange(k)] = sqrt_s[:k] / (alpha * g1)  # U_kᵀ U_r √S_r, rescaled
        # Bias: cancel the GELU offset g0 and the centring, add the query bias projected on U_k.
        b2 = torch.zeros(d_out, device=device)
        b2[:k] = s[:k] * (vh[:k] @ mu)
        if q_bias is not None:
            b2[:k] += u[:, :k].T @ q_bias.detach().to(device, torch.float32)
        b2 -= g0 * w2.sum(1)

        head.fc1.weight.copy_(w1)
        head.fc1.bias.copy_(b1)
        head.fc2.weight.copy_(w2)
        head.fc2.bias.copy_(b2)
        return head


def _stack_compatible(heads: Sequence[nn.Module]) -> bool:
    """True when ``heads`` are ``CorrespondenceHead``s of one shape/dtype/device and one GELU variant."""
    if len(heads) == 0 or not all(isinstance(h, CorrespondenceHead) for h in heads):
        return False
    ref = heads[0]

    def sig(h: CorrespondenceHead):
        return (h.fc1.weight.shape, h.fc2.weight.shape, h.fc1.bias is None, h.fc2.bias is None,
                h.fc1.weight.dtype, h.fc1.weight.device, type(h.act), getattr(h.act, "approximate", None))

    return type(ref.act) is nn.GELU and all(sig(h) == sig(ref) for h in heads)


def stacked_heads_forward(heads: Sequence[CorrespondenceHead], x: Tensor) -> Tensor:
    """Apply head l to ``x[l]`` for every l with one batched MLP: (L, *, d_model) -> (L, *, d_out).

    Same math as ``torch.stack([h(x[l]) for l, h in enumerate(heads)])`` (Linear → GELU → Linear, and
    the same autocast behaviour: ``baddbmm`` is cast like ``linear``), in O(1) ops. The per-layer
    parameters are stacked on every call, so gradients reach each head's own ``fc1``/``fc2``
    parameters. Heads must be ``_stack_compatible`` (same shapes/dtype, GELU).
    """
    if not _stack_compatible(heads):
        raise ValueError("stacked_heads_forward needs CorrespondenceHeads of one shape, dtype and GELU variant")
    num = len(heads)
    if x.dim() < 2 or x.shape[0] != num:
        raise ValueError(f"expected ({num}, ..., d_model) inputs, got {tuple(x.shape)}")
    lead = x.shape[1:-1]
    x3 = x.reshape(num, -1, x.shape[-1])  # (L, R, d_model)
    h0 = heads[0]
    w1 = torch.stack([h.fc1.weight for h in heads])  # (L, d_hidden, d_model)
    w2 = torch.stack([h.fc2.weight for h in heads])  # (L, d_out, d_hidden)
    if h0.fc1.bias is not None:
        b1 = torch.stack([h.fc1.bias for h in heads])  # (L, d_hidden)
        hid = torch.baddbmm(b1.unsqueeze(1), x3, w1.transpose(1, 2))  # (L, R, d_hidden)
    else:
        hid = torch.bmm(x3, w1.transpose(1, 2))
    hid = F.gelu(hid, approximate=h0.act.approximate)
    if h0.fc2.bias is not None:
        b2 = torch.stack([h.fc2.bias for h in heads])  # (L, d_out)
        out = torch.baddbmm(b2.unsqueeze(1), hid, w2.transpose(1, 2))  # (L, R, d_out)
    else:
        out = torch.bmm(hid, w2.transpose(1, 2))
    return out.reshape(num, *lead, out.shape[-1])


def resolve_layer_indices(num_layers: int, layers: Iterable[int] | None) -> list[int]:
    """None -> all layers; negative indices count from the end; out of range -> IndexError, duplicates -> ValueError."""
    if layers is None:
        return list(range(num_layers))
    out = []
    for layer in layers:
        li = int(layer) + (num_layers if int(layer) < 0 else 0)
        if not 0 <= li < num_layers:
            raise IndexError(f"supervised layer {layer} out of range for {num_layers} layers")
        out.append(li)
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate supervised layers: {list(layers)}")
    return out


class CorrespondenceHeads(nn.ModuleList):
    """One ``CorrespondenceHead`` per supervised decoder layer; ``self[i]`` serves ``layer_indices[i]``.

    Register it on the top-level training wrapper (outside PEFT) so every engine shards/saves it.
    """

    def __init__(self, heads: Iterable[CorrespondenceHead], layer_indices: Sequence[int]) -> None:
        super().__init__(heads)
        self.layer_indices: list[int] = [int(i) for i in layer_indices]
        self.input_norm = "none"  # "rms": the heads read the RMS-normalised stream (gasp.head_norm)
        if len(self.layer_indices) != len(self):
            raise ValueError(f"{len(self)} heads but {len(self.layer_indices)} layer indices")

    @classmethod
    def from_q_projs(
        cls,
        q_weights: Sequence[Tensor] | Mapping[int, Tensor],
        q_biases: Sequence[Tensor | None] | Mapping[int, Tensor | None] | None = None,
        layers: Iterable[int] | None = None,
        d_hidden: int = 1024,
        d_out: int = 256,
        *,
        norm_weights: Sequence[Tensor | None] | Mapping[int, Tensor | None] | None = None,
        calib_inputs: Sequence[Tensor | None] | Mapping[int, Tensor | None] | None = None,
        **kwargs,
    ) -> "CorrespondenceHeads":
        """Heads for ``layers`` (default: all), SVD-initialised from ``q_weights[layer]``.

        ``q_weights`` (and the optional per-layer ``q_biases``/``norm_weights``/``calib_inputs``) are
        indexed by decoder-layer id: a sequence over all layers or a mapping layer -> tensor.
        ``kwargs`` go to ``CorrespondenceHead.from_q_proj``.
        """
        num_layers = (max(q_weights) + 1) if isinstance(q_weights, Mapping) else len(q_weights)
        if layers is None and isinstance(q_weights, Mapping):
            layers = sorted(q_weights)
        idx = resolve_layer_indices(num_layers, layers)

        def pick(seq, i):
            if seq is None:
                return None
            return seq.get(i) if isinstance(seq, Mapping) else seq[i]

        heads = [
            CorrespondenceHead.from_q_proj(
                q_weights[i], pick(q_biases, i), d_hidden, d_out,
                norm_weight=pick(norm_weights, i), calib_inputs=pick(calib_inputs, i), **kwargs)
            for i in idx
        ]
        return cls(heads, idx)

    @classmethod
    def random_init(cls, d_model: int, num_layers: int, layers: Iterable[int] | None = None,
                    d_hidden: int = 1024, d_out: int = 256, seed: int | None = None) -> "CorrespondenceHeads":
        """Default (PyTorch Linear) initialisation, e.g. for tests or an init ablation."""
        idx = resolve_layer_indices(num_layers, layers)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                heads = [CorrespondenceHead(d_model, d_hidden, d_out) for _ in idx]
        else:
            heads = [CorrespondenceHead(d_model, d_hidden, d_out) for _ in idx]
        return cls(heads, idx)

    def forward(self, x: Tensor) -> Tensor:
        """All heads at once on stacked inputs: (L, *, d_model) -> (L, *, d_out), ``x[i]`` for ``self[i]``.

        One batched MLP (``stacked_heads_forward``) instead of L head calls; gradients reach every
        per-layer parameter. Per-layer use stays ``self[i](x_i)`` / ``for_layer(layer)``.
        """
        return stacked_heads_forward(list(self), x)

    @property
    def stackable(self) -> bool:
        """Whether ``forward`` (the batched path) applies: all heads of one shape/dtype, GELU."""
        return _stack_compatible(list(self))

    def for_layer(self, layer: int) -> CorrespondenceHead:
        return self[self.layer_indices.index(int(layer))]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"layers={self.layer_indices}"
