"""The shipped cluster scripts parse, and every gasp option they pass exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gasp_vlm.cli import main

SLURM = Path(__file__).resolve().parents[1] / "examples" / "slurm"


@pytest.mark.parametrize("script,cmd,marker", [("train_7b.sbatch", ["train"], ' train --config'),
                                               ("convert_array.sbatch", ["data", "convert"], "gasp data convert")])
def test_slurm_scripts_parse_and_use_real_options(script, cmd, marker):
    text = (SLURM / script).read_text()
    subprocess.run(["bash", "-n", str(SLURM / script)], check=True)
    helptext = CliRunner().invoke(main, [*cmd, "--help"]).output
    used = set(re.findall(r"\s(--[a-z][a-z-]+)", text.split(marker, 1)[1]))
    assert used and all(opt in helptext for opt in used), sorted(o for o in used if o not in helptext)
    if cmd == ["train"]:
        keys = re.findall(r"--set (\w+\.\w+)=", text)
        from gasp_vlm.train.config import TrainConfig

        cfg = TrainConfig().to_dict()
        assert keys and all(k.split(".")[1] in cfg[k.split(".")[0]] for k in keys)
