"""Correspondence heads: shapes, parameter counts, and what the q_proj SVD initialisation guarantees."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gasp_vlm.method.heads import (
    GELU_INFLECTION,
    CorrespondenceHead,
    CorrespondenceHeads,
    _gelu_value_and_slope,
    correspondence_head_num_params,
)


def synth_q_proj(d_q: int, d_model: int, seed: int = 0, decay: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A q_proj-like weight with a decaying (power-law) spectrum, plus a bias."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_q, d_q, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=g))
    r = min(d_q, d_model)
    s = 3.0 * torch.arange(1, r + 1, dtype=torch.float32) ** (-decay)
    return (u[:, :r] * s) @ v[:, :r].T, 0.3 * torch.randn(d_q, generator=g)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    z = F.normalize(x.double(), dim=-1)
    return z @ z.T


def offdiag_pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the off-diagonal pairwise cosine similarities of two embedding sets."""
    ca, cb = cosine_matrix(a), cosine_matrix(b)
    m = ~torch.eye(len(a), dtype=torch.bool)
    x, y = ca[m] - ca[m].mean(), cb[m] - cb[m].mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def truncated_query(x, w, b, k):
    """Rank-k truncation of q_proj (bias projected on the same subspace): U_k U_kᵀ (W x + b)."""
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    pk = u[:, :k] @ u[:, :k].T
    return (x @ w.T + b) @ pk


def make_inputs(kind: str, n: int, d_model: int, vh: torch.Tensor, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(n, d_model, generator=g)
    if kind == "clustered":  # a spread of cosine similarities, like tokens of a few objects
        c = torch.randn(8, d_model, generator=g)
        return c[torch.randint(0, 8, (n,), generator=g)] + 0.7 * torch.randn(n, d_model, generator=g)
    if kind == "dominant":  # inputs inside the top-k right singular subspace
        return torch.randn(n, k, generator=g) @ vh[:k]
    raise ValueError(kind)


D_MODEL, D_Q, D_HIDDEN, D_OUT = 192, 192, 96, 32


def test_shapes_and_param_count():
    head = CorrespondenceHead(D_MODEL, D_HIDDEN, D_OUT)
    assert head(torch.randn(2, 5, D_MODEL)).shape == (2, 5, D_OUT)
    assert head.num_params() == correspondence_head_num_params(D_MODEL, D_HIDDEN, D_OUT)
    # Paper-sized default: 3584 -> 1024 -> 256 on Qwen2.5-VL-7B.
    assert correspondence_head_num_params(3584) == 3584 * 1024 + 1024 + 1024 * 256 + 256
    assert correspondence_head_num_params(10, 4, 2, bias=False) == 48


def test_first_layer_row_space_is_top_right_singular_subspace():
    w, b = synth_q_proj(D_Q, D_MODEL)
    head = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT)
    _, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    w1 = head.fc1.weight.detach().double()  # (d_hidden, d_model), d_hidden < rank: no padding
    v_r = vh[:D_HIDDEN]  # (r, d_model)
    residual = w1 - (w1 @ v_r.T) @ v_r  # component outside span(V_r)
    assert residual.norm() / w1.norm() < 1e-5
    # Same dimension: all principal angles are 0 (cosines 1), i.e. the two subspaces are equal.
    q_w1, _ = torch.linalg.qr(w1.T)
    cos_angles = torch.linalg.svdvals(v_r @ q_w1)
    assert torch.allclose(cos_angles, torch.ones_like(cos_angles), atol=1e-6)
    # Rows are α·√s_i·v_i: the singular values of W1 are proportional to √S_r.
    sv = torch.linalg.svdvals(w1)
    ratio = sv / s[:D_HIDDEN].sqrt()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)


def test_linearised_head_is_isometric_to_truncated_q_proj():
    """g1·W2·W1 = S_k V_kᵀ = U_kᵀ·(rank-k truncation of W_q): an isometry of the truncated queries."""
    w, b = synth_q_proj(D_Q, D_MODEL)
    head = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT)
    _, g1 = _gelu_value_and_slope(GELU_INFLECTION)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    lin = g1 * head.fc2.weight.detach() @ head.fc1.weight.detach()  # (d_out, d_model)
    expected = s[:D_OUT, None] * vh[:D_OUT]
    assert torch.allclose(lin, expected, atol=1e-4 * float(s[0]))
    assert torch.allclose(u[:, :D_OUT] @ expected, u[:, :D_OUT] @ u[:, :D_OUT].T @ w, atol=1e-4)
    # x = μ (= 0 here) maps exactly to the projected query bias.
    z0 = head(torch.zeros(1, D_MODEL))[0]
    assert torch.allclose(z0, u[:, :D_OUT].T @ b, atol=1e-4)


