"""`gasp demo`: the paper's experiment in miniature (logic in gasp_vlm/demo/)."""

from __future__ import annotations

from pathlib import Path

import click

from gasp_vlm.cli import main


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Output folder; a rerun with the same folder resumes (finished stages are skipped).")
@click.option("--quick", is_flag=True, help="A ~1-minute smoke run (tiny data, a few steps): checks the pipeline, "
              "not the science.")
@click.option("--seeds", type=click.IntRange(1), default=1, show_default=True,
              help="Repeat with N data/model seeds (seed_<k>/ each) and report mean and spread.")
@click.option("--model", default=None, help="Preset that stage 0 pretrains (default: configs/demo_base.yaml's, "
              "tiny-qwen2.5-vl).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Stage-1 (GASP) training config (default: the packaged configs/demo.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a stage-1 (GASP) config key, e.g. --set optim.lr=3e-4 (repeatable).")
@click.option("--base-set", "base_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a stage-0 (base pretraining, configs/demo_base.yaml) config key (repeatable).")
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimizer steps per GASP variant.")
@click.option("--base-steps", type=click.IntRange(1), default=None, help="Optimizer steps of the base pretraining.")
@click.option("--train-scenes", type=click.IntRange(1), default=None, help="Synthetic training scenes.")
@click.option("--diag-sequences", type=click.IntRange(1), default=None, help="Held-out sequences per diagnosis.")
@click.option("--jobs", type=click.IntRange(1), default=None, help="Trainings run side by side (default 3: all variants at once).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
def demo_cmd(out: Path, quick: bool, seeds: int, model: str | None, config: Path | None, overrides: tuple[str, ...],
             base_overrides: tuple[str, ...], steps: int | None, base_steps: int | None, train_scenes: int | None,
             diag_sequences: int | None, jobs: int | None, seed: int) -> None:
    """Pretrain a tiny Qwen2.5-VL on general tasks, fine-tune it with LoRA three ways (LM-only control,
    GASP correspondence-only, GASP full) on non-spatial instructions, and show on held-out rooms how its
    own layers' query/key matching and its spatial QA change.

    Writes OUT/report.md (tables, targets, plots), OUT/report.json, the PNGs, per-model diagnostics under
    OUT/diagnose/, answers under OUT/downstream/ and the models (plain HF checkpoints) under OUT/models/.
    The default run takes under 10 minutes on 2 CPU cores; nothing is downloaded.
    """
    from dataclasses import replace

    from gasp_vlm import demo as D

    plan = D.DemoPlan.quick() if quick else D.DemoPlan()
    changes = {k: v for k, v in (("max_steps", steps), ("base_steps", base_steps), ("train_scenes", train_scenes),
                                 ("diag_sequences", diag_sequences), ("jobs", jobs)) if v is not None}
    plan = replace(plan, seed=seed, **changes)
    try:
        report, runs = D.run_demo_seeds(out, plan, seeds, config=config or D.DEFAULT_CONFIG,
                                        overrides=overrides, base_overrides=base_overrides, model=model)
    except (D.DemoError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for r in runs:
        click.echo("")
        if len(runs) > 1:
            click.echo(f"seed {r['plan']['seed']}:")
        click.echo(D.console_table(r))
    click.echo(f"\nreport: {out / 'report.md'}")
