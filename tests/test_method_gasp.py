"""GaspModel: the LM-only control builds no heads; heads get gradients on every kind of batch."""

import pytest
import torch

from gasp_vlm.method.gasp import GaspLossConfig, GaspModel, build_heads, resolve_layers
from gasp_vlm.models import load_adapter
from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.stream import StepBatches, prepare_step

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 3})
    data = config_from_dict({"data": {"geometry": ["toy"], "toy_sequences": 4, "frames_min": 3, "frames_max": 3}}).data
    ds = StepBatches(data)
    prepared, targets, _ = prepare_step(ad, ds[0]["parts"][0], ds.geometry, "Describe.")
    return ad, prepared, targets


def test_lm_only_builds_no_heads(setup):
    ad, prepared, targets = setup
    cfg = GaspLossConfig(lambda_corr=0.0, lambda_depth=0.0)
    assert cfg.lm_only and build_heads(ad, cfg) is None
    gm = GaspModel(ad.model, ad, None, cfg)
    assert gm.lm_only and not any("heads" in n for n, _ in gm.named_parameters())
    out = gm(prepared, targets)
    assert float(out["corr"]) == 0.0 and float(out["depth"]) == 0.0
    with pytest.raises(ValueError, match="need heads"):
        GaspModel(ad.model, ad, None, GaspLossConfig(lambda_corr=1.0))


def test_heads_get_gradients_and_loss_is_the_weighted_sum(setup):
    ad, prepared, targets = setup
    cfg = GaspLossConfig(lambda_corr=1.0, lambda_depth=0.5, d_hidden=64, d_out=32, layers=[0, 2])
    heads = build_heads(ad, cfg, calib_batch=prepared)
    assert heads.layer_indices == [0, 2]
    gm = GaspModel(ad.model, ad, heads, cfg)
    gm.zero_grad(set_to_none=True)
    out = gm(prepared, targets)
    assert float(out["corr"]) > 0 and float(out["depth"]) > 0 and float(out["n_pairs"]) > 0
    assert out["loss"].detach().item() == pytest.approx(float(out["lm"]) + float(out["corr"]) + 0.5 * float(out["depth"]), rel=1e-5)
    out["loss"].backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the geometric loss reaches the LLM through the captured hidden states (no LM labels here)
    q = ad.attn_projections(0)[0].weight
    assert q.grad is not None and q.grad.abs().sum() > 0
    gm.zero_grad(set_to_none=True)


def test_instruction_batch_gives_heads_zero_not_missing_grads(setup):
    ad, prepared, targets = setup
    cfg = GaspLossConfig(d_hidden=32, d_out=16, layers=[1])
    gm = GaspModel(ad.model, ad, build_heads(ad, cfg), cfg)
    rows = torch.zeros(1, 1, dtype=torch.long)
    out = gm(prepared, None, rows=rows)
    assert float(out["corr"]) == 0.0
    out["loss"].backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in gm.heads.parameters())
    gm.zero_grad(set_to_none=True)


def test_layer_errors_name_the_key():
    assert resolve_layers(4, [0, -1]) == [0, 3]
    with pytest.raises(ValueError, match="gasp.layers"):
        resolve_layers(4, [4])


