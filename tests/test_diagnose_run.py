"""The diagnosis runner and `gasp diagnose` (issue 5): known answers, chance, resume, files, CLI."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gasp_vlm.diagnose import metrics as M
from gasp_vlm.diagnose.run import (POINTS_DTYPE, DiagnoseError, OrthoToySource, load_sequence, join_points,
                                   run_diagnosis)
from gasp_vlm.method.heads import CorrespondenceHeads
from gasp_vlm.models import CaptureResult, load_adapter

torch.set_num_threads(1)
FRAME = 168  # Qwen preset keeps 168 px -> a 6 x 6 token grid per frame, 28 px per token
TP = 28
MARGIN = 2  # OrthoShiftSequences keeps a texture 2 tokens larger per side
D = 16  # feature width of the fake capture


@pytest.fixture(scope="module")
def adapter():
    return load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 2})


class RecordingSource(OrthoToySource):
    """The toy source, remembering the items it handed out so a fake capture can read their offsets."""

    def __init__(self, *a, extras: bool = False, **kw) -> None:
        super().__init__(*a, **kw)
        self.queue: list[dict] = []
        self.extras = extras

    def sample(self, index: int, num_frames: int) -> dict:
        item = super().sample(index, num_frames)
        if self.extras:  # frame ids with stride 3 and an object map: left half of every frame is object 7
            item["frame_ids"] = [10 + 3 * f for f in range(num_frames)]
            h, w = item["frames"][0].shape[:2]
            obj = np.full((h, w), -1, dtype=np.int16)
            obj[:, : w // 2] = 7
            item["objects"] = [obj] * num_frames
        self.queue.append(item)
        return item


def fake_capture(adapter, source: RecordingSource, kind: str, calls: list):
    """A forward_capture whose features are known: "aligned" gives every token the code of the texture
    position it shows (corresponding tokens get identical features), "shuffled" permutes the tokens of
    every target frame, "random" gives unrelated features everywhere."""
    table = torch.randn(64, 64, D, generator=torch.Generator().manual_seed(1))

    def forward_capture(batch, what=("hidden",), layers=None, grad=False, **kw):
        calls.append((tuple(what), tuple(layers)))
        feats = []
        for lay in batch.layouts:
            item = source.queue.pop(0)
            hm, wm = lay.grid_hw
            f = torch.empty(lay.num_visual, D)
            g = torch.Generator().manual_seed(len(calls))
            for slot, frames in enumerate(lay.slot_frames):
                ox, oy = (item["offsets_px"][frames[0]] / TP).astype(int) + MARGIN
                r, c = np.divmod(np.arange(hm * wm), wm)
                code = table[torch.from_numpy(r + oy), torch.from_numpy(c + ox)]
                if kind == "shuffled" and slot > 0:
                    code = code[torch.randperm(hm * wm, generator=g)]
                elif kind == "random":
                    code = torch.randn(hm * wm, D, generator=g)
                f[slot * hm * wm:(slot + 1) * hm * wm] = code
            feats.append(f)
        x = torch.stack(feats)
        cap = CaptureResult()
        for l in layers:
            for name in what:
                getattr(cap, name)[l] = x.clone()
        return cap

    return forward_capture


def _run(adapter, monkeypatch, tmp_path, kind, modes=("qk", "qk-rope", "hidden"), heads=None, n=3, frames=5,
         reverse=True, extras=False, calls=None, **kw):
    src = RecordingSource(8, frame_hw=(FRAME, FRAME), seed=3, extras=extras)
    calls = [] if calls is None else calls
    monkeypatch.setattr(adapter, "forward_capture", fake_capture(adapter, src, kind, calls))
    rep = run_diagnosis(adapter, src, range(n), modes=modes, heads=heads, num_frames=frames, reverse=reverse,
                        out_dir=tmp_path, progress=False, **kw)
    return rep, calls, src


def test_aligned_features_give_pck_one_at_every_layer_and_mode(adapter, monkeypatch, tmp_path):
    heads = CorrespondenceHeads.random_init(D, adapter.num_layers, [1], d_hidden=8, d_out=4, seed=0)
    rep, calls, _ = _run(adapter, monkeypatch, tmp_path, "aligned", modes=("qk", "qk-rope", "hidden", "head"),
                         heads=heads)
    assert len(calls) == 3, "one forward per sequence"
    assert set(calls[0][0]) == {"q", "k", "q_rope", "k_rope", "hidden"} and calls[0][1] == (0, 1)
    for mode in ("qk", "qk-rope", "hidden", "head"):
        r = json.loads((tmp_path / mode / "report.json").read_text())
        assert [e["layer"] for e in r["layers"]] == ([1] if mode == "head" else [0, 1])
        for e in r["layers"] + r["reverse"]["layers"]:
            assert e["pck"] == {"0": 1.0, "1": 1.0, "2": 1.0}, (mode, e)
        assert r["num_sequences"] == 3
        # the toy walk moves by whole tokens: zero-motion is far from perfect, so 1.0 is not free
        assert r["zero_motion"]["pck"]["0"] < 0.6
    rec, _ = M.load_records(tmp_path / "qk" / "records.npz")
    assert (rec["pred_idx"] == M.point_tokens(np.stack([rec["gt_x"], rec["gt_y"]], -1), (6, 6))).all()
    assert np.allclose(rec["conf_max"], 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["shuffled", "random"])
def test_shuffled_or_random_features_give_chance(adapter, monkeypatch, tmp_path, kind):
    rep, _, _ = _run(adapter, monkeypatch, tmp_path, kind, modes=("qk",), n=4, frames=6, reverse=False, pictures=0)
    for e in rep["layers"]:
        assert e["pck"]["0"] < 0.15, e  # chance: 1/36
        assert e["pck"]["1"] < 0.35, e  # at most 5 of 36 tokens within 1 token
    assert 0.0 < rep["zero_motion"]["pck"]["1"] < 1.0  # the baseline does not depend on the features


def test_resume_skips_done_sequences_and_reproduces_the_report(adapter, monkeypatch, tmp_path):
    rep1, calls, _ = _run(adapter, monkeypatch, tmp_path, "aligned", modes=("qk", "hidden"), n=2, pictures=0)
    assert len(calls) == 2
    first = (tmp_path / "report.json").read_text()
    rep2, calls2, _ = _run(adapter, monkeypatch, tmp_path, "aligned", modes=("qk", "hidden"), n=2, pictures=0)
    assert calls2 == [], "a rerun must not forward sequences already recorded"
    assert (tmp_path / "report.json").read_text() == first and rep2 == rep1
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "done" and run["resumed"] == 2 and run["computed_now"] == 0
    # more sequences: only the new one is computed
    rep3, calls3, _ = _run(adapter, monkeypatch, tmp_path, "aligned", modes=("qk", "hidden"), n=3, pictures=0)
    assert len(calls3) == 1 and rep3["num_sequences"] == 3
    # other settings in the same folder are refused, unless resume is off
    with pytest.raises(DiagnoseError, match="other settings"):
        _run(adapter, monkeypatch, tmp_path, "aligned", modes=("qk",), n=2, pictures=0)
    rep4, calls4, _ = _run(adapter, monkeypatch, tmp_path, "random", modes=("qk",), n=2, resume=False, pictures=0)
    assert len(calls4) == 2 and rep4["peak"]["pck"]["1"] < 0.5
    assert not (tmp_path / "hidden").exists(), "an overwritten run keeps no stale mode folder"
    assert len(list((tmp_path / "sequences").glob("*.npz"))) == 2
    assert not list(tmp_path.rglob(".*tmp*")), "temp files left behind"


def test_points_metadata_objects_and_gaps(adapter, monkeypatch, tmp_path):
    rep, _, src = _run(adapter, monkeypatch, tmp_path, "aligned", modes=("qk",), n=2, frames=4, extras=True,
                       reverse=False, pictures=0)
    with np.load(tmp_path / "points.npz", allow_pickle=False) as z:
        pts = z["points"].astype(POINTS_DTYPE)
        assert list(z["scenes"]) == ["toy-3-0", "toy-3-1"]
        assert (z["frame_ids"] == np.array([[10, 13, 16, 19]] * 2)).all()
    assert len(pts) == rep["layers"][0]["num_points"]
    assert set(np.unique(pts["gap"])) <= {3, 6, 9} and (pts["gap"] == pts["target_frame_id"] - 10).all()
    assert ((pts["object_id"] == 7) == (pts["query_u"] < FRAME // 2)).all()
    assert ((pts["target_object_id"] == 7) == (pts["gt_u"] < FRAME // 2)).all()
    rec, _ = M.load_records(tmp_path / "qk" / "records.npz")
    obj = join_points(rec, pts)
    qxy = np.stack([join_points(rec, pts, "query_x"), join_points(rec, pts, "query_y")], -1)
    assert np.isfinite(qxy).all(), "every record has its point row"
    assert ((obj == 7) == (qxy[:, 0] < 3)).all()  # left half of a 6-token-wide grid
    # the join is right: the query token of each record contains its query point
    assert (M.point_tokens(qxy, (6, 6)) == rec["query_idx"]).all()
    assert (rec["gap"] == join_points(rec, pts, "gap")).all()
    assert rep["temporal"]["gaps"] == [3.0, 6.0, 9.0]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_real_preset_end_to_end_writes_report_records_and_plots(adapter, tmp_path):
    """The real capture path on a tiny Qwen: every file, schema, and the real features' sanity."""
    src = OrthoToySource(4, frame_hw=(112, 112), seed=0)
    heads = CorrespondenceHeads.random_init(adapter.hidden_size, adapter.num_layers, [0, 1], 32, 16, seed=0)
    rep = run_diagnosis(adapter, src, [1, 2], modes=("qk", "qk-rope", "hidden", "head"), heads=heads,
                        num_frames=4, reverse=True, out_dir=tmp_path, progress=False, batch_size=2,
                        model_name="tiny", pictures=1)
    for key in ("model", "mode", "num_sequences", "layers", "peak", "temporal", "zero_motion", "reverse", "modes"):
        assert key in rep
    assert rep["model"] == "tiny" and rep["mode"] == "qk" and rep["num_sequences"] == 2
    assert set(rep["zero_motion"]) >= {"pck", "far_pck", "by_gap"}
    for e in rep["layers"]:
        assert set(e) >= {"layer", "pck", "confidence", "far_pck"} and set(e["confidence"]) >= {"spearman", "auroc"}
    for f in ("report.json", "report.md", "points.npz", "run.json", "pck_per_layer.png", "pck_vs_gap.png",
              "reliability.png", "correspondences_00000001.png"):
        assert (tmp_path / f).is_file(), f
    assert png_size(tmp_path / "pck_per_layer.png") == (800, 500)
    for mode in ("qk", "qk-rope", "hidden", "head"):
        for f in ("report.json", "report.md", "records.npz", "records_reverse.npz", "pck_per_layer.png"):
            assert (tmp_path / mode / f).is_file(), (mode, f)
    assert "## Mode `qk-rope`" in (tmp_path / "report.md").read_text()
    # identical pixel content at corresponding tokens: the hidden states match far above chance
    hid = json.loads((tmp_path / "hidden" / "report.json").read_text())
    assert hid["layers"][0]["pck"]["0"] > 0.5
    seq = load_sequence(tmp_path / "sequences" / "00000001.npz")
    assert seq["meta"]["grid_hw"] == [4, 4] and set(seq["heat"]) == {"qk", "qk-rope", "hidden", "head"}
    assert seq["heat"]["qk"].shape == (2, 16)


