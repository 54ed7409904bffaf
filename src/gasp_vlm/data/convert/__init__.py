"""Real-dataset converters into the canonical scene format (data/scene.py).

``DATASETS[name]`` pairs a scene finder with a one-scene converter; ``convert_dataset`` (runner.py)
converts every scene of a source in parallel, sharded and resumable, and reports failures per scene.
``CONVERTERS[name](src, out, **opts) -> out`` is the strict form for scripts and tests: the same
conversion, sequential, raising the first scene's ``ConvertError``. Every scene is written through
``SceneWriter`` (atomic: nothing appears at its path unless the whole scene converted) and errors name
the offending file.

Datasets (each module's docstring states its input layout and conventions):
dl3dv, co3d, scannet, scannetpp, arkitscenes, megadepth, hypersim, blendedmvs, wildrgbd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from gasp_vlm.data.convert import (arkitscenes, blendedmvs, co3d, dl3dv, hypersim, megadepth, scannet, scannetpp,
                                   wildrgbd)
from gasp_vlm.data.convert.common import ConvertError
from gasp_vlm.data.convert.runner import ConvertReport, Dataset, SceneJob, convert_dataset, parse_shard

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("dl3dv", dl3dv.dl3dv_scenes, dl3dv.convert_dl3dv, "<hash>/{colmap/sparse/0/, images_4/, transforms.json}"),
    Dataset("co3d", co3d.co3d_scenes, co3d.convert_co3d_sequence, "<category>/{frame_annotations.jgz, <seq>/}"),
    Dataset("scannet", scannet.scannet_scenes, scannet.convert_scannet, "<scene>/{color,depth,pose,intrinsic}/"),
    Dataset("scannetpp", scannetpp.scannetpp_scenes, scannetpp.convert_scannetpp, scannetpp.LAYOUT),
    Dataset("arkitscenes", arkitscenes.arkitscenes_scenes, arkitscenes.convert_arkitscenes, arkitscenes.LAYOUT),
    Dataset("megadepth", megadepth.megadepth_scenes, megadepth.convert_megadepth, megadepth.LAYOUT),
    Dataset("hypersim", hypersim.hypersim_scenes, hypersim.convert_hypersim, hypersim.LAYOUT),
    Dataset("blendedmvs", blendedmvs.blendedmvs_scenes, blendedmvs.convert_blendedmvs, blendedmvs.LAYOUT),
    Dataset("wildrgbd", wildrgbd.wildrgbd_scenes, wildrgbd.convert_wildrgbd, wildrgbd.LAYOUT),
)}


def _strict(ds: Dataset) -> Callable[..., Path]:
    def run(src: Path, out: Path, **opts: Any) -> Path:
        report = convert_dataset(ds, src, out, progress=False, **opts)
        if report.failed:
            raise ConvertError(next(iter(report.failed.values())))
        return Path(out)

    run.__name__ = f"convert_{ds.name}"
    run.__doc__ = f"Convert {ds.name} at ``src`` into ``out`` (strict: the first failed scene raises)."
    return run


CONVERTERS: dict[str, Callable[..., Path]] = {name: _strict(ds) for name, ds in DATASETS.items()}

__all__ = ["CONVERTERS", "ConvertError", "ConvertReport", "DATASETS", "Dataset", "SceneJob", "convert_dataset",
           "parse_shard"]