def test_batched_layers_default_and_same_result_as_per_layer(setup):
    ad, prepared, targets = setup
    assert GaspLossConfig().batched_layers is True
    cfg = GaspLossConfig(lambda_corr=1.0, lambda_depth=0.5, d_hidden=32, d_out=16, max_anchors=6)
    heads = build_heads(ad, cfg)
    assert heads.layer_indices == [0, 1, 2]
    res = []
    for batched in (True, False):
        gm = GaspModel(ad.model, ad, heads, GaspLossConfig(**{**cfg.to_dict(), "batched_layers": batched}))
        gm.zero_grad(set_to_none=True)
        out = gm(prepared, targets, generator=torch.Generator().manual_seed(3))
        out["loss"].backward()
        res.append((out, {n: p.grad.clone() for n, p in heads.named_parameters()}))
        gm.zero_grad(set_to_none=True)
    (a, ga), (b, gb) = res
    assert float(a["n_pairs"]) == float(b["n_pairs"]) > 0
    for k in ("loss", "corr", "depth", "per_layer_corr", "per_layer_depth"):
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), k
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_head_init_ablation_random_vs_svd(setup):
    ad, prepared, _ = setup
    svd = build_heads(ad, GaspLossConfig(d_hidden=64, d_out=32, calib_tokens=0, head_init_layer="same"))
    rnd = build_heads(ad, GaspLossConfig(d_hidden=64, d_out=32, head_init="random"))
    assert rnd.layer_indices == svd.layer_indices == [0, 1, 2]
    # SVD init: W1's rows span the top right-singular directions of q_proj (folded with the RMSNorm gain);
    # the random init does not, and it is seeded (same heads twice)
    q, _ = ad.attn_projections(0)
    g = ad.decoder_layers()[0].input_layernorm.weight.detach()
    _, _, vh = torch.linalg.svd(q.weight.detach() * g[None, :], full_matrices=False)
    top = vh[:32]  # (32, D)

    def captured(w1):  # fraction of W1's first 32 rows' energy inside the top-32 right-singular subspace
        rows = w1[:32]
        return float(((rows @ top.T) ** 2).sum() / (rows ** 2).sum())

    assert captured(svd[0].fc1.weight.detach()) > 0.99
    assert captured(rnd[0].fc1.weight.detach()) < 0.5
    again = build_heads(ad, GaspLossConfig(d_hidden=64, d_out=32, head_init="random"))
    assert torch.equal(again[0].fc1.weight, rnd[0].fc1.weight)
    with pytest.raises(ValueError, match="head_init"):
        build_heads(ad, GaspLossConfig(head_init="orthogonal"))


def test_next_layer_init_with_rms_input_reproduces_the_queries_that_read_the_stream(setup):
    """head_init_layer=next + head_norm=rms: the head on layer l's output starts as layer l+1's query
    (the q_proj that reads that output, after its RMSNorm) -- cosine similarities between tokens match
    the real queries; the paper-literal default (own q_proj, raw stream) matches them less well."""
    from gasp_vlm.method.gasp import rms_normalize

    ad, prepared, _ = setup
    d_q = ad.attn_projections(0)[0].weight.shape[0]
    cap = ad.forward_capture(prepared, what=("hidden",), layers=[0, 1, 2], grad=False)

    def gap(cfg, l):
        heads = build_heads(ad, cfg, calib_batch=prepared)
        h = cap.hidden[l][0].float()  # (N, D) layer l's output at the visual tokens
        x = rms_normalize(h) if cfg.head_norm == "rms" else h
        z = torch.nn.functional.normalize(heads[heads.layer_indices.index(l)](x), dim=-1)
        nxt = ad.decoder_layers()[l + 1]
        q = torch.nn.functional.normalize(ad.attn_projections(l + 1)[0](nxt.input_layernorm(h)), dim=-1)
        return float((z @ z.T - q @ q.T).abs().mean().detach())

    kw = dict(d_hidden=d_q, d_out=d_q, calib_tokens=512)
    faithful = [gap(GaspLossConfig(head_init_layer="next", head_norm="rms", **kw), l) for l in (0, 1)]
    literal = [gap(GaspLossConfig(head_init_layer="same", head_norm="none", **kw), l) for l in (0, 1)]
    assert max(faithful) < 0.03 and min(literal) > 2 * max(faithful), (faithful, literal)
    # the last layer has no next q_proj: it keeps its own
    a = build_heads(ad, GaspLossConfig(head_init_layer="next", d_hidden=64, d_out=32, calib_tokens=0))
    b = build_heads(ad, GaspLossConfig(head_init_layer="same", d_hidden=64, d_out=32, calib_tokens=0))
    assert torch.equal(a[2].fc1.weight, b[2].fc1.weight) and not torch.equal(a[0].fc1.weight, b[0].fc1.weight)
    with pytest.raises(ValueError, match="head_norm"):
        build_heads(ad, GaspLossConfig(head_norm="layer"))
