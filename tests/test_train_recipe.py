"""The training recipe: param groups and lr, frozen vision, clipping, exact resume, 2-process DDP, CLI."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.recipe import GaspRecipe, lr_lambda, train

torch.set_num_threads(1)


def tiny_cfg(*overrides: str, **sections):
    base = {
        "model": {"name": "tiny-qwen2.5-vl", "overrides": {"num_hidden_layers": 2}},
        "lora": {"r": 4, "alpha": 8},
        "gasp": {"d_hidden": 32, "d_out": 16, "calib_tokens": 64},
        "optim": {"lr": 1e-3, "max_steps": 6, "warmup_steps": 1},
        "data": {"geometry": ["toy"], "toy_sequences": 6, "frames_min": 2, "frames_max": 3,
                 "instructions": "generated", "generated_instructions": 3, "instruction_ratio": 0.34,
                 "instruction_frames": 2},
        "save_every": 100, "report_to": [],
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base, list(overrides))


def trainable_state(recipe: GaspRecipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.gasp_model.named_parameters() if p.requires_grad}


def read_log(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "logs" / "train.jsonl").read_text().splitlines()]


def test_lr_schedule():
    assert lr_lambda(0, 4, 100) == pytest.approx(1 / 5) and lr_lambda(3, 4, 100) == pytest.approx(4 / 5)
    assert lr_lambda(4, 4, 100) == pytest.approx(1.0) and lr_lambda(100, 4, 100) == pytest.approx(0.0)
    assert lr_lambda(52, 4, 100) == pytest.approx(0.5)
    assert lr_lambda(100, 4, 100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(50, 0, 100, schedule="constant") == 1.0


def test_heads_lr_grads_frozen_vision_and_clipping(tmp_path):
    r = GaspRecipe(tiny_cfg("optim.grad_clip=0.001", "data.instruction_ratio=0"), tmp_path, progress=False)
    groups = {g["name"]: g for g in r.optimizer.param_groups}
    assert set(groups) == {"backbone", "heads"}
    assert {id(p) for p in groups["heads"]["params"]} == {id(p) for p in r.heads.parameters()}
    assert all("lora_" in n for n, p in r.gasp_model.named_parameters() if p.requires_grad and "heads." not in n)
    vision = list(r.adapter.vision_module().parameters())
    assert vision and not any(p.requires_grad for p in vision)

    # the frozen tower's features carry no graph
    (part,), _ = r.micro_batch(0)
    prepared = part.batch
    enc = r.adapter.encode_visual_frozen(prepared)["mm_encoder_outputs"]["video"]
    feats = enc.pooler_output if hasattr(enc, "pooler_output") else enc
    assert not any(t.requires_grad for t in (feats if isinstance(feats, (list, tuple)) else [feats]))

    m = r.forward_backward(0)
    assert m["kind"] == "g" and m["corr"] > 0 and m["per_layer_corr"].shape == (2,)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in r.heads.parameters())
    lora_b = [p for n, p in r.gasp_model.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora_b) and sum(p.grad.abs().sum() for p in lora_b) > 0
    assert all(p.grad is None for p in vision)

    seen = {}

    def spy(opt, args, kwargs):  # the gradient norm the AdamW update actually sees
        seen["norm"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in r.trainable])).item()

    handle = r.optimizer.optimizer.register_step_pre_hook(spy)
    rec = r.optimizer_step()
    handle.remove()
    assert rec["grad_norm"] > 0.01  # pre-clip norm, far above the limit...
    assert seen["norm"] == pytest.approx(0.001, rel=1e-3)  # ...clipped to it before the update
    assert rec["head_lr"] == pytest.approx(4 * rec["lr"])
    for step in range(1, 4):  # the schedule scales both groups alike: heads stay at 4x
        g = {x["name"]: x["lr"] for x in r.optimizer.param_groups}
        assert g["heads"] == pytest.approx(4 * g["backbone"])
        assert g["backbone"] == pytest.approx(1e-3 * lr_lambda(step, 1, 6))
        r.scheduler.step()


def test_resume_is_exact(tmp_path):
    cfg = tiny_cfg()
    straight = GaspRecipe(cfg, tmp_path / "a", progress=False)
    straight.run()
    interrupted = train(cfg, tmp_path / "b", progress=False, stop_at=3)
    assert interrupted.name == "step-000003"
    (tmp_path / "b" / "logs" / "train.jsonl").open("a").write(json.dumps({"step": 4, "loss": -1}) + "\n")  # crash debris
    # the resumed half loads its batches in a DataLoader worker: same batches, same result
    resumed = GaspRecipe(tiny_cfg("data.num_workers=1"), tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 3
    final = resumed.run()
    assert final.name == "step-000006"
    a, b = trainable_state(straight), trainable_state(resumed)
    assert a.keys() == b.keys() and any("heads." in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    la, lb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    # every step has its geometry part; micro-steps 2 and 5 add an instruction part (ratio 0.34)
    assert [r["kinds"] for r in la] == ["g", "g", "gi", "g", "g", "gi"]
    for ra, rb in zip(la, lb):
        for key in ("loss", "lm", "corr", "depth", "lr", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert la[-1]["lm"] > 0 and la[0]["corr"] > 0
    # the state really moved (a resume that silently restarted would not match above either)
    assert not torch.equal(a["heads.0.fc1.weight"], GaspRecipe(cfg, tmp_path / "c", progress=False).heads[0].fc1.weight)


def test_full_finetune_and_reload(tmp_path):
    from gasp_vlm.train.checkpoint import load_checkpoint

    cfg = tiny_cfg("lora.enabled=false", "optim.max_steps=2", "data.instruction_ratio=0.5",
                   model={"name": "tiny-llava-next-video"})
    r = GaspRecipe(cfg, tmp_path, progress=False)
    names = [n for n, p in r.gasp_model.named_parameters() if p.requires_grad and not n.startswith("heads.")]
    assert any("embed_tokens" in n for n in names) and any("layers.1.mlp" in n for n in names)
    assert not any(m in n for n in names for m in ("vision_tower", "multi_modal_projector"))
    vision_before = {n: p.clone() for n, p in r.adapter.vision_module().named_parameters()}
    ckpt = r.run()
    assert (ckpt / "llm.safetensors").is_file() and not (ckpt / "adapter").exists()
    for n, p in r.adapter.vision_module().named_parameters():
        assert torch.equal(p, vision_before[n]), n
    adapter, heads, meta = load_checkpoint(ckpt)
    assert meta["finetune"] == "full" and meta["step"] == 2
    live = dict(r.adapter.model.named_parameters())
    for n, p in adapter.model.named_parameters():
        torch.testing.assert_close(p, live[n].detach(), rtol=0, atol=0, msg=n)
    torch.testing.assert_close(heads.state_dict(), r.heads.state_dict())


def test_resume_refuses_a_different_model_config(tmp_path):
    from gasp_vlm.train.config import ConfigError

    train(tiny_cfg("optim.max_steps=1"), tmp_path, progress=False)
    with pytest.raises(ConfigError, match="'gasp.d_out"):
        GaspRecipe(tiny_cfg("optim.max_steps=2", "gasp.d_out=8"), tmp_path, resume=True, progress=False)


def test_lm_only_run_has_no_heads(tmp_path):
    cfg = tiny_cfg("gasp.lambda_corr=0", "gasp.lambda_depth=0", "optim.max_steps=2")
    r = GaspRecipe(cfg, tmp_path, progress=False)
    assert r.heads is None and [g["name"] for g in r.optimizer.param_groups] == ["backbone"]
    ckpt = r.run()
    assert not (ckpt / "heads.safetensors").exists()
    assert all(rec["corr"] == 0 and rec["depth"] == 0 for rec in read_log(tmp_path))


DDP_WORKER = r'''
import json, os, sys, torch
torch.set_num_threads(1)
from gasp_vlm.train.config import config_from_dict
from gasp_vlm.train.recipe import GaspRecipe
if os.environ["RANK"] == "1":  # a slow rank: its rng file lands after rank 0 wrote all of its own
    import time
    from gasp_vlm.train import checkpoint
    _save_tree = checkpoint.save_tree
    checkpoint.save_tree = lambda *a, **k: (time.sleep(1.5), _save_tree(*a, **k))[1]
cfg = config_from_dict(json.loads(sys.argv[1]))
r = GaspRecipe(cfg, sys.argv[2], progress=False)
r.run()
state = {n: p.detach() for n, p in r.gasp_model.named_parameters() if p.requires_grad}
torch.save({"state": state, "world": r.accelerator.num_processes, "type": str(r.accelerator.distributed_type)},
           os.path.join(sys.argv[2], f"state_rank{r.accelerator.process_index}.pt"))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_matches_single_process_accumulation(tmp_path):
    # both schedules in one test, one after the other, so two torchrun jobs never share the 2 cores
    for ratio in (0.0, 1.0):
        _ddp_case(tmp_path / f"ratio{ratio}", ratio)


def _ddp_case(tmp_path, ratio: float) -> None:
    # DDP over 2 ranks (batch 1 each) == 1 process accumulating the same 2 micro-batches: the ranks take
    # stream positions 2s, 2s+1, exactly the micro-batches of step s with grad_accum=2 (fixed frame count,
    # no anchor subsampling), and both average the two gradients. ratio 1: every micro-batch holds a
    # geometry and an instruction part in one forward (the whole objective), on both ranks alike.
    data = {"geometry": ["toy"], "toy_sequences": 6, "frames_min": 2, "frames_max": 2, "instruction_ratio": ratio,
            "instructions": "generated" if ratio else None, "generated_instructions": 4, "instruction_frames": 2}
    raw = {"model": {"name": "tiny-qwen2.5-vl", "overrides": {"num_hidden_layers": 2}}, "lora": {"r": 4, "alpha": 8},
           "gasp": {"d_hidden": 32, "d_out": 16, "calib_tokens": 64}, "optim": {"lr": 1e-3, "max_steps": 3},
           "data": data, "save_every": 100, "report_to": []}
    (tmp_path / "ddp").mkdir(parents=True)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                           str(script), json.dumps(raw), str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=240)
    # each rank's own traceback first: the tail alone shows only the launcher and the surviving rank
    ranks = "\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith("[rank"))
    assert proc.returncode == 0, ranks[-6000:] + "\n...\n" + proc.stderr[-1500:]
    r0 = torch.load(tmp_path / "ddp" / "state_rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "state_rank1.pt")
    assert r0["world"] == 2 and "MULTI_CPU" in r0["type"]
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:  # DDP keeps the replicas bit-identical
        assert torch.equal(r0["state"][k], r1["state"][k]), k

    single_raw = {**raw, "optim": {**raw["optim"], "grad_accum": 2}}
    ref = GaspRecipe(config_from_dict(single_raw), tmp_path / "single", progress=False)
    ref.run()
    expected = trainable_state(ref)
    init = trainable_state(GaspRecipe(config_from_dict(single_raw), tmp_path / "init", progress=False))
    for k, v in expected.items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(expected[k], init[k]) for k in expected)
    final = tmp_path / "ddp" / "checkpoints" / "step-000003"
    assert (final / "gasp_checkpoint.json").is_file()
    assert sorted(p.name for p in (final / "rng").iterdir()) == [f"rank{i}.{e}" for i in (0, 1)
                                                                for e in ("json", "safetensors")]
    log = read_log(tmp_path / "ddp")
    assert all(r["kinds"] == ("g" if ratio == 0 else "gi") and r["corr"] > 0 for r in log)
    assert all((r["lm"] > 0) == (ratio > 0) for r in log)  # the LM term in every step, with the geometry


def test_cli_train_and_config_errors(tmp_path):
    from click.testing import CliRunner

    from gasp_vlm.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["train", "--config", "demo.yaml", "--set", "optim.max_steps=2",
                               "--set", "model.overrides={num_hidden_layers: 1}", "--set", "data.frames_max=4",
                               "--set", "gasp.d_hidden=32", "--set", "save_every=1", "--set", "keep_last=1",
                               "--set", "report_to=[console]", "--set", "log_every=1",
                               "--out", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "step      2" in res.output and "final checkpoint" in res.output
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # keep_last=1 pruned step 1; no temp dirs left behind
    assert (tmp_path / "run" / "latest").read_text().strip().endswith("step-000002")
    res = runner.invoke(main, ["train", "--config", "demo.yaml", "--set", "optim.lr=fast", "--out", str(tmp_path / "x")])
    # the error names the option the user typed, not the config file the key was not in
    assert res.exit_code != 0 and "--set optim.lr=fast: key 'optim.lr'" in res.output and "demo.yaml" not in res.output


def test_a_run_you_can_watch_logs_per_layer_terms_throughput_and_a_plot(tmp_path):
    """logs/train.jsonl carries each loss term per supervised layer (their mean is the logged term),
    tokens/s split into visual and text tokens, data wait, peak memory; the run ends with a PNG."""
    import numpy as np

    from gasp_vlm.train.watch import step_scalars

    train(tiny_cfg("optim.max_steps=3", "data.instruction_ratio=1.0"), tmp_path, progress=False)
    log = read_log(tmp_path)
    for r in log:
        assert r["kinds"] == "gi" and len(r["corr_per_layer"]) == len(r["depth_per_layer"]) == 2
        assert np.mean(r["corr_per_layer"]) == pytest.approx(r["corr"], rel=1e-5)
        assert np.mean(r["depth_per_layer"]) == pytest.approx(r["depth"], rel=1e-5)
        assert r["visual_tokens_per_s"] > 0 and r["text_tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["visual_tokens_per_s"] + r["text_tokens_per_s"])
        assert 0 <= r["data_wait_frac"] <= 1 and r["data_wait_s"] > 0 and r["peak_mem_gib"] > 0.1
        assert r["model_tflops_per_s"] > 0 and r["mfu"] is None  # no known accelerator peak on CPU
    png = tmp_path / "plots" / "per_layer_losses.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sc = step_scalars(log[0], [0, 1])
    assert sc["train_layers/corr_01"] == log[0]["corr_per_layer"][1] and "train/lm" in sc and "train/mfu" not in sc


def test_model_flops_count_decoder_parameters():
    from gasp_vlm.models import load_adapter
    from gasp_vlm.train.watch import flops_per_token

    ad = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": 2})
    for p in ad.model.parameters():
        p.requires_grad_(False)
    n_dec = sum(p.numel() for p in ad.decoder_layers().parameters())
    f = flops_per_token(ad)
    assert f["a"] == 6 * n_dec and f["b"] == 12 * 2 * ad.hidden_size  # frozen: no weight gradients
    ad.model.lm_head.weight.requires_grad_(True)
    assert flops_per_token(ad)["a"] == 6 * n_dec + 2 * ad.model.lm_head.weight.numel()


def test_epochs_decide_the_run_length_and_resume_agrees(tmp_path, capsys):
    """optim.epochs: passes over the geometry sequences -> max_steps = ceil(epochs·N / (B·world·accum))."""
    r = GaspRecipe(tiny_cfg("optim.epochs=1", "optim.max_steps=999"), tmp_path / "a", progress=False)
    assert r.cfg.optim.max_steps == 6  # 6 toy sequences, batch 1, one process
    assert GaspRecipe(tiny_cfg("optim.epochs=1.5", "optim.grad_accum=2"), tmp_path / "b",
                      progress=False).cfg.optim.max_steps == 5  # ceil(9 / 2)
    train(tiny_cfg("optim.epochs=0.5"), tmp_path / "c", progress=False)
    assert [x["step"] for x in read_log(tmp_path / "c")] == [1, 2, 3]
    capsys.readouterr()
    again = GaspRecipe(tiny_cfg("optim.epochs=0.5"), tmp_path / "c", resume=True, progress=False)
    assert again.step == 3 and "WARNING" not in capsys.readouterr().out
    from gasp_vlm.train.config import ConfigError

    with pytest.raises(ConfigError, match="'optim.epochs'"):
        tiny_cfg("optim.epochs=0")
