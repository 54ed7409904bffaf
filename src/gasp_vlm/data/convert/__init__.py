"""Real-dataset converters into the canonical scene format (data/scene.py).

``CONVERTERS[name](src, out, depth=None, **kw) -> Path``; every converter writes through
``SceneWriter`` (atomic: nothing appears at ``out`` unless the whole scene converted) and raises
``ConvertError`` (a ``SceneError``) with a message naming the offending file. Keyword options of
one converter that another does not take are ignored, so a CLI can pass one set of options to all.

- ``dl3dv``: nerfstudio transforms.json + user depth (npy / 16-bit png / COLMAP .geometric.bin) -> scene ``out``.
- ``co3d``: CO3Dv2 category (or sequence) folder -> one scene per sequence under ``out``.
- ``scannet``: SensReader export (color/, depth/, pose/, intrinsic/) -> scene ``out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from gasp_vlm.data.convert.co3d import convert_co3d
from gasp_vlm.data.convert.common import ConvertError
from gasp_vlm.data.convert.dl3dv import convert_dl3dv
from gasp_vlm.data.convert.scannet import convert_scannet

CONVERTERS: dict[str, Callable[..., Path]] = {"dl3dv": convert_dl3dv, "co3d": convert_co3d, "scannet": convert_scannet}

__all__ = ["CONVERTERS", "ConvertError", "convert_co3d", "convert_dl3dv", "convert_scannet"]
