"""Stages 0 and 1: the pretrained base, then the three GASP variants on it -- all with the project's trainer.

Every training is ``train/recipe.py`` in a child process (``jobs`` side by side, ``cpu_count // jobs``
torch threads each), resumable from its last checkpoint, marked ``DONE`` when finished; its export
(``models/<name>``: LoRA merged, heads dropped, a plain HF checkpoint) is what later stages load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gasp_vlm.demo.plan import BASE_CONFIG, VARIANTS, DemoError, DemoPlan


def _seed_sets(plan: DemoPlan) -> list[str]:
    return [f"seed={plan.seed}", f"data.seed={plan.seed}", f"model.seed={plan.seed}", "report_to=[]"]


def base_config(data: dict[str, Path], plan: DemoPlan, overrides: Sequence[str] = (), config: Path = BASE_CONFIG):
    """Stage 0: LM-only full fine-tuning of the random-initialised preset on the general tasks (+ the small
    spatial-format share)."""
    from gasp_vlm.train.config import load_config

    steps = [] if plan.base_steps is None else [f"optim.max_steps={plan.base_steps}"]
    sets = [f"data.instructions={data['base_tasks']}", *_seed_sets(plan), *plan.base_overrides, *steps, *overrides]
    return load_config(config, sets)  # the user's overrides come last: they win over the plan's


def variant_config(config: Path, variant: str, data: dict[str, Path], plan: DemoPlan, base_model: Path | str,
                   overrides: Sequence[str] = ()):
    """Stage 1: one variant -- LoRA on the base, the same geometry and non-spatial instructions for all."""
    from gasp_vlm.train.config import load_config

    steps = [] if plan.max_steps is None else [f"optim.max_steps={plan.max_steps}"]
    sets = [f"model.name={base_model}", f"data.geometry=[{data['train']}]",
            f"data.instructions={data['finetune_tasks']}", *_seed_sets(plan), *plan.config_overrides, *steps,
            *overrides, *VARIANTS[variant]]  # the user's overrides win over the plan's; the variant's λ's over both
    return load_config(config, sets)


def _exit_with_parent() -> None:
    """Stop this worker when the demo process dies (killed, Ctrl-C): no orphan training left running."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _train_worker(cfg_dict: dict, out_dir: str, threads: int) -> tuple[str, float]:
    """Child-process entry: one training with ``threads`` torch threads (resumes if interrupted);
    returns (final checkpoint, wall seconds of this worker's own training)."""
    import torch

    from gasp_vlm.train.config import config_from_dict
    from gasp_vlm.train.recipe import train

    torch.set_num_threads(threads)
    _exit_with_parent()
    cfg = config_from_dict(cfg_dict, where=f"{out_dir}/config")
    t0 = time.time()
    ckpt = train(cfg, out_dir, resume=True, progress=False)
    return str(ckpt), time.time() - t0


def log_records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "train.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def _final_losses(recs: list[dict], window: int = 20) -> dict[str, float | None]:
    """Mean of the last ``window`` logged values of each term, from the steps of the kind that trains it."""
    out: dict[str, float | None] = {}
    for key, kind in (("lm", "i"), ("corr", "g"), ("depth", "g")):
        vals = [r[key] for r in recs if kind in r.get("kinds", "") and r.get(key) is not None][-window:]
        out[key] = round(float(np.mean(vals)), 4) if vals else None
    return out


def _last_step(run_dir: Path) -> int:
    """Step of the last complete log record; reads only the file's tail (polled every second)."""
    path = run_dir / "logs" / "train.jsonl"
    if not path.exists():
        return 0
    with path.open("rb") as f:
        start = max(0, path.stat().st_size - 8192)
        f.seek(start)
        lines = f.read().split(b"\n")
    for line in reversed(lines[1:] if start else lines):  # after a seek, lines[0] may be cut
        try:
            return int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, UnicodeDecodeError):  # empty, or a line being written right now
            continue
    return 0


def train_runs(runs: dict[str, Path], configs: dict[str, Any], jobs: int, progress: bool = True) -> dict[str, dict]:
    """Train every config (``jobs`` at a time, each in its own process) into ``runs[name]``; returns
    per-run timing and final losses (read back from ``DONE`` for runs a previous call finished)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    todo = [v for v in configs if not (runs[v] / "DONE").exists()]
    timing = {v: json.loads((runs[v] / "DONE").read_text()) for v in configs if v not in todo}
    if not todo:
        return timing
    total = {v: configs[v].optim.max_steps for v in todo}
    workers = max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 2) // workers)
    bars = {v: tqdm(total=total[v], desc=f"train {v:<9}", unit="step", position=i, disable=not progress,
                    leave=True) for i, v in enumerate(todo)}
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {v: ex.submit(_train_worker, configs[v].to_dict(), str(runs[v]), threads) for v in todo}
        pending = set(todo)
        while pending:
            time.sleep(1.0)
            for v in list(pending):
                bars[v].n = min(_last_step(runs[v]), total[v])
                bars[v].refresh()
                if not futs[v].done():
                    continue
                pending.discard(v)
                try:
                    ckpt, wall = futs[v].result()
                except Exception as e:  # noqa: BLE001 -- re-raised with the run named
                    raise DemoError(f"training {v!r} failed (run dir {runs[v]}): {e}") from e
                recs = log_records(runs[v])
                timing[v] = {"checkpoint": ckpt, "wall_s": round(wall, 1), "steps": total[v], "threads": threads,
                             "concurrent": workers,
                             # from the step log: right across resumes, under the same contention
                             "s_per_step": round(float(np.mean([r["step_time_s"] for r in recs])), 4) if recs else None,
                             "final": _final_losses(recs)}
                (runs[v] / "DONE").write_text(json.dumps(timing[v], indent=1))
                bars[v].n = total[v]
                bars[v].refresh()
    for b in bars.values():
        b.close()
    return timing


def export_models(out: Path, names: Sequence[str]) -> dict[str, Path]:
    """``runs/<name>`` -> ``models/<name>`` (skipped when already exported)."""
    from gasp_vlm.train.export import export_checkpoint

    paths = {}
    for v in names:
        dst = out / "models" / v
        if not (dst / "config.json").exists():
            export_checkpoint(out / "runs" / v, dst, overwrite=True)
        paths[v] = dst
    return paths


def pretrain_base(out: Path, data: dict[str, Path], plan: DemoPlan, overrides: Sequence[str] = (),
                  progress: bool = True) -> tuple[Path, dict, Any]:
    """Stage 0 -> (exported base model dir, its timing, its config). Cached: a rerun reuses it."""
    cfg = base_config(data, plan, overrides)
    timing = train_runs({"base": out / "runs" / "base"}, {"base": cfg}, jobs=1, progress=progress)["base"]
    return export_models(out, ["base"])["base"], timing, cfg


def train_variants(out: Path, config: Path, data: dict[str, Path], plan: DemoPlan, base_model: Path,
                   overrides: Sequence[str] = (), progress: bool = True) -> tuple[dict[str, dict], dict[str, Any]]:
    """Stage 1 -> (timing per variant, config per variant); the exports land in ``models/<variant>``."""
    configs = {v: variant_config(config, v, data, plan, base_model, overrides) for v in VARIANTS}
    timing = train_runs({v: out / "runs" / v for v in VARIANTS}, configs, plan.jobs, progress)
    export_models(out, list(VARIANTS))
    return timing, configs
