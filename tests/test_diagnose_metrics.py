"""Metrics of the correspondence diagnostic (issue 5): exact cases, chance level, hand-computed numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gasp_vlm.diagnose import metrics as M

GRID = (8, 8)
NT = GRID[0] * GRID[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Hundreds of tiny matmuls: on a shared CPU, intra-op threads make them ~30x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _synthetic_run(n_seq: int = 200, n_targets: int = 3, dim: int = 128, jitter: float = 0.45,
                   identity_motion: bool = False, seed: int = 0) -> np.ndarray:
    """Layer 0: frame-t features from an unrelated frame (shuffled). Layer 1: the true frame.

    Motion is a random permutation of tokens (or the identity); query q = token q of frame 1, its GT
    in frame t is inside token perm[q] (centre + jitter), and frame t holds frame-1's feature q there.
    """
    g = np.random.default_rng(seed)
    recs = []
    for s in range(n_seq):
        f1 = torch.from_numpy(g.standard_normal((NT, dim)))
        for t in range(1, n_targets + 1):
            perm = np.arange(NT) if identity_motion else g.permutation(NT)
            ft = torch.empty_like(f1)
            ft[perm] = f1  # token perm[q] of frame t shows what token q of frame 1 showed
            other = torch.from_numpy(g.standard_normal((NT, dim)))
            gt = M.token_centres(perm, GRID) + g.uniform(-jitter, jitter, (NT, 2))
            sim = torch.stack([M.cosine_sim(f1, other), M.cosine_sim(f1, ft)])  # (2, Q, Nt)
            recs.append(M.evaluate_pair(sim, seq=s, target=t, gap=3 * t, query_idx=np.arange(NT), gt_xy=gt,
                                        visible=np.ones(NT, bool), grid_hw=GRID, layers=[0, 1]))
    return M.concat_records(recs)


@pytest.fixture(scope="module")
def run_records() -> np.ndarray:
    return _synthetic_run()


def test_known_answer_is_exactly_one_and_shuffled_is_chance(run_records):
    rec = run_records
    good = M.pck(rec[rec["layer"] == 1])
    assert good == {"0": 1.0, "1": 1.0, "2": 1.0}
    bad = M.pck(rec[rec["layer"] == 0])
    # Argmax over 64 unrelated tokens is uniform: PCK@0 -> 1/64. n = 200*3*64 = 38400 points, so
    # sigma = sqrt(p(1-p)/n) = 6.3e-4 for independent points; allow ~8 sigma (points of one target
    # frame share its keys, which adds a little correlation).
    assert abs(bad["0"] - 1 / 64) < 0.005
    # PCK@1 chance with GT jittered by up to 0.45 token: the GT token always counts; a 4-neighbour
    # centre is within 1 token only when the jitter points toward it. Bounded by 5/64 (interior, GT
    # on the centre) and clearly above 1/64.
    assert 1 / 64 < bad["1"] < 5 / 64 + 0.01
    assert bad["2"] < 0.25


def test_chance_pck1_with_gt_on_token_centres():
    """GT exactly on token centres: 4-neighbours sit at err = 1.0 and count (<=).

    Expected = sum over GT tokens of (#tokens within 1) / 64^2 = (64 + 2*112) / 4096 = 288/4096.
    """
    rec = _synthetic_run(n_seq=150, n_targets=2, jitter=0.0, seed=1)
    bad = M.pck(rec[rec["layer"] == 0])
    # n = 150*2*64 = 19200, sigma = sqrt(.0703*.9297/19200) = 1.8e-3
    assert abs(bad["1"] - 288 / 4096) < 0.012
    assert abs(bad["0"] - 1 / 64) < 0.006


def test_zero_motion_on_identity_motion_is_one():
    rec = _synthetic_run(n_seq=3, n_targets=2, identity_motion=True)
    assert M.pck(rec, prefix="zm_") == {"0": 1.0, "1": 1.0, "2": 1.0}
    rep = M.build_report(rec, model="synthetic", mode="qk")
    assert rep["zero_motion"]["pck"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert rep["zero_motion"]["by_gap"] == [1.0, 1.0]


def test_token_errors_boundaries():
    # pred token (r=0, c=0) centre (0.5, 0.5); GT exactly 1 and 2 tokens away count (inclusive)
    e = M.token_errors(np.array([0, 0, 0, 0]), np.array([[1.5, 0.5], [2.5, 0.5], [2.5001, 0.5], [3.0, 3.0]]), (4, 4))
    assert e["correct1"].tolist() == [True, False, False, False]
    assert e["correct2"].tolist() == [True, True, False, False]
    assert e["cheb"].tolist() == [1, 2, 2, 3]
    # a GT point on the far border belongs to the last token
    assert M.point_tokens(np.array([[4.0, 4.0]]), (4, 4)).tolist() == [15]


def _hand_sim(pred: list[int], conf: list[float], nt: int = 6) -> torch.Tensor:
    s = torch.full((1, len(pred), nt), -1.0, dtype=torch.float64)
    for q, (j, c) in enumerate(zip(pred, conf)):
        s[0, q, j] = c
    return s


@pytest.fixture(scope="module")
def hand_records() -> np.ndarray:
    grid = (2, 3)
    # seq 0: 4 visible points + 1 invisible (dropped). GT in token units (x, y).
    gt0 = np.array([[0.5, 0.5], [1.2, 0.3], [2.1, 1.6], [2.5, 1.5], [0.1, 0.1]])
    pred0 = [0, 2, 4, 0, 5]
    conf0 = [0.9, 0.8, 0.8, 0.1, 0.99]
    r0 = M.evaluate_pair(_hand_sim(pred0, conf0), seq=0, target=1, gap=5, query_idx=np.array([0, 1, 5, 5, 0]),
                         gt_xy=gt0, visible=np.array([1, 1, 1, 1, 0], bool), grid_hw=grid, layers=[3], tau=0.5)
    # seq 1: one point, exact
    r1 = M.evaluate_pair(_hand_sim([3], [0.7]), seq=1, target=1, gap=5, query_idx=np.array([0]),
                         gt_xy=np.array([[0.5, 1.5]]), visible=np.array([True]), grid_hw=grid, layers=[3], tau=0.5)
    return M.concat_records([r0, r1])


def test_hand_case_errors_and_pck(hand_records):
    r = hand_records
    assert len(r) == 5 and set(r["layer"]) == {3}
    # seq 0 by hand: err = 0, sqrt(1.3^2+0.2^2), sqrt(0.6^2+0.1^2), sqrt(2^2+1^2); cheb 0,1,1,2
    np.testing.assert_allclose(r["err"][:4], [0.0, math.sqrt(1.73), math.sqrt(0.37), math.sqrt(5.0)], rtol=1e-6)
    assert r["cheb"].tolist() == [0, 1, 1, 2, 0]
    assert r["correct0"].tolist() == [True, False, False, False, True]
    assert r["correct1"].tolist() == [True, False, True, False, True]
    assert r["correct2"].tolist() == [True, True, True, False, True]
    np.testing.assert_allclose(r["conf_max"], [0.9, 0.8, 0.8, 0.1, 0.7], rtol=1e-6)
    # conf_softmax = 1 / (1 + 5 exp((-1 - c) / tau)), tau = 0.5
    np.testing.assert_allclose(r["conf_softmax"][0], 1 / (1 + 5 * math.exp(-1.9 / 0.5)), rtol=1e-5)
    # per sequence then over sequences: seq0 (1/4, 2/4, 3/4), seq1 (1, 1, 1)
    assert M.pck(r) == pytest.approx({"0": 0.625, "1": 0.75, "2": 0.875})
    # zero-motion: query tokens 0,1,5,5 vs GT tokens 0,1,5,5 -> exact in seq 0; seq 1 query 0 vs GT token 3
    # (centre (0.5,0.5) vs (0.5,1.5): err 1.0, cheb 1) -> zm PCK@0 = (1 + 0)/2, PCK@1 = 1
    assert M.pck(r, prefix="zm_") == pytest.approx({"0": 0.5, "1": 1.0, "2": 1.0})


def test_hand_case_spearman_and_auroc(hand_records):
    conf, ok = hand_records["conf_max"], hand_records["correct1"]
    # pos {0.9, 0.8, 0.7}, neg {0.8, 0.1}: wins 2 + 1.5 + 1 = 4.5 of 6 pairs
    assert M.auroc(conf, ok) == pytest.approx(0.75)
    # ranks conf [5, 3.5, 3.5, 1, 2], ranks correct [4, 1.5, 4, 1.5, 4]:
    # sum dxdy = 3.75, sum dx^2 = 9.5, sum dy^2 = 7.5 -> 3.75 / sqrt(71.25)
    rho = M.spearman(conf, ok)
    assert rho == pytest.approx(3.75 / math.sqrt(71.25))
    scipy_stats = pytest.importorskip("scipy.stats")
    assert rho == pytest.approx(scipy_stats.spearmanr(conf, ok).statistic)
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # classic example
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1])) and math.isnan(M.spearman([1, 1, 1], [0, 1, 0]))


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = np.random.default_rng(3)
    x = g.integers(0, 5, 300).astype(float)
    y = g.integers(0, 2, 300).astype(bool) | (x > 3)
    assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
    u = scipy_stats.mannwhitneyu(x[y], x[~y]).statistic
    assert M.auroc(x, y) == pytest.approx(u / (y.sum() * (~y).sum()))


def _records(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """rows of (seq, target, gap, correct1, zm_correct1) on layer 0."""
    rec = M.empty_records(len(rows))
    for i, (s, t, gap, c, z) in enumerate(rows):
        rec[i]["seq"], rec[i]["target"], rec[i]["gap"] = s, t, gap
        rec[i]["correct0"] = rec[i]["correct1"] = rec[i]["correct2"] = bool(c)
        rec[i]["zm_correct0"] = rec[i]["zm_correct1"] = rec[i]["zm_correct2"] = bool(z)
        rec[i]["conf_max"] = rec[i]["conf_softmax"] = 0.5 + 0.1 * c
    return rec


def test_far_split_hand_case():
    # pair gaps: (0,1)=1, (0,2)=2, (0,3)=3, (1,1)=2, (1,2)=4 -> median 2; far = gap > 2 = (0,3), (1,2);
    # the two pairs tied at the median stay near.
    rec = _records([(0, 1, 1, 1, 1), (0, 2, 2, 0, 1), (0, 3, 3, 1, 0), (0, 3, 3, 0, 0),
                    (1, 1, 2, 1, 1), (1, 2, 4, 1, 1)])
    sp = M.far_split(rec)
    assert sp["threshold"] == 2.0 and sp["num_far_pairs"] == 2 and sp["num_pairs"] == 5
    assert sp["mask"].tolist() == [False, False, True, True, False, True]
    rep = M.build_report(rec, model="hand", mode="qk")
    assert rep["layers"][0]["far_pck"] == pytest.approx((0.5 + 1.0) / 2)  # per sequence, then mean
    assert rep["zero_motion"]["far_pck"] == pytest.approx((0.0 + 1.0) / 2)
    assert rep["temporal"]["gaps"] == [1.0, 2.0, 3.0, 4.0]
    # gap 2: seq0 -> 0, seq1 -> 1 => 0.5; gap 3: seq0 only -> 0.5
    assert rep["temporal"]["pck"] == pytest.approx([1.0, 0.5, 0.5, 1.0])
    assert rep["zero_motion"]["by_gap"] == pytest.approx([1.0, 1.0, 0.0, 1.0])
    # one distinct gap -> no far pairs -> None (valid JSON, not NaN)
    one = M.build_report(_records([(0, 1, 4, 1, 1), (1, 1, 4, 0, 1)]), model="hand", mode="qk")
    assert one["layers"][0]["far_pck"] is None and one["zero_motion"]["far_pck"] is None
    json.dumps(one, allow_nan=False)


def test_gap_bins():
    rec = _records([(0, 1, 1, 1, 1), (0, 2, 2, 0, 1), (0, 3, 5, 1, 0), (0, 4, 6, 1, 0)])
    gaps, masks = M.gap_groups(rec, gap_bins=[0, 3, 6])
    assert gaps == [1.5, 5.5]  # the last bin is closed: gap 6 falls in [3, 6]
    assert [m.sum() for m in masks] == [2, 2]


def test_report_schema_peak_reverse_and_files(run_records, tmp_path):
    rec = run_records
    rev = rec.copy()
    rev["correct1"] = rev["layer"] == 0  # reverse: the other layer wins
    rep = M.build_report(rec, model="synthetic", mode="qk", reverse_records=rev, extra={"frames": 4})
    for k in ("model", "mode", "num_sequences", "layers", "peak", "temporal", "zero_motion", "reverse"):
        assert k in rep
    assert rep["num_sequences"] == 200 and rep["frames"] == 4
    lay = rep["layers"][1]
    assert set(lay) >= {"layer", "pck", "confidence", "far_pck"}
    assert set(lay["pck"]) == {"0", "1", "2"} and set(lay["confidence"]) >= {"spearman", "auroc"}
    assert rep["peak"] == {"layer": 1, "pck": {"0": 1.0, "1": 1.0, "2": 1.0}, "far_pck": 1.0}
    assert rep["temporal"]["gaps"] == [3.0, 6.0, 9.0] and rep["temporal"]["pck"] == [1.0, 1.0, 1.0]
    # all layer-1 matches are right, so correctness is constant: Spearman/AUROC undefined -> None
    assert lay["confidence"]["auroc"] is None
    # shuffled layer: confidence carries little information about correctness
    assert abs(rep["layers"][0]["confidence"]["auroc"] - 0.5) < 0.1
    assert set(rep["zero_motion"]) >= {"pck", "far_pck", "by_gap"}
    assert rep["reverse"]["peak"]["layer"] == 0
    p = M.write_report(rep, tmp_path / "report.json")
    assert M.read_report(p) == json.loads(json.dumps(rep))
    for suffix in (".npz", ".parquet"):
        path = M.save_records(tmp_path / f"points{suffix}", rec[:1000], meta={"model": "synthetic", "grid": GRID})
        back, meta = M.load_records(path)
        assert back.dtype == M.RECORD_DTYPE and meta["model"] == "synthetic"
        for f in M.RECORD_FIELDS:  # per field: NaN angles compare equal
            np.testing.assert_array_equal(back[f], rec[:1000][f])


def test_match_tokens_batched_and_reliability_bins():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(3, 5, 7, generator=g)
    m = M.match_tokens(sim, tau=0.1)
    assert m.idx.shape == (3, 5) and np.array_equal(m.idx, sim.argmax(-1).numpy())
    np.testing.assert_allclose(m.conf_softmax, torch.softmax(sim / 0.1, -1).max(-1).values.numpy(), rtol=1e-5)
    b = M.reliability_bins(np.linspace(0, 1, 100), np.linspace(0, 1, 100) > 0.5, n_bins=4)
    assert b["count"].sum() == 100 and b["acc"][0] == 0.0 and b["acc"][-1] == 1.0
    assert M.peak_layer([2, 0, 1], [0.5, 0.7, 0.7]) == 0
