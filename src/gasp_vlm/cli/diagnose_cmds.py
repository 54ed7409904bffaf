"""`gasp` sub-commands of this area (filled in by its issue)."""

from __future__ import annotations

import click

from gasp_vlm.cli import main
