"""`gasp data ...`: scene datasets (synthetic generation, checks, GT tracks, converters)."""

from __future__ import annotations

import click

from gasp_vlm.cli import main


@main.group("data")
def data() -> None:
    """Multi-view RGB-D scene datasets in the canonical gasp-scene/1 format."""
