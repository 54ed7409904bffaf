"""`gasp train` and `gasp export`: the GASP trainer (train/recipe.py) and the merged-model export.

Multi-process: launch the same command under ``torchrun --nproc-per-node N $(which gasp) train ...`` or
``accelerate launch --config_file src/gasp_vlm/configs/accelerate/multi_gpu.yaml $(which gasp) train ...``
(DeepSpeed ZeRO-2: ``accelerate/zero2.yaml``, or ``--set deepspeed=src/gasp_vlm/configs/deepspeed/zero2.json``).
"""

from __future__ import annotations

from pathlib import Path

import click

from gasp_vlm.cli import main


@main.command("train")
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path), default=None,
              help="YAML config (see src/gasp_vlm/configs/). Default: the built-in defaults.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set optim.lr=3e-4 --set gasp.lambda_depth=0 (repeatable).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Run directory (checkpoints, logs). Default: the config's output_dir.")
@click.option("--resume", is_flag=True, help="Continue exactly from the latest checkpoint in the run directory.")
@click.option("--resume-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Continue from this checkpoint instead (e.g. an older one when the latest is damaged); "
                   "the config must match it as for --resume.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_cmd(config_path: Path | None, overrides: tuple[str, ...], out_dir: Path | None, resume: bool,
              resume_from: Path | None, no_progress: bool) -> None:
    """Train GASP heads + LoRA (or full) on geometry + instruction data."""
    if resume and resume_from is not None:
        raise click.UsageError("give --resume or --resume-from, not both")
    from gasp_vlm.train.config import ConfigError, load_config

    try:
        cfg = load_config(_find_config(config_path), list(overrides))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    from gasp_vlm.data.scene import SceneError
    from gasp_vlm.models import ModelLoadError
    from gasp_vlm.train.checkpoint import CheckpointError
    from gasp_vlm.train.instructions import InstructionFormatError
    from gasp_vlm.train.recipe import train

    try:
        ckpt = train(cfg, out_dir or Path(cfg.output_dir), resume=resume_from or resume, progress=not no_progress)
    except (ConfigError, CheckpointError, SceneError, InstructionFormatError, ModelLoadError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"final checkpoint: {ckpt}")


def _find_config(path: Path | None) -> Path | None:
    """A config path as given, or else the shipped config of that name (``--config demo.yaml``)."""
    if path is None or path.exists():
        return path
    shipped = Path(__file__).resolve().parent.parent / "configs" / path.name
    if path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    return path  # load_config reports the missing file


@main.command("export")
@click.argument("checkpoint", required=False, type=click.Path(path_type=Path))
@click.option("--checkpoint", "checkpoint_opt", type=click.Path(path_type=Path), default=None,
              help="Checkpoint dir, or a run dir (its latest checkpoint). Same as the positional argument.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output HF model directory.")
@click.option("--dtype", default=None, help="Cast the saved weights (float32 | bfloat16). Default: as trained.")
@click.option("--overwrite", is_flag=True, help="Replace a previous export in --out (any other folder is refused).")
def export_cmd(checkpoint: Path | None, checkpoint_opt: Path | None, out_dir: Path, dtype: str | None,
               overwrite: bool) -> None:
    """Drop the heads, merge LoRA, write a plain HF checkpoint (safetensors) of the base architecture."""
    ckpt = checkpoint or checkpoint_opt
    if ckpt is None:
        raise click.UsageError("give the checkpoint (positional or --checkpoint)")
    from gasp_vlm.train.export import export_checkpoint

    try:
        out = export_checkpoint(ckpt, out_dir, dtype=dtype, overwrite=overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # CheckpointError is a ValueError
        raise click.ClickException(str(e)) from None
    click.echo(f"exported {out} (heads dropped, LoRA merged; loads with from_pretrained of the base class)")
