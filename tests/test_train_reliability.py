"""Hostile-user cases of training, resume and export (issue 17): every one gets a clear error that names
the file or key, or the correct result; nothing half-written is left, and no pickle is ever loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gasp_vlm.cli import main
from gasp_vlm.io import StateFileError, check_safetensors, load_tree, save_tree
from gasp_vlm.train.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from gasp_vlm.train.config import ConfigError, config_from_dict
from gasp_vlm.train.recipe import GaspRecipe, train

torch.set_num_threads(1)


def tiny_cfg(*overrides: str):
    base = {
        "model": {"name": "tiny-qwen2.5-vl", "overrides": {"num_hidden_layers": 1}},
        "lora": {"r": 4, "alpha": 8},
        "gasp": {"d_hidden": 16, "d_out": 8, "calib_tokens": 0},
        "optim": {"lr": 1e-3, "max_steps": 3},
        "data": {"geometry": ["toy"], "toy_sequences": 4, "frames_min": 2, "frames_max": 2, "frame_hw": [56, 56]},
        "save_every": 1, "keep_last": 3, "report_to": [],
    }
    return config_from_dict(base, list(overrides))


@pytest.fixture(scope="module")
def run3(tmp_path_factory) -> Path:
    """A finished 3-step LoRA run with checkpoints at steps 1, 2, 3."""
    out = tmp_path_factory.mktemp("rel") / "run"
    train(tiny_cfg(), out, progress=False)
    return out


@pytest.fixture
def run_copy(run3, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run3, dst)
    return dst


def _state(recipe: GaspRecipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.gasp_model.named_parameters() if p.requires_grad}


# ---- config -------------------------------------------------------------------------------------
def test_each_lambda_is_named_and_set_keys_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set gasp.lambda_depth=-1: config key 'gasp.lambda_depth'"):
        tiny_cfg("gasp.lambda_depth=-1")
    with pytest.raises(ConfigError, match=r"^--set gasp.lambda_corr=-2: config key 'gasp.lambda_corr'"):
        tiny_cfg("gasp.lambda_corr=-2")
    with pytest.raises(ConfigError, match=r"^--set optim.nope=1: unknown key 'optim.nope'"):
        tiny_cfg("optim.nope=1")
    yml = tmp_path / "mine.yaml"
    yml.write_text("gasp:\n  lambda_depth: -1\n")
    from gasp_vlm.train.config import load_config

    with pytest.raises(ConfigError, match=r"mine\.yaml: config key 'gasp.lambda_depth'"):
        load_config(yml)
    with pytest.raises(ConfigError, match=r"^--set gasp.tau=0: config key 'gasp.tau'"):
        load_config(yml, ["gasp.lambda_depth=1", "gasp.tau=0"])


def test_train_on_a_missing_data_folder_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(main, ["train", "--set", "data.geometry=[" + str(tmp_path / "nowhere") + "]",
                                  "--out", str(tmp_path / "run"), "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"config key 'data.geometry': {tmp_path / 'nowhere'}: no such folder" in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- checkpoints: no pickle, relative latest ----------------------------------------------------
def test_tree_round_trip_of_real_optimizer_and_rng_state():
    from gasp_vlm.train.checkpoint import rng_state

    p = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(p.parameters(), lr=0.1, betas=(0.8, 0.9))
    p(torch.randn(4, 3)).sum().backward()
    opt.step()
    tree = {"optimizer": opt.state_dict(), "rng": rng_state(), "step": 7}
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_tree(tree, Path(d) / "s")
        back = load_tree(Path(d) / "s")
    assert back["step"] == 7 and back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer parameter ids survive
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert back["rng"]["python"] == tree["rng"]["python"]
    import numpy as np

    assert back["rng"]["numpy"][0] == "MT19937" and np.array_equal(back["rng"]["numpy"][1], tree["rng"]["numpy"][1])
    opt2 = torch.optim.AdamW(p.parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])  # what resume does


def test_checkpoints_hold_no_pickle_and_resume_never_unpickles(run_copy, monkeypatch):
    ck = run_copy / "checkpoints" / "step-000003"
    assert not list(ck.rglob("*.pt")) and not list(ck.rglob("*.pkl"))
    assert (ck / "trainer_state.json").is_file() and (ck / "rng" / "rank0.safetensors").is_file()

    def no_pickle(*a, **k):
        raise AssertionError("torch.load called on resume")

    monkeypatch.setattr(torch, "load", no_pickle)
    r = GaspRecipe(tiny_cfg("optim.max_steps=4"), run_copy, resume=True, progress=False)
    assert r.step == 3


def test_latest_is_relative_so_a_copied_run_resumes_from_its_own_checkpoints(run3, run_copy):
    assert (run3 / "latest").read_text().strip() == "checkpoints/step-000003"
    assert latest_checkpoint(run_copy) == run_copy / "checkpoints" / "step-000003"
    r = GaspRecipe(tiny_cfg(), run_copy, resume=True, progress=False)
    assert r.resumed_from == run_copy / "checkpoints" / "step-000003"


def test_a_pointer_outside_the_run_is_refused(run3, run_copy):
    (run_copy / "latest").write_text(str((run3 / "checkpoints" / "step-000003").resolve()))  # an old-style copy
    with pytest.raises(CheckpointError, match="outside the run folder"):
        latest_checkpoint(run_copy)
    (run_copy / "latest").write_text("../run/checkpoints/step-000002")
    r = CliRunner().invoke(main, ["export", str(run_copy), "--out", str(run_copy.parent / "hf")])
    assert r.exit_code == 1 and "outside the run folder" in r.output and not (run_copy.parent / "hf").exists()


# ---- damaged checkpoints -----------------------------------------------------------------------
def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("file", ["adapter/adapter_model.safetensors", "heads.safetensors",
                                  "trainer_state.safetensors", "trainer_state.json", "gasp_checkpoint.json"])
def test_resume_and_export_name_a_truncated_file_and_offer_the_previous_checkpoint(run_copy, tmp_path, file):
    damaged = run_copy / "checkpoints" / "step-000003" / file
    _truncate(damaged)
    prev = run_copy / "checkpoints" / "step-000002"
    r = CliRunner().invoke(main, ["train", "--set", "data.geometry=[toy]", "--set", "model.overrides={num_hidden_layers: 1}",
                                  "--out", str(run_copy), "--resume", "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert str(damaged) in r.output and f"the previous checkpoint {prev} is intact" in r.output
    assert f"--resume-from {prev}" in r.output
    out = tmp_path / "hf"
    r = CliRunner().invoke(main, ["export", str(run_copy), "--out", str(out)])
    if file.startswith("trainer_state"):  # an export reads only the weights: it still works
        assert r.exit_code == 0 and json.loads((out / "gasp_export.json").read_text())["step"] == 3, r.output
    else:
        assert r.exit_code == 1 and str(damaged) in r.output and f"gasp export {prev}" in r.output, r.output
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    # the offered fallback works
    resumed = GaspRecipe(tiny_cfg(), run_copy, resume=prev, progress=False)
    assert resumed.step == 2


def test_resume_from_an_older_checkpoint_reproduces_the_run(run3, run_copy):
    final = GaspRecipe(tiny_cfg(), run3, resume=True, progress=False)  # step 3, nothing left to do
    again = GaspRecipe(tiny_cfg(), run_copy, resume=run_copy / "checkpoints" / "step-000001", progress=False)
    assert again.step == 1
    again.run()
    a, b = _state(final), _state(again)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_no_intact_checkpoint_left_is_said(run_copy):
    for ck in (run_copy / "checkpoints").iterdir():
        _truncate(ck / "heads.safetensors")
    with pytest.raises(CheckpointError, match="no older intact checkpoint is left"):
        verify_checkpoint(run_copy)


def test_check_safetensors_catches_truncation_exactly(run3, tmp_path):
    f = run3 / "checkpoints" / "step-000003" / "heads.safetensors"
    check_safetensors(f)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(f.read_bytes()[:-1])  # one byte short
    with pytest.raises(StateFileError, match="truncated"):
        check_safetensors(cut)
    cut.write_bytes(b"\x01")
    with pytest.raises(StateFileError, match="truncated"):
        check_safetensors(cut)


# ---- resume with a changed config ---------------------------------------------------------------
def test_resume_refuses_changed_optim_and_warns_on_max_steps(run_copy, capsys):
    with pytest.raises(ConfigError, match=r"'optim.lr' \(checkpoint: 0.001, now: 0.01\)"):
        GaspRecipe(tiny_cfg("optim.lr=1e-2"), run_copy, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"'optim.head_lr_mult'.*'optim.weight_decay'"):
        GaspRecipe(tiny_cfg("optim.head_lr_mult=2", "optim.weight_decay=0.1"), run_copy, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"'seed'"):
        GaspRecipe(tiny_cfg("seed=3"), run_copy, resume=True, progress=False)
    capsys.readouterr()
    r = GaspRecipe(tiny_cfg("optim.max_steps=5", "keep_last=1", "data.num_workers=1"), run_copy, resume=True,
                   progress=False)
    out = capsys.readouterr().out
    assert r.step == 3 and "WARNING" in out and "optim.max_steps changed from 3 to 5" in out
    assert "keep_last" not in out  # keys that change no result pass silently


# ---- export --overwrite ------------------------------------------------------------------------
def test_export_overwrite_replaces_only_a_previous_export(run3, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    r = CliRunner().invoke(main, ["export", str(run3), "--out", str(precious), "--overwrite"])
    assert r.exit_code == 1 and "not a previous gasp export" in r.output
    assert (precious / "chapter1.tex").read_text() == "years of work"
    out = tmp_path / "hf"
    assert CliRunner().invoke(main, ["export", str(run3), "--out", str(out)]).exit_code == 0
    first = json.loads((out / "gasp_export.json").read_text())
    r = CliRunner().invoke(main, ["export", str(run3 / "checkpoints" / "step-000002"), "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert first["step"] == 3 and json.loads((out / "gasp_export.json").read_text())["step"] == 2


def test_reloaded_heads_know_the_stream_they_were_trained_on(run3):
    from gasp_vlm.train.checkpoint import latest_checkpoint, load_checkpoint

    _, heads, meta = load_checkpoint(latest_checkpoint(run3))
    assert meta["heads"]["input_norm"] == "rms" and heads.input_norm == "rms"  # the default gasp.head_norm
