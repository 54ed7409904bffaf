"""`gasp bench train-step`: step time (and GPU peak memory) of a GASP step vs the LM-only step.

Same random-initialised model, same batches; prints JSON. Targets from the issue: CPU, hidden >= 1024,
8 frames -> ratio <= 1.15; GPU, 7B-shaped Qwen2.5-VL, 16 frames -> time ratio <= 1.05, memory <= 1.10.
"""

from __future__ import annotations

import json
import os

import click

from gasp_vlm.cli import main

# Qwen2.5-VL-7B shapes (config.json of Qwen/Qwen2.5-VL-7B-Instruct); the layer count is overridable.
QWEN2_5_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                          vocab_size=152064, max_position_embeddings=128000)
QWEN2_5_VL_7B_VISION = {"vision.depth": 32, "vision.hidden_size": 1280, "vision.intermediate_size": 3420,
                        "vision.num_heads": 16, "vision.window_size": 112, "vision.fullatt_block_indexes": [7, 15, 23, 31]}


@main.group("bench")
def bench() -> None:
    """Performance benchmarks."""


@bench.command("train-step")
@click.option("--model", "model_kind", type=click.Choice(["tiny", "qwen2.5-vl-7b"]), default="tiny", show_default=True,
              help="tiny: tiny-qwen2.5-vl resized by --hidden/--layers; qwen2.5-vl-7b: 7B shapes (random init).")
@click.option("--hidden", type=int, default=1024, show_default=True, help="LLM hidden size (tiny model).")
@click.option("--layers", type=int, default=4, show_default=True, help="Decoder layers (both models).")
@click.option("--vision-depth", type=int, default=None, help="Vision blocks (7B model: default 32).")
@click.option("--frames", type=int, default=8, show_default=True)
@click.option("--frame-size", type=int, default=224, show_default=True, help="Square frame side in pixels (28 px per token).")
@click.option("--lora-r", type=int, default=64, show_default=True, help="LoRA rank (0 = full fine-tuning).")
@click.option("--head-hidden", type=int, default=1024, show_default=True)
@click.option("--head-out", type=int, default=256, show_default=True)
@click.option("--max-anchors", type=int, default=None, help="Anchors per sample (default: all).")
@click.option("--steps", type=int, default=10, show_default=True, help="Timed steps per variant (interleaved on CPU).")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True)
@click.option("--no-checkpointing", is_flag=True, help="Disable activation checkpointing.")
def train_step(model_kind, hidden, layers, vision_depth, frames, frame_size, lora_r, head_hidden, head_out,
               max_anchors, steps, warmup, device, threads, precision, no_checkpointing) -> None:
    """Median step time of LM-only vs GASP (same model, same batches) and their ratio, as JSON."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch

    if threads:
        torch.set_num_threads(threads)
    from gasp_vlm.train.bench_step import benchmark_train_step

    cfg = build_bench_config(model_kind, hidden, layers, vision_depth, frames, frame_size, lora_r, head_hidden,
                             head_out, max_anchors, precision, not no_checkpointing, steps + warmup)
    res = benchmark_train_step(cfg, steps=steps, warmup=warmup)
    res["model"] = model_kind
    res["lora_r"] = lora_r
    click.echo(json.dumps(res, indent=2))


def build_bench_config(model_kind: str, hidden: int, layers: int, vision_depth: int | None, frames: int,
                       frame_size: int, lora_r: int, head_hidden: int, head_out: int, max_anchors: int | None,
                       precision: str, checkpointing: bool, max_steps: int):
    """The GASP TrainConfig the benchmark times (the LM-only control is derived from it)."""
    import torch

    from gasp_vlm.train.config import config_from_dict

    if model_kind == "tiny":
        heads = max(1, hidden // 64)
        overrides = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
        if vision_depth:
            overrides["vision.depth"] = vision_depth
        dtype = "float32"
    else:
        overrides = {**QWEN2_5_VL_7B_TEXT, "num_hidden_layers": layers, **QWEN2_5_VL_7B_VISION}
        if vision_depth:
            overrides["vision.depth"] = vision_depth
            overrides["vision.fullatt_block_indexes"] = [i for i in (7, 15, 23, 31) if i < vision_depth] or [vision_depth - 1]
        on_gpu = torch.cuda.is_available() and not os.environ.get("ACCELERATE_USE_CPU")
        dtype = "bfloat16" if on_gpu else "float32"
    side = frame_size // 28 * 28
    return config_from_dict({
        "model": {"name": "tiny-qwen2.5-vl", "dtype": dtype, "overrides": overrides, "max_pixels": side * side},
        "lora": {"enabled": lora_r > 0, "r": max(lora_r, 1), "alpha": 2 * max(lora_r, 1)},
        "gasp": {"d_hidden": head_hidden, "d_out": head_out, "max_anchors": max_anchors, "calib_tokens": 0},
        "optim": {"max_steps": max_steps + 1},
        "data": {"geometry": ["toy"], "frames_min": frames, "frames_max": frames, "frame_hw": [side, side]},
        "precision": precision, "activation_checkpointing": checkpointing, "report_to": [],
    })


@bench.command("instructions")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Mixture YAML (or one LLaVA-Video JSON).")
@click.option("--model", default=None, help="Also encode each sample for this model (preset, HF dir or hub id).")
@click.option("--samples", type=int, default=8, show_default=True, help="Samples, in the stream's order.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="data.* settings, e.g. --set data.instruction_frames=32 --set data.video_seek=keyframe.")
def instructions_cmd(data, model, samples, overrides) -> None:
    """Per-sample decode time, CPU time and peak RSS over the loader's baseline, as JSON."""
    from gasp_vlm.train.config import ConfigError, config_from_dict
    from gasp_vlm.train.bench_instructions import benchmark_instructions
    from gasp_vlm.train.instructions import InstructionFormatError

    bad = [o for o in overrides if not o.startswith("data.")]
    if bad:
        raise click.UsageError(f"--set {bad[0]}: only data.* keys apply here")
    try:
        cfg = config_from_dict({"data": {"geometry": ["toy"]}}, list(overrides)).data
        res = benchmark_instructions(cfg, data, model=model, samples=samples)
    except (ConfigError, InstructionFormatError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(res, indent=2))


