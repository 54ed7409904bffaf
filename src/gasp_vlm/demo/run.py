"""The whole miniature experiment, stage by stage (each stage resumes: a rerun with the same ``out``
skips finished scenes, trainings, exports, diagnosed sequences and answered question sets)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from gasp_vlm.demo.data import make_data
from gasp_vlm.demo.diagnosis import DIAG_MODES, diagnose_models, lookalike_pck
from gasp_vlm.demo.downstream import evaluate_models
from gasp_vlm.demo.plan import DEFAULT_CONFIG, VARIANTS, DemoPlan
from gasp_vlm.demo.plots import write_plots
from gasp_vlm.demo.report import aggregate_seeds, check_targets, report_markdown, summarize_run
from gasp_vlm.demo.training import pretrain_base, train_variants
from gasp_vlm.io import atomic_write_text, write_json_atomic


def run_demo(out: str | Path, plan: DemoPlan | None = None, *, config: str | Path = DEFAULT_CONFIG,
             overrides: Sequence[str] = (), base_overrides: Sequence[str] = (), model: str | None = None,
             progress: bool = True) -> dict:
    """One seed of the miniature experiment into ``out``; returns the report dict (also report.json/md).

    ``model``: the preset stage 0 pretrains (default: configs/demo_base.yaml's); ``overrides`` go to the
    stage-1 (GASP) config, ``base_overrides`` to stage 0's."""
    plan = plan or DemoPlan()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_sets = [*base_overrides, *([f"model.name={model}"] if model else []),
                 f"data.instruction_frames={plan.qa_clip_frames}"]
    t0 = time.time()
    data = make_data(out, plan, progress)
    t_data = time.time() - t0

    base_dir, base_timing, base_cfg = pretrain_base(out, data, plan, base_sets, progress)
    t_base = time.time() - t0 - t_data
    t1 = time.time()
    sets = [f"data.instruction_frames={plan.qa_clip_frames}", *overrides]
    training, configs = train_variants(out, Path(config), data, plan, base_dir, sets, progress)
    t_train = time.time() - t1
    models: dict[str, Any] = {"base": base_dir, **{v: out / "models" / v for v in VARIANTS}}

    t2 = time.time()
    diag = diagnose_models(out, models, data["heldout"], plan, progress)
    lookalike = {n: lookalike_pck(out / "diagnose" / n, int(diag[n]["qk"]["peak"]["layer"])) for n in diag}
    t_diag = time.time() - t2
    t3 = time.time()
    downstream = evaluate_models(out, models, data["heldout_qa"])
    t_down = time.time() - t3

    rows = summarize_run(diag, lookalike, downstream)
    plots = write_plots(out, diag, downstream, {v: out / "runs" / v for v in VARIANTS})
    cfg = configs["full"]
    report = {
        "format": "gasp-demo/2", "base_preset": base_cfg.model.name, "base_steps": base_cfg.optim.max_steps,
        "steps": cfg.optim.max_steps, "plan": asdict(plan), "base_config": base_cfg.to_dict(), "config": cfg.to_dict(),
        "variants": {v: VARIANTS[v] for v in VARIANTS}, "results": rows, "downstream": downstream,
        "targets": check_targets(rows), "lookalike": lookalike, "training": {"base": base_timing, **training},
        "diagnose": {n: {m: f"diagnose/{n}/{m}/report.json" for m in DIAG_MODES} for n in diag},
        "timings": {"data_s": round(t_data, 1), "base_s": round(t_base, 1), "train_s": round(t_train, 1),
                    "diagnose_s": round(t_diag, 1), "downstream_s": round(t_down, 1),
                    "total_s": round(time.time() - t0, 1)},
        "plots": plots,
    }
    write_json_atomic(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    return report


def run_demo_seeds(out: str | Path, plan: DemoPlan, seeds: int, **kw: Any) -> tuple[dict, list[dict]]:
    """``seeds`` == 1: one run in ``out``; else one per seed under ``out/seed_<k>`` + the aggregate."""
    out = Path(out)
    if seeds == 1:
        rep = run_demo(out, plan, **kw)
        return rep, [rep]
    reps = [run_demo(out / f"seed_{s}", replace(plan, seed=plan.seed + s), **kw) for s in range(seeds)]
    return aggregate_seeds(out, reps), reps
