"""The `gasp` command. Thin: each sub-command parses its options and calls library code.

One module per area (data, train/export, diagnose, eval/score, demo, bench); heavy imports
(torch, transformers) happen inside the commands so that `gasp --help` stays instant.
"""

from __future__ import annotations

import click

from gasp_vlm import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gasp")
def main() -> None:
    """gasp-vlm: inject 3D geometric priors into vision-language models (GASP, CVPR 2026).

    \b
    Typical flow:
      gasp data synth --out data/synth        # or: gasp data convert dl3dv ...
      gasp diagnose --model tiny-qwen2.5-vl --data data/synth --out runs/diag
      gasp train --config demo.yaml --out runs/train   # shipped configs are found by name
      gasp export runs/train --out runs/merged   # heads dropped, LoRA merged
      gasp eval --benchmark vsibench --data ~/VSI-Bench --model runs/merged --out runs/vsi
      gasp demo --out runs/demo               # the whole miniature experiment on CPU
    """


def _register() -> None:
    # Each area module defines its click commands and registers them on `main`.
    from gasp_vlm.cli import bench_cmds, data_cmds, demo_cmds, diagnose_cmds, eval_cmds, train_cmds  # noqa: F401


_register()