def test_argument_errors(adapter, tmp_path):
    src = OrthoToySource(2, frame_hw=(112, 112))
    with pytest.raises(DiagnoseError, match="needs correspondence heads"):
        run_diagnosis(adapter, src, [0], modes=("head",), out_dir=tmp_path, progress=False)
    with pytest.raises(DiagnoseError, match="unknown mode"):
        run_diagnosis(adapter, src, [0], modes=("qkv",), out_dir=tmp_path, progress=False)
    with pytest.raises(DiagnoseError, match="out of range"):
        run_diagnosis(adapter, src, [0], layers=[5], out_dir=tmp_path, progress=False)
    with pytest.raises(DiagnoseError, match="frame mode"):
        run_diagnosis(adapter, src, [0], frame_mode="nope", out_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _cli(args: list[str]):
    from gasp_vlm.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_run_and_compare(tmp_path):
    common = ["--data", "toy", "--toy-size", "112", "--frames", "3", "--sequences", "2", "--layers", "0,-1",
              "--no-progress", "--pictures", "1"]
    r = _cli(["diagnose", "--model", "tiny-qwen2.5-vl", "--out", str(tmp_path / "a"), "--modes", "qk,hidden",
              "--reverse", *common])
    assert r.exit_code == 0, r.output
    assert "peak layer" in r.output and "[hidden]" in r.output
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert [e["layer"] for e in rep["layers"]] == [0, 7] and "reverse" in rep
    r = _cli(["diagnose", "-m", "tiny-qwen2-vl", "-o", str(tmp_path / "b"), *common])
    assert r.exit_code == 0, r.output
    r = _cli(["diagnose", "-m", "tiny-qwen3-vl", "-o", str(tmp_path / "q3"), "--modes", "qk,hidden", *common])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "q3" / "report.json").read_text())
    assert [e["layer"] for e in rep["layers"]] == [0, 7]
    assert json.loads((tmp_path / "q3" / "run.json").read_text())["config"]["family"] == "qwen3_vl"
    r = _cli(["diagnose", "-m", "tiny-internvl", "-o", str(tmp_path / "ivl"), *common])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ivl" / "run.json").read_text())["config"]["frame_mode"] == "video"
    r = _cli(["diagnose", "-m", "tiny-llava-onevision", "-o", str(tmp_path / "ov"), *common])
    assert r.exit_code == 0, r.output
    reports = [str(tmp_path / d / "report.json") for d in ("a", "b", "q3", "ivl", "ov")]
    r = _cli(["diagnose", "--compare", *reports, "--out", str(tmp_path / "c"), "--labels",
              "qwen2.5,qwen2,qwen3,internvl,onevision"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "compare_pck_per_layer.png").is_file()
    assert "| qwen2.5 |" in (tmp_path / "c" / "compare.md").read_text()
    assert "| qwen3 |" in (tmp_path / "c" / "compare.md").read_text()


@pytest.mark.parametrize("args,msg", [
    (["--model", "tiny-qwen2.5-vl", "--data", "/nonexistent/scenes"], "no such folder"),
    (["--model", "tiny-qwen2.5-vl", "--data", "toy", "--modes", "head"], "needs a trained checkpoint"),
    (["--model", "tiny-qwen2.5-vl", "--data", "toy", "--modes", "qk,attn"], "choose from"),
    (["--model", "tiny-qwen2.5-vl", "--data", "toy", "--layers", "a-b"], "expected 'all'"),
    (["--data", "toy"], "give --model"),
    (["--compare", "only_one.json"], "at least two"),
])
def test_cli_errors(tmp_path, args, msg):
    r = CliRunner().invoke(__import__("gasp_vlm.cli", fromlist=["main"]).main,
                           ["diagnose", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code != 0
    assert msg in r.output


def test_cli_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(__import__("gasp_vlm.cli", fromlist=["main"]).main,
                           ["diagnose", "-m", "tiny-qwen2.5-vl", "--data", str(tmp_path / "empty"), "-o",
                            str(tmp_path / "o")])
    assert r.exit_code != 0 and "no scene folders" in r.output


def test_cli_checkpoint_with_heads(tmp_path):
    """A gasp training checkpoint (full finetune + heads) loads through train.checkpoint and runs 'head'."""
    from safetensors.torch import save_file

    from gasp_vlm.train import checkpoint as C

    ad = load_adapter("tiny-qwen2.5-vl")
    ck = tmp_path / "ckpt"
    ck.mkdir()
    heads = CorrespondenceHeads.random_init(ad.hidden_size, ad.num_layers, [6, 7], 32, 16, seed=0)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(ck / "heads.safetensors"))
    name = "model.language_model.norm.weight"
    save_file({name: ad.model.state_dict()[name].clone()}, str(ck / "llm.safetensors"))
    meta = {"format": C.FORMAT, "step": 1, "finetune": "full", "lora": None,
            "model": {"name": "tiny-qwen2.5-vl", "preset": "tiny-qwen2.5-vl", "overrides": {}, "seed": 0,
                      "dtype": "float32", "family": ad.family, "frame_mode": ad.frame_mode,
                      "attn_implementation": "sdpa", "num_layers": ad.num_layers, "hidden_size": ad.hidden_size},
            "heads": {"layers": [6, 7], "d_model": ad.hidden_size, "d_hidden": 32, "d_out": 16, "tau": 0.07,
                      "lambda_corr": 1.0, "lambda_depth": 0.5}}
    (ck / C.META).write_text(json.dumps(meta))
    r = _cli(["diagnose", "--checkpoint", str(ck), "--data", "toy", "--toy-size", "112", "--frames", "3",
              "--sequences", "1", "--modes", "head,qk", "--layers", "5-7", "--no-progress", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["mode"] == "head" and [e["layer"] for e in rep["layers"]] == [6, 7]
    assert rep["model"] == str(ck)


def test_cli_on_scene_folders(tmp_path):
    """Canonical scene folders (synthetic, with object ids and a camouflage scene) through the real source."""
    from gasp_vlm.data.synth import synth_dataset

    synth_dataset(tmp_path / "scenes", 2, num_frames=5, size=112, progress=False)
    r = _cli(["diagnose", "-m", "tiny-qwen2.5-vl", "--data", str(tmp_path / "scenes"), "--frames", "3",
              "--sequences", "2", "--stride", "5", "--layers", "0,1", "--no-progress", "--pictures", "1",
              "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o" / "points.npz", allow_pickle=False) as z:
        assert list(z["scenes"]) == ["scene_0000", "scene_0001"]
        metas = [json.loads(m) for m in z["scene_meta"]]
        pts = z["points"]
    assert any(m.get("camouflage") for m in metas)
    assert (pts["object_id"] >= 0).mean() > 0.9  # rooms without a ceiling may show some sky (-1)
    rec, _ = M.load_records(tmp_path / "o" / "qk" / "records.npz")
    assert np.isfinite(rec["angle"]).all() and (rec["angle"] > 0).all()  # camera poses -> pose angle
    assert (rec["gap"] > 0).all()
