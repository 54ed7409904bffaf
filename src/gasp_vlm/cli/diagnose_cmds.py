"""`gasp diagnose`: layer-wise correspondence diagnostic of a VLM's own features (issue 5).

Thin wrapper over gasp_vlm.diagnose.run; heavy imports stay inside the command.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import click

from gasp_vlm.cli import main

MODES_HELP = "comma list of qk, qk-rope, hidden, head"


def parse_layers(spec: str | None) -> list[int] | None:
    """'all' / None -> None; '0,2,5' / '4-7' / '-1' (from the end) -> list of ints."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        rng = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
        if rng and int(rng.group(1)) <= int(rng.group(2)):
            out.extend(range(int(rng.group(1)), int(rng.group(2)) + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.append(int(part))
        else:
            raise click.BadParameter(f"{spec!r}: expected 'all', 'L1,L2,...' or 'A-B' (layer indices)",
                                     param_hint="--layers")
    return out


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _is_checkpoint(path: Path) -> bool:
    return (path / "gasp_checkpoint.json").is_file() or (path / "latest").is_file()


def load_trained(ckpt: Path, device: str, dtype: str | None) -> tuple[Any, Any, dict]:
    """A gasp training checkpoint -> (adapter, heads or None, meta) via train.checkpoint.load_checkpoint."""
    from gasp_vlm.train.checkpoint import load_checkpoint

    return load_checkpoint(ckpt, device=device, dtype=dtype)


def make_source(data: str, *, n_needed: int, seed: int, toy_size: int, clip: str = "forward",
                gap_stride: int = 3) -> Any:
    """--data DIR (canonical scene folders) or 'toy' (built-in exact-GT sequences). ``clip`` "forward":
    the paper's protocol (anchor = the clip's first frame, the others ``gap_stride`` frames apart after
    it); "window": frames drawn around the anchor as in training (the anchor mid-clip)."""
    if data == "toy":
        from gasp_vlm.diagnose.run import OrthoToySource

        return OrthoToySource(max(n_needed, 1), frame_hw=(toy_size, toy_size), seed=seed)
    root = Path(data).expanduser()
    if not root.exists():
        raise click.ClickException(f"--data {data}: no such folder (give a folder of canonical scenes, see "
                                   "`gasp data --help`, or 'toy' for the built-in synthetic sequences)")
    if not root.is_dir():
        raise click.ClickException(f"--data {data}: not a folder")
    from gasp_vlm.data.scene import is_scene_dir, list_scene_dirs

    scenes = [p for p in list_scene_dirs(root) if is_scene_dir(p)]
    if not scenes:
        raise click.ClickException(f"--data {data}: no scene folders (with scene.json) in it; "
                                   "create some with `gasp data synth` or `gasp data convert`")
    from gasp_vlm.data.sequences import GeometrySequenceSource

    return GeometrySequenceSource(root, frames_window=48, grid="coarse", seed=seed,
                                  forward_stride=gap_stride if clip == "forward" else None)


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that is (or lies under) an existing file, before any work is done."""
    for p in (out_dir, *out_dir.parents):
        if p.exists():
            if not p.is_dir():
                where = "is an existing file" if p == out_dir else f"lies under {p}, an existing file"
                raise click.ClickException(f"--out {out_dir}: {where}, not a folder; give a new or existing "
                                           "folder for the output")
            return


def check_distinct_frames(source: Any, indices: list[int], frames: int) -> None:
    """Refuse a --frames some requested sequence cannot fill with distinct frames.

    Scene sources (``distinct_frames(index)``) fall back to sampling with replacement when the window
    around an anchor is short (right for training); a diagnostic would then score repeated frames. The
    toy source renders every frame it is asked for, so it has no such limit.
    """
    if not hasattr(source, "distinct_frames") or not indices:
        return
    counts = [int(source.distinct_frames(i)) for i in indices]
    limit = min(counts)
    if frames <= limit:
        return
    worst = indices[counts.index(limit)]
    k, anchor = source.locate(worst)
    name = source.scenes[k].name
    short = sum(c < frames for c in counts)
    which = (f" ({short} of the {len(indices)} requested sequences fall short)" if len(indices) > 1 else "")
    plural = "s" if limit != 1 else ""
    if getattr(source, "forward_stride", None):  # forward clips: the scene's length bounds the clip
        head = f"--frames {frames}: scene {name} has only {limit} frame{plural}{which}"
    else:
        head = (f"--frames {frames}: scene {name} gives at most {limit} distinct frame{plural} "
                f"around anchor {anchor} (window \u00b1{source.radius}){which}")
    if limit < 2:
        raise click.ClickException(f"{head}; a diagnosis needs an anchor and a target: choose other sequences "
                                   "(--start/--stride) or drop that scene from --data")
    raise click.ClickException(f"{head}; use --frames <= {limit}")


@contextlib.contextmanager
def _clean_errors():
    """User-facing problems -> one-line CLI errors."""
    from gasp_vlm.data.scene import SceneError
    from gasp_vlm.diagnose.run import DiagnoseError
    from gasp_vlm.models import ModelLoadError

    try:
        yield
    except (DiagnoseError, ModelLoadError, SceneError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command("diagnose")
@click.argument("reports", nargs=-1, type=click.Path(path_type=Path))
@click.option("--model", "-m", default=None,
              help="Preset (tiny-qwen2.5-vl, ...), a local HF model folder, or a gasp training checkpoint.")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="A gasp training checkpoint (or its run folder with 'latest'): trained weights + heads.")
@click.option("--data", "-d", default=None, help="Folder of canonical scenes, or 'toy' (built-in, exact GT).")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--modes", "--mode", "modes", default="qk", show_default=True, help=MODES_HELP)
@click.option("--frames", type=int, default=8, show_default=True,
              help="Frames per sequence, the anchor included (scene folders: at most the distinct frames of "
                   "the window around each anchor).")
@click.option("--sequences", "--max-sequences", "-n", "sequences", type=int, default=200, show_default=True,
              help="Number of held-out sequences.")
@click.option("--start", type=int, default=0, show_default=True, help="First sequence index (held-out split).")
@click.option("--stride", type=int, default=1, show_default=True,
              help="Index step between sequences (scene folders give one index per anchor frame: a stride of "
                   "about the frames per scene spreads the sequences over scenes).")
@click.option("--layers", default=None, help="all (default) | 0,3,7 | 4-7 | -1 (from the end).")
@click.option("--clip", type=click.Choice(["forward", "window"]), default="forward", show_default=True,
              help="forward: the paper's clips, the anchor first and the targets at growing gaps after it; "
                   "window: frames drawn around the anchor as in training (anchor mid-clip).")
@click.option("--gap-stride", type=click.IntRange(1), default=3, show_default=True,
              help="forward clips: frames between successive clip frames (targets at gaps s, 2s, ...; a scene too "
                   "short for that uses the largest step that fits).")
@click.option("--reverse/--no-reverse", default=True, show_default=True,
              help="Also score frame-t queries against frame-1 keys: the direction a causal LM attends.")
@click.option("--frame-mode", default=None, help="Model frame mode (Qwen: video_dup | images | pair).")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if visible, else cpu) | cpu | cuda[:i]")
@click.option("--seed", type=int, default=0, show_default=True, help="Sequence sampling seed (and preset init seed).")
@click.option("--prompt", default="Describe the scene.", show_default=True, help="User text after the frames.")
@click.option("--pictures", type=int, default=2, show_default=True, help="Correspondence pictures to draw.")
@click.option("--toy-size", type=int, default=224, show_default=True, help="Frame size of --data toy.")
@click.option("--no-resume", is_flag=True, help="Recompute every sequence (default: skip those already in --out).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--compare", is_flag=True, help="Compare REPORTS (report.json files) instead of running a model.")
@click.option("--labels", default=None, help="Comma-separated names of the compared reports.")
def diagnose(reports, model, checkpoint, data, out_dir, modes, frames, sequences, start, stride, layers, clip,
             gap_stride, reverse,
             frame_mode, batch_size, dtype, device, seed, prompt, pictures, toy_size, no_resume, no_progress, compare,
             labels) -> None:
    """Layer-wise correspondence PCK of a VLM's internal features (paper §5.3).

    \b
    Run:     gasp diagnose --model tiny-qwen2.5-vl --data toy --out runs/diag --modes qk,hidden --reverse
    Trained: gasp diagnose --checkpoint runs/train --data data/synth --out runs/diag-gasp --modes qk,head
    Compare: gasp diagnose --compare runs/diag/report.json runs/diag-gasp/report.json --out runs/cmp
    """
    check_out_dir(out_dir)
    if compare or reports:
        if not compare:
            raise click.UsageError(f"unexpected arguments {[str(r) for r in reports]} (use --compare A B ...)")
        if len(reports) < 2:
            raise click.UsageError("--compare needs at least two report.json files")
        missing = [str(r) for r in reports if not Path(r).is_file()]
        if missing:
            raise click.ClickException(f"no such report file: {', '.join(missing)}")
        from gasp_vlm.diagnose.plots import compare_reports

        names = [s.strip() for s in labels.split(",")] if labels else None
        if names is not None and len(names) != len(reports):
            raise click.UsageError(f"--labels gives {len(names)} names for {len(reports)} reports")
        try:
            paths = compare_reports(list(reports), out_dir, labels=names)
        except (KeyError, json.JSONDecodeError) as e:
            raise click.ClickException(f"not a diagnose report.json ({type(e).__name__}: {e})") from None
        click.echo(Path(paths["md"]).read_text())
        click.echo(f"wrote {paths['md']} and {paths['png']}")
        return

    if model is None and checkpoint is None:
        raise click.UsageError("give --model NAME_OR_PATH (or --checkpoint CKPT), or --compare REPORTS")
    if data is None:
        raise click.UsageError("give --data DIR (canonical scenes) or --data toy")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    from gasp_vlm.diagnose.run import MODES

    bad = [m for m in mode_list if m not in MODES]
    if bad or not mode_list:
        raise click.BadParameter(f"{modes!r}: choose from {', '.join(MODES)}", param_hint="--modes")
    if frames < 2:
        raise click.BadParameter("need at least 2 frames (an anchor and a target)", param_hint="--frames")
    if sequences < 1 or start < 0 or stride < 1:
        raise click.BadParameter("--sequences and --stride must be >= 1 and --start >= 0")
    layer_list = parse_layers(layers)
    ckpt = checkpoint
    model_path = Path(model).expanduser() if model is not None else None
    if ckpt is None and model_path is not None and model_path.is_dir() and _is_checkpoint(model_path):
        ckpt = model_path  # --model pointing at a training checkpoint
    if "head" in mode_list and ckpt is None:
        raise click.UsageError("mode 'head' needs a trained checkpoint with correspondence heads (--checkpoint)")

    # Validate the data before paying for model loading.
    with _clean_errors():
        source = make_source(data, n_needed=start + sequences * stride, seed=seed, toy_size=toy_size, clip=clip,
                             gap_stride=gap_stride)
    indices = list(range(start, start + sequences * stride, stride))
    n_avail = len(source)
    if start >= n_avail:
        raise click.ClickException(f"--start {start}: the data has only {n_avail} sequences")
    if indices[-1] >= n_avail:
        indices = [i for i in indices if i < n_avail]
        click.echo(f"note: the data has {n_avail} sequences; diagnosing {len(indices)} "
                   f"(indices {start}..{indices[-1]} step {stride})", err=True)
    check_distinct_frames(source, indices, frames)

    import torch

    from gasp_vlm.diagnose.run import run_diagnosis
    from gasp_vlm.models import load_adapter

    from gasp_vlm.models.runtime import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    with _clean_errors():
        heads = None
        if ckpt is not None:
            adapter, heads, meta = load_trained(ckpt, device, dtype)
            label = str(ckpt)
            if model is not None and Path(str(model)).expanduser() != ckpt:
                click.echo(f"note: --model {model} is ignored; the checkpoint names its own base model", err=True)
        else:
            adapter = load_adapter(model, dtype=dtype, device=device, seed=seed)
            label = str(model)
        if "head" in mode_list and heads is None:
            raise click.ClickException(f"{ckpt}: this checkpoint has no correspondence heads (an LM-only run); "
                                       "drop 'head' from --modes")
        torch.manual_seed(seed)
        report = run_diagnosis(adapter, source, indices, modes=mode_list, layers=layer_list,
                               num_frames=frames, heads=heads, reverse=reverse, out_dir=out_dir,
                               progress=not no_progress, resume=not no_resume, batch_size=batch_size,
                               model_name=label, frame_mode=frame_mode, prompt=prompt, pictures=pictures)
    pk, zm = report["peak"], report["zero_motion"]
    click.echo(f"{label} [{report['mode']}] {report['num_sequences']} sequences: peak layer {pk['layer']} "
               f"PCK@0 {_f(pk['pck']['0'])} PCK@1 {_f(pk['pck']['1'])} PCK@2 {_f(pk['pck']['2'])} "
               f"(zero-motion PCK@1 {_f(zm['pck']['1'])})")
    for m, rel in report.get("modes", {}).items():
        if m != report["mode"]:
            r = json.loads((Path(out_dir) / rel).read_text())
            click.echo(f"  [{m}] peak layer {r['peak']['layer']} PCK@1 {_f(r['peak']['pck']['1'])}")
    click.echo(f"wrote {Path(out_dir) / 'report.json'}, report.md, points.npz and plots")
