"""`gasp data ...`: scene datasets (synthetic generation, checks, GT tracks, converters).

Thin wrappers: parsing and messages here, the work in gasp_vlm.data / gasp_vlm.geometry (imported inside
the commands so that `gasp --help` stays instant). User errors become click.ClickException (no traceback).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from gasp_vlm.cli import main

CONVERTER_NAMES = ("dl3dv", "co3d", "scannet", "scannetpp", "arkitscenes", "megadepth", "hypersim", "blendedmvs",
                   "wildrgbd")


@main.group("data")
def data() -> None:
    """Multi-view RGB-D scene datasets in the canonical gasp-scene/1 format.

    \b
    A scene folder holds scene.json, image_names.json, images/, depths/<stem>.npy (float32 z-depth,
    0 = invalid), intrinsics.npy (N,3,3) and cam_from_worlds.npy (N,3,4, OpenCV axes); a dataset is a
    folder of scenes.
    """


@data.command("synth")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset folder to write (scenes go to OUT/scene_0000, ...).")
@click.option("--scenes", "num_scenes", type=click.IntRange(min=1), default=4, show_default=True,
              help="Number of scenes.")
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=24, show_default=True,
              help="Frames per scene (a smooth ~0.5 rad camera orbit).")
@click.option("--size", type=click.IntRange(min=8), default=224, show_default=True,
              help="Image side in pixels (square images).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Dataset seed; scene i is seeded by (seed, i), so the same seed gives the same bytes.")
@click.option("--camouflage-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Fraction of scenes where a box wears the back wall's repetitive texture "
                   "(only depth tells them apart).")
@click.option("--overwrite", is_flag=True, help="Replace scenes that already exist in OUT.")
def synth(out: Path, num_scenes: int, num_frames: int, size: int, seed: int, camouflage_fraction: float,
          overwrite: bool) -> None:
    """Render a synthetic dataset of textured rooms with exact depth, cameras and object ids.

    Deterministic CPU ray casting (~0.4 s CPU per 8 views at 224x224 on one core). Textures are
    scikit-image's bundled photographs and repetitive textures (no download).
    """
    from gasp_vlm.data.scene import SceneError
    from gasp_vlm.data.synth import synth_dataset

    try:
        synth_dataset(out, num_scenes, num_frames, size, seed, camouflage_fraction=camouflage_fraction,
                      progress=True, overwrite=overwrite)
    except (SceneError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None


@data.command("check")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--max-rows", type=click.IntRange(min=0), default=50, show_default=True,
              help="Most ok scenes listed in the table (broken ones are always listed).")
def check(dataset: Path, max_rows: int) -> None:
    """Validate DATASET (a folder of scenes, or one scene, or a sequence manifest) and print a summary.

    Lists scenes, frames, resolution and the valid-depth fraction; every broken scene gets messages
    naming scene, file and problem, and the command exits with status 1. For a manifest folder: every
    scene it names exists and holds every frame its rows use.
    """
    from gasp_vlm.data.scene import SceneError
    from gasp_vlm.data.scene_check import check_dataset, format_summary

    if (dataset / "manifest.json").is_file():
        from gasp_vlm.data.manifest import check_manifest

        try:
            summary, problems = check_manifest(dataset)
        except SceneError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"manifest {summary['id']}: {summary['rows']} sequences over {summary['scenes']} scenes in "
                   f"{summary['shards']} shards")
        for p in problems:
            click.echo(f"  {p}", err=True)
        if problems:
            raise click.ClickException(f"{dataset}: {len(problems)} problem(s) (above)")
        return
    try:
        summaries = check_dataset(dataset)
    except SceneError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_summary(summaries, max_rows=max_rows))
    broken = [s.name for s in summaries if not s.ok]
    if broken:
        raise click.ClickException(f"{len(broken)} of {len(summaries)} scenes are broken: "
                                   f"{', '.join(broken[:10])}{' ...' if len(broken) > 10 else ''}")


def _parse_frames(text: str, num_frames: int) -> list[int]:
    """'1,2,5-8' -> [1, 2, 5, 6, 7, 8]; 'all' -> every frame; negative ids count from the end."""
    if text.strip() == "all":
        return list(range(num_frames))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a frame index or range (e.g. 1,2,5-8)",
                                     param_hint="--targets") from None
    if not out:
        raise click.BadParameter(f"{text!r} names no frames", param_hint="--targets")
    bad = [i for i in out if not -num_frames <= i < num_frames]
    if bad:
        raise click.BadParameter(f"frame {bad[0]} out of range: the scene has {num_frames} frames",
                                 param_hint="--targets")
    return [i % num_frames for i in out]


@data.command("tracks")
@click.argument("scene", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--anchor", type=int, required=True, help="Anchor frame index (queries live on its grid).")
@click.option("--targets", required=True, help="Target frame indices: '1,2,3', ranges '4-9', or 'all'.")
@click.option("--stride", type=click.FloatRange(min=0.0, min_open=True), default=14.0, show_default=True,
              help="Query grid stride in pixels: centres at ((i+0.5)*stride, (j+0.5)*stride).")
@click.option("--rel-tol", type=click.FloatRange(min=0.0), default=0.05, show_default=True,
              help="Visibility depth test |z - d| <= rel_tol * d.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .npz (query_uv, frames, uv, visible, depth).")
def tracks(scene: Path, anchor: int, targets: str, stride: float, rel_tol: float, out: Path) -> None:
    """Ground-truth correspondences of an anchor grid of SCENE into target frames (from depth + cameras).

    A query is visible in a frame iff it projects in front of the camera, inside the image, and one of
    the 4 pixels around it has valid depth within rel_tol of the projected z.
    """
    import numpy as np

    from gasp_vlm.data.scene import SceneError, load_scene
    from gasp_vlm.geometry.tracks import scene_tracks

    try:
        sc = load_scene(scene)
        if not -sc.num_frames <= anchor < sc.num_frames:
            raise click.BadParameter(f"{anchor} out of range: the scene has {sc.num_frames} frames",
                                     param_hint="--anchor")
        anchor %= sc.num_frames
        frames = _parse_frames(targets, sc.num_frames)
        t0 = time.perf_counter()
        result = scene_tracks(sc, anchor, frames, stride, rel_tol=rel_tol)
        dt = time.perf_counter() - t0
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save_npz(out)
        written = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")  # np.savez appends it
    except (SceneError, IndexError) as e:
        raise click.ClickException(str(e)) from None
    vis = np.asarray(result.visible)
    per = ", ".join(f"{f}:{100 * v:.0f}%" for f, v in zip(frames[:12], vis.mean(axis=1) if vis.size else []))
    click.echo(f"{vis.shape[1]} queries (stride {stride:g} px, anchor {anchor}) into {len(frames)} frames "
               f"in {dt * 1e3:.1f} ms; visible {100 * vis.mean() if vis.size else 0:.1f}% "
               f"[{per}{' ...' if len(frames) > 12 else ''}] -> {written}")


@data.command("convert")
@click.argument("dataset", type=click.Choice(CONVERTER_NAMES))
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output: the scene folder when SRC is one scene, else the dataset folder (OUT/<scene>/).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Scenes converted in parallel (processes).")
@click.option("--shard", default="0/1", show_default=True,
              help="i/n: convert only every n-th scene starting at i (sorted by name), for cluster array jobs.")
@click.option("--overwrite", is_flag=True, help="Re-convert scenes already present (default: skip them).")
@click.option("--depth", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="[dl3dv, scannet, scannetpp, co3d] Depth folder supplied by the user (one file per image: "
                   "npy, 16-bit png or COLMAP .geometric.bin); co3d: root of the depth files.")
@click.option("--depth-source", type=click.Choice(["auto", "dense", "user", "sparse"]), default=None,
              help="[dl3dv] COLMAP dense depth, user depth, or depth at sparse SfM points (auto: first available).")
@click.option("--colmap", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="[dl3dv] COLMAP sparse model folder (default: colmap/sparse/0, sparse/0 in the scene).")
@click.option("--dense", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="[dl3dv] COLMAP dense workspace (images/, sparse/, stereo/depth_maps/).")
@click.option("--depth-scale", type=float, default=None,
              help="16-bit png depth value per metre (default 1000: millimetres).")
@click.option("--images-dir", default=None, help="[dl3dv] Image folder inside the scene (default: images_4, ...).")
@click.option("--allow-distortion", is_flag=True, default=None,
              help="[dl3dv transforms.json, scannetpp iphone] Ignore lens distortion instead of refusing it.")
@click.option("--distortion-tol", type=float, default=None, help="Largest |coefficient| treated as no distortion.")
@click.option("--depth-format", default=None,
              help="How depth is stored: float32 (default, exact), float16 (half the bytes) or png16[:SCALE] "
                   "(16-bit PNG of depth x SCALE, default 1000 = mm for metres).")
@click.option("--frame-step", type=click.IntRange(min=1), default=None, help="Keep every k-th frame.")
@click.option("--max-frames", type=click.IntRange(min=1), default=None, help="At most this many frames per scene.")
@click.option("--intrinsics", type=click.Choice(["depth", "color"]), default=None,
              help="[scannet] Which intrinsic file to use (default depth).")
@click.option("--sequences", default=None, help="[co3d] Comma-separated sequence names to convert.")
@click.option("--no-depth-masks", "use_depth_masks", flag_value=False, default=None,
              help="[co3d] Keep depth outside the MVS depth masks.")
@click.option("--stream", type=click.Choice(["iphone", "dslr"]), default=None, help="[scannetpp] Which camera.")
@click.option("--min-confidence", type=click.IntRange(0, 2), default=None,
              help="[arkitscenes] Drop depth below this ARKit confidence (default 1).")
@click.option("--pose-time-tol", type=float, default=None,
              help="[arkitscenes] Largest frame-to-pose time gap in seconds (default 0.1).")
@click.option("--sfm-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="[megadepth] The MegaDepth_v1_SfM folder (default: next to MegaDepth_v1).")
@click.option("--images", "hypersim_images", type=click.Choice(["tonemap", "hdf5"]), default=None,
              help="[hypersim] Tone-mapped jpg previews or HDR hdf5 (tone-mapped here).")
@click.option("--fov-deg", type=float, default=None, help="[hypersim] Horizontal field of view (default 60).")
@click.option("--camera-params", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="[hypersim] metadata_camera_parameters.csv: per-scene projection instead of --fov-deg.")
def convert(dataset: str, src: Path, out: Path, workers: int, shard: str, overwrite: bool,
            hypersim_images: str | None, sequences: str | None, **opts) -> None:
    """Convert a real dataset at SRC to the canonical format.

    \b
    DATASET is one of: dl3dv, co3d, scannet, scannetpp, arkitscenes, megadepth, hypersim, blendedmvs,
    wildrgbd. SRC is one scene or a root of many (each converter's docstring in
    gasp_vlm/data/convert/ gives its real layout). Scenes already converted are skipped, failures are
    reported per scene at the end (OUT/convert_report.json) without stopping the others; exit status 1
    if any scene failed. Options marked [name] apply to that dataset only.
    """
    from gasp_vlm.data.convert import DATASETS, convert_dataset, parse_shard
    from gasp_vlm.data.scene import SceneError
    from gasp_vlm.io import write_json_atomic

    opts = {k: v for k, v in opts.items() if v is not None}
    if hypersim_images is not None:
        opts["images"] = hypersim_images
    if sequences is not None:
        opts["sequences"] = [s for s in sequences.split(",") if s]
    try:
        i, n = parse_shard(shard)
        report = convert_dataset(DATASETS[dataset], src, out, workers=workers, shard=(i, n), overwrite=overwrite,
                                 **opts)
    except SceneError as e:
        raise click.ClickException(f"{dataset} conversion failed: {e}") from None
    name = "convert_report.json" if n == 1 else f"convert_report.shard-{i}-of-{n}.json"
    # SRC was one scene -> OUT is that scene; keep the report beside it, not inside the scene format.
    report_path = out.parent / f"{out.name}.{name}" if report.single_scene else out / name
    write_json_atomic(report_path, report.to_json())
    click.echo(f"{dataset}: {len(report.converted)} converted, {len(report.skipped)} already done, "
               f"{len(report.failed)} failed in {report.seconds:.1f} s -> {out} (report: {report_path})")
    for scene, err in report.failed.items():
        click.echo(f"  FAILED {scene}: {err}", err=True)
    if report.failed:
        raise SystemExit(1)


def _name_values(text: str | None, cast, what: str) -> dict | None:
    """'a=1,b=2' -> {'a': cast('1'), ...}."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, sep, val = part.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = cast(val)
        except ValueError:
            raise click.BadParameter(f"{part!r}: expected name=value (e.g. dl3dv=2,co3d=1)", param_hint=what) from None
    return out