@pytest.mark.parametrize("kind", ["gauss", "clustered", "dominant"])
def test_init_preserves_dominant_query_geometry(kind):
    """Cosine similarities of head embeddings track those of the rank-d_out truncated q_proj.

    Measured (n=200, 192 -> 96 -> 32, power-law spectrum): Pearson r = 0.9997-0.9998 for the SVD
    init (largest |Δcos| 0.06-0.08); a default-initialised head gets 0.05 / 0.38 / 0.35; the naive
    GELU-at-0 centring gets only 0.89-0.94 at the same pre-activation scale.
    """
    w, b = synth_q_proj(D_Q, D_MODEL)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    x = make_inputs(kind, 200, D_MODEL, vh, D_OUT)
    target = truncated_query(x, w, b, D_OUT)

    with torch.no_grad():
        z_svd = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT)(x)
        z_naive = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT, gelu_center=0.0)(x)
        torch.manual_seed(123)
        z_rand = CorrespondenceHead(D_MODEL, D_HIDDEN, D_OUT)(x)

    r_svd, r_naive, r_rand = (offdiag_pearson(z, target) for z in (z_svd, z_naive, z_rand))
    assert r_svd > 0.999, r_svd
    assert r_rand < 0.6 and r_svd - r_rand > 0.35, (r_svd, r_rand)
    assert r_svd > r_naive + 0.03, (r_svd, r_naive)
    # Pointwise: every cosine similarity within 0.1 of the truncated query's.
    assert (cosine_matrix(z_svd) - cosine_matrix(target)).abs().max() < 0.1


def test_smaller_preactivations_are_more_linear():
    w, b = synth_q_proj(D_Q, D_MODEL)
    x = make_inputs("gauss", 100, D_MODEL, None, D_OUT)
    target = truncated_query(x, w, b, D_OUT)
    errs = []
    for std in (2.0, 0.5, 0.1):
        with torch.no_grad():
            z = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT, preact_std=std)(x)
        errs.append(float((cosine_matrix(z) - cosine_matrix(target)).abs().max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01, errs


def test_calibration_handles_residual_stream_scale():
    """Residual streams are off-centre and far from unit scale: calib_inputs keeps GELU near-linear."""
    w, b = synth_q_proj(D_Q, D_MODEL)
    g = torch.Generator().manual_seed(5)
    offset = 3.0 * torch.randn(D_MODEL, generator=g)
    x = offset + 20.0 * torch.randn(300, D_MODEL, generator=g)
    target = truncated_query(x, w, b, D_OUT)
    with torch.no_grad():
        z_cal = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT, calib_inputs=x[:200])(x)
        z_raw = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT)(x)  # assumes unit-scale inputs
    r_cal, r_raw = offdiag_pearson(z_cal, target), offdiag_pearson(z_raw, target)
    assert r_cal > 0.999 and r_cal > r_raw, (r_cal, r_raw)


def test_norm_weight_is_folded_into_the_factorised_weight():
    w, b = synth_q_proj(D_Q, D_MODEL)
    gain = torch.rand(D_MODEL, generator=torch.Generator().manual_seed(2)) + 0.5
    h1 = CorrespondenceHead.from_q_proj(w, b, D_HIDDEN, D_OUT, norm_weight=gain)
    h2 = CorrespondenceHead.from_q_proj(w * gain, b, D_HIDDEN, D_OUT)
    x = torch.randn(7, D_MODEL)
    assert torch.allclose(h1(x), h2(x), atol=1e-5)


def test_padding_when_hidden_exceeds_rank():
    d_q, d_model, d_hidden = 24, 64, 40  # rank 24 < d_hidden
    w, b = synth_q_proj(d_q, d_model)
    gen = torch.Generator().manual_seed(0)
    h_pad = CorrespondenceHead.from_q_proj(w, b, d_hidden, 16, generator=gen)
    h_exact = CorrespondenceHead.from_q_proj(w, b, d_q, 16)
    x = torch.randn(10, d_model)
    # Padded units do not change the init output...
    assert torch.allclose(h_pad(x), h_exact(x), atol=1e-5)
    assert torch.count_nonzero(h_pad.fc2.weight[:, d_q:]) == 0
    # ...but they are distinct (no symmetric dead units) and small.
    pad = h_pad.fc1.weight[d_q:]
    assert torch.linalg.matrix_rank(pad) == d_hidden - d_q
    assert pad.norm(dim=1).max() < 0.05 * h_pad.fc1.weight[:d_q].norm(dim=1).mean()
    # d_out > rank: the extra output dims start at exactly 0.
    h_wide = CorrespondenceHead.from_q_proj(w, b, d_hidden, 32)
    assert torch.allclose(h_wide(x)[:, d_q:], torch.zeros(10, 32 - d_q), atol=1e-5)