@bench.command("eval")
@click.option("--model", default="tiny-qwen2.5-vl", show_default=True, help="Preset, HF dir or hub id.")
@click.option("--benchmark", "benchmark", default="vsibench", show_default=True)
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Benchmark folder (default: the generated fixture with realistic video lengths).")
@click.option("--limit", type=int, default=None, help="First N questions.")
@click.option("--frames", type=int, default=8, show_default=True, help="Video frames per question.")
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--max-new-tokens", type=int, default=4, show_default=True)
@click.option("--video-frames", type=int, default=300, show_default=True, help="Fixture clip length (frames).")
@click.option("--video-size", default="640x360", show_default=True, help="Fixture clip size WxH.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
def eval_cmd(model, benchmark, data, limit, frames, batch_size, max_new_tokens, video_frames, video_size, device,
             dtype) -> None:
    """Questions/s and media preparation time per question, per-video decode cache off vs on, as JSON."""
    from gasp_vlm.bench.speed import benchmark_eval

    try:
        w, h = (int(x) for x in video_size.lower().split("x"))
    except ValueError:
        raise click.UsageError(f"--video-size {video_size!r}: expected WxH, e.g. 640x360") from None
    try:
        res = benchmark_eval(model, benchmark, data=data, limit=limit, frames=frames, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, video_frames=video_frames, video_size=(w, h),
                             dtype=dtype, device=device)
    except (KeyError, ValueError, RuntimeError, FileNotFoundError) as e:
        raise click.ClickException(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)) from None
    click.echo(json.dumps(res, indent=2))


@bench.command("loader")
@click.option("--data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Dataset folder of canonical scenes (default: a generated one).")
@click.option("--manifest", type=click.Path(exists=True, file_okay=False), default=None,
              help="A sequence manifest (`gasp data manifest`) instead of --data.")
@click.option("--model", default="tiny-qwen2.5-vl", show_default=True,
              help="Preset, HF dir or hub id: its processor decides the tokens (the tiny preset = Qwen2.5-VL-7B's).")
@click.option("--frames", type=int, default=16, show_default=True, help="Frames per sample.")
@click.option("--workers", type=int, default=1, show_default=True, help="DataLoader worker processes.")
@click.option("--samples", type=int, default=12, show_default=True, help="Samples timed (per measurement).")
@click.option("--frame-size", type=int, default=448, show_default=True, help="Generated frames' side.")
@click.option("--depth-format", default="float32", show_default=True, help="Generated scenes' depth storage.")
@click.option("--max-pixels", type=int, default=None, help="Processor max_pixels (default: frame-size^2 for presets).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per process.")
def loader_cmd(data, manifest, model, frames, workers, samples, frame_size, depth_format, max_pixels, threads) -> None:
    """Geometry samples/s and per-sample ms split (read, pixels, targets), bytes read, as JSON."""
    from gasp_vlm.data.scene import SceneError
    from gasp_vlm.train.bench_loader import run_loader_benchmark

    if data and manifest:
        raise click.UsageError("give --data or --manifest, not both")
    try:
        res = run_loader_benchmark(data, manifest, model, frames, workers, samples, frame_size, depth_format,
                                   max_pixels, threads)
    except SceneError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(res, indent=2))