@data.command("manifest")
@click.argument("sources", nargs=-1, required=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Manifest folder to write (manifest.json + shard-*.parquet).")
@click.option("--sequences", type=click.IntRange(min=1), default=None,
              help="Sequences in total, split over the sources by --weights (default: one per anchor frame).")
@click.option("--frames", default="8-24", show_default=True,
              help="Further frames besides the anchor, MIN-MAX (the paper: 8-24).")
@click.option("--radius", type=click.IntRange(min=1), default=48, show_default=True,
              help="Other frames come from |i - anchor| <= radius.")
@click.option("--weights", default=None,
              help="Per-source share of --sequences, name=w,... (default: by frame count).")
@click.option("--lengths", default=None, help="Fixed sequences per source, name=n,... (VGGT's len_train).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--shard-rows", type=click.IntRange(min=1), default=16_384, show_default=True,
              help="Rows per parquet shard (a rank reads only the shards it owns).")
@click.option("--overwrite", is_flag=True, help="Replace an existing manifest at OUT.")
def manifest(sources: tuple[str, ...], out: Path, sequences: int | None, frames: str, radius: int,
             weights: str | None, lengths: str | None, seed: int, shard_rows: int, overwrite: bool) -> None:
    """Write a deterministic, sharded list of training sequences over dataset folders.

    \b
    SOURCES: dataset folders of canonical scenes, each NAME=DIR or DIR (named after the folder).
    Train on it with `--set data.manifest=OUT`; the run records the manifest's id and refuses to
    resume on a changed one.
    """
    from gasp_vlm.data.manifest import ManifestSpec, build_manifest, scan_source
    from gasp_vlm.data.scene import SceneError

    named: dict[str, Path] = {}
    for s in sources:
        name, sep, path = s.partition("=")
        p = Path(path if sep else s).expanduser()
        name = name if sep else p.name
        if not p.is_dir():
            raise click.BadParameter(f"{p}: no such folder", param_hint="SOURCES")
        if name in named:
            raise click.BadParameter(f"two sources named {name!r}; use NAME=DIR", param_hint="SOURCES")
        named[name] = p
    try:
        lo, hi = (int(x) for x in frames.split("-"))
    except ValueError:
        raise click.BadParameter(f"{frames!r}: expected MIN-MAX, e.g. 8-24", param_hint="--frames") from None
    w = _name_values(weights, float, "--weights")
    ln = _name_values(lengths, int, "--lengths")
    t0 = time.perf_counter()
    try:
        if sequences is None and not ln:  # one sequence per anchor frame of every source
            sequences = sum(c for p in named.values() for _, c in scan_source(p))
        spec = ManifestSpec(sequences=sequences or 0, frames_min=lo, frames_max=hi, radius=radius, seed=seed,
                            shard_rows=shard_rows, weights=w, lengths=ln)
        path = build_manifest(named, out, spec, overwrite=overwrite)
    except SceneError as e:
        raise click.ClickException(str(e)) from None
    import json

    meta = json.loads((path / "manifest.json").read_text())
    per = ", ".join(f"{s['name']} {s['rows']}" for s in meta["sources"])
    click.echo(f"{meta['rows']} sequences ({per}) in {len(meta['shards'])} shards, id {meta['id']}, "
               f"{time.perf_counter() - t0:.1f} s -> {path}")