def test_heads_builder_layers_dtype_and_gradients():
    num_layers, d_model = 4, 32
    ws = [synth_q_proj(d_model, d_model, seed=i)[0].to(torch.bfloat16) for i in range(num_layers)]
    bs = [torch.randn(d_model) for _ in range(num_layers)]
    heads = CorrespondenceHeads.from_q_projs(ws, bs, layers=[0, -1], d_hidden=16, d_out=8)
    assert heads.layer_indices == [0, 3] and len(heads) == 2
    assert all(p.dtype == torch.float32 for p in heads.parameters())
    assert heads.num_params() == 2 * correspondence_head_num_params(d_model, 16, 8)
    # Head for layer 3 is built from layer 3's weight.
    ref = CorrespondenceHead.from_q_proj(ws[3], bs[3], 16, 8)
    assert torch.equal(heads.for_layer(3).fc1.weight, ref.fc1.weight)
    # All layers by default, mapping input accepted.
    all_heads = CorrespondenceHeads.from_q_projs({i: w for i, w in enumerate(ws)}, d_hidden=16, d_out=8)
    assert all_heads.layer_indices == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        CorrespondenceHeads.from_q_projs(ws, layers=[4], d_hidden=16, d_out=8)
    # Every parameter is trainable and reached by a loss on the outputs.
    loss = sum(h(torch.randn(5, d_model)).pow(2).sum() for h in heads)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    rnd = CorrespondenceHeads.random_init(d_model, num_layers, d_hidden=16, d_out=8, seed=0)
    rnd2 = CorrespondenceHeads.random_init(d_model, num_layers, d_hidden=16, d_out=8, seed=0)
    assert rnd.layer_indices == [0, 1, 2, 3]
    assert torch.equal(rnd[2].fc1.weight, rnd2[2].fc1.weight)


def test_gelu_operating_point():
    """√2 is GELU's inflection point (zero curvature) and the closed-form value/slope match autograd."""
    c = torch.tensor(GELU_INFLECTION, dtype=torch.float64, requires_grad=True)
    y = F.gelu(c)
    (d1,) = torch.autograd.grad(y, c, create_graph=True)
    (d2,) = torch.autograd.grad(d1, c)
    g0, g1 = _gelu_value_and_slope(GELU_INFLECTION)
    assert math.isclose(y.detach().item(), g0, rel_tol=1e-9) and math.isclose(d1.detach().item(), g1, rel_tol=1e-9)
    assert abs(float(d2)) < 1e-9


def test_stacked_forward_matches_per_head_calls_and_reaches_every_parameter():
    """CorrespondenceHeads(x) runs all heads as one batched MLP: same outputs and gradients as L calls."""
    num_layers, d_model = 3, 24
    heads = CorrespondenceHeads.random_init(d_model, 5, layers=[0, 2, 4], d_hidden=16, d_out=8, seed=0)
    assert heads.stackable
    # Checkpoint compatibility: the per-layer modules and their state-dict names are unchanged.
    assert list(heads.state_dict()) == [f"{i}.{n}" for i in range(num_layers)
                                        for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]
    x = torch.randn(num_layers, 2, 5, d_model, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = torch.randn(num_layers, 2, 5, 8, generator=torch.Generator().manual_seed(2))
    out = heads(x1)
    assert out.shape == (num_layers, 2, 5, 8)
    (out * w).sum().backward()
    g_stacked = {n: p.grad.clone() for n, p in heads.named_parameters()}
    heads.zero_grad(set_to_none=True)
    ref = torch.stack([h(x2[i]) for i, h in enumerate(heads)])
    (ref * w).sum().backward()
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=0)
    for n, p in heads.named_parameters():
        assert p.grad.abs().sum() > 0 and torch.allclose(g_stacked[n], p.grad, atol=1e-6, rtol=0), n
    # SVD-initialised heads stack too; heads of different shapes do not.
    ws = [synth_q_proj(d_model, d_model, seed=i)[0] for i in range(2)]
    assert CorrespondenceHeads.from_q_projs(ws, d_hidden=16, d_out=8).stackable
    mixed = CorrespondenceHeads([CorrespondenceHead(d_model, 16, 8), CorrespondenceHead(d_model, 12, 8)], [0, 1])
    assert not mixed.stackable
    with pytest.raises(ValueError, match="one shape"):
        mixed(torch.randn(2, 3, d_model))
    with pytest.raises(ValueError, match="expected"):
        heads(torch.randn(2, 3, d_model))  # 2 stacked inputs for 3 heads
