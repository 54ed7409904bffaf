"""`gasp score` and `gasp eval`: spatial benchmarks (VSI-Bench, All-Angles Bench, BLINK, MMSI-Bench).

Thin wrappers over gasp_vlm.bench; heavy imports stay inside the commands.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from gasp_vlm.cli import main

BENCH_HELP = "vsibench | all_angles | blink | mmsi | videomme | videomme_w_subtitle | mvbench"


@contextlib.contextmanager
def _clean_errors():
    """Turn data/predictions/media problems into one-line CLI errors (they already name file and line)."""
    from gasp_vlm.bench.media import MediaError
    from gasp_vlm.bench.records import PredictionsFileError
    from gasp_vlm.bench.tables import BenchmarkDataError

    try:
        yield
    except (BenchmarkDataError, PredictionsFileError, MediaError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except KeyError as e:  # unknown benchmark name
        raise click.ClickException(str(e.args[0]) if e.args else repr(e)) from None


def _summary(results: dict) -> str:
    lines = [f"{results['benchmark']} [{results['profile']}] overall {results['overall']:.2f}"
             f"  (n={results['num_samples']}, missing={results['num_missing']}, "
             f"judge_unavailable={results.get('judge_unavailable', 0)})"]
    if "multi_view_reasoning" in results:
        lines.append(f"  Multi-view_Reasoning {results['multi_view_reasoning']:.2f}")
    judged = results.get("judge_unavailable_by_category") or {}
    for k, v in results["categories"].items():
        lines.append(f"  {k:<45} {v:6.2f}" + (f"  (judge unavailable: {judged[k]})" if judged.get(k) else ""))
    return "\n".join(lines)


def _warn_duplicates(results: dict, predictions: Path) -> None:
    """Identical repeated lines are scored once; say so, since they usually mean a log was appended twice."""
    n = results.get("duplicate_ids", 0)
    if n:
        click.echo(f"warning: {predictions}: {n} sample_id(s) repeated with identical raw_output "
                   f"({results.get('duplicate_lines', 0)} extra line(s) ignored)", err=True)


@main.command("score")
@click.option("--benchmark", "-b", required=True, help=BENCH_HELP)
@click.option("--data", "data_root", required=True, type=click.Path(path_type=Path),
              help="Local copy of the benchmark (its root folder, or its question file).")
@click.option("--predictions", "-p", required=True, type=click.Path(path_type=Path),
              help='JSONL with lines {"sample_id": ..., "raw_output": ...}; a sample_id may repeat only with '
                   'the same raw_output (scored once).')
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Writes OUT/results.json.")
@click.option("--profile", default="official", show_default=True, help="Scoring profile (official, lmms_eval, ...).")
@click.option("--split", default=None, help="Benchmark split/variant (VSI: test|debiased|pruned; BLINK: val).")
@click.option("--from", "source", type=click.Choice(["gasp", "lmms-eval", "vlmevalkit"]), default="gasp",
              show_default=True,
              help="Format of --predictions: ours, lmms-eval's --log_samples samples_<task>_*.jsonl[.gz], or "
                   "VLMEvalKit's <model>_<dataset>.xlsx/.tsv (converted to OUT/predictions.jsonl, then scored "
                   "by our official scorers).")
def score(benchmark: str, data_root: Path, predictions: Path, out_dir: Path, profile: str, split: str | None,
          source: str) -> None:
    """Score existing raw outputs (no media is opened). Missing predictions count as wrong."""
    from gasp_vlm.bench.registry import get_benchmark
    from gasp_vlm.bench.runner import score_run

    with _clean_errors():
        bench = get_benchmark(benchmark)
        bench.check_profile(profile)
        samples = bench.load(data_root, split=split)
        extra = {"predictions": str(predictions)}
        if source != "gasp":
            from gasp_vlm.bench.external_logs import read_lmms_eval_samples, read_vlmevalkit_predictions
            from gasp_vlm.io import write_jsonl_atomic

            reader = read_lmms_eval_samples if source == "lmms-eval" else read_vlmevalkit_predictions
            records = reader(predictions, samples, bench.name)
            out_dir.mkdir(parents=True, exist_ok=True)
            converted = write_jsonl_atomic(out_dir / "predictions.jsonl", records)
            extra.update(source=source, converted_predictions=str(converted))
            predictions = converted
        results = score_run(bench, samples, predictions, out_dir, profile, extra=extra)
    _warn_duplicates(results, predictions)
    if results.get("num_unknown_predictions"):
        click.echo(f"warning: {predictions}: {results['num_unknown_predictions']} predictions name samples that are "
                   f"not in this {results['benchmark']} copy (ignored)", err=True)
    click.echo(_summary(results))
    click.echo(f"wrote {out_dir / 'results.json'}")


@main.command("eval")
@click.option("--benchmark", "-b", default=None, help=BENCH_HELP)
@click.option("--data", "data_root", default=None, type=click.Path(path_type=Path), help="Local benchmark copy.")
@click.option("--model", "-m", default=None, help="Preset (e.g. tiny-qwen2.5-vl), HF directory or exported GASP model.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--limit", type=int, default=None, help="Only the first N samples.")
@click.option("--frames", type=int, default=None, help="Video frames per sample (VSI-Bench, Video-MME, MVBench: default 32, uniform).")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Requests per generate call, as one left-padded batch (every family; tested equal to one by one).")
@click.option("--max-new-tokens", type=int, default=None, help="Override the benchmark's official generation length.")
@click.option("--profile", default="official", show_default=True)
@click.option("--split", default=None)
@click.option("--min-pixels", type=int, default=None,
              help="Per-image min pixels for Qwen-VL (default: the benchmark's official setting, if any).")
@click.option("--max-pixels", type=int, default=None, help="Per-image max pixels for Qwen-VL.")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 on a GPU, float32 on CPU) | float32 | bfloat16 | float16")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if visible, else cpu) | cpu | cuda[:i]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="vllm: a `gasp export` folder of Qwen2/2.5-VL served by vLLM (GPU; each --batch-size chunk is one "
                   "vLLM generate call, so pass a large one, e.g. 256), with the HF path's prompts and frames.")
@click.option("--compare", nargs=2, type=click.Path(path_type=Path), default=None,
              metavar="BASE/results.json GASP/results.json", help="Compare two results files instead of running.")
@click.option("--labels", default="base,gasp", show_default=True, help="Names of the two compared runs.")
@click.option("--allow-mismatch", is_flag=True, help="--compare: compare runs scored under different settings "
              "(profile, frames, decoding, pixels, frame mode, dtype) instead of refusing; flagged in compare.md.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def eval_(benchmark, data_root, model, out_dir, limit, frames, batch_size, max_new_tokens, profile, split, min_pixels,
          max_pixels, dtype, device, seed, backend, compare, labels, allow_mismatch, no_progress) -> None:
    """Run a model on a benchmark (resumable), then score; or --compare two results.json files."""
    if compare:
        from gasp_vlm.bench.compare import compare_results

        with _clean_errors():
            names = tuple(labels.split(",", 1)) if "," in labels else ("base", "gasp")
            summary = compare_results(compare[0], compare[1], out_dir, names,  # type: ignore[arg-type]
                                      allow_mismatch=allow_mismatch)
        click.echo((out_dir / "compare.md").read_text())
        if "warning" in summary:
            click.echo(f"warning: {summary['warning']}")
        click.echo(f"wrote {out_dir / 'compare.md'} and {out_dir / 'compare.png'}")
        return
    missing = [n for n, v in (("--benchmark", benchmark), ("--data", data_root), ("--model", model)) if v is None]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or use --compare BASE GASP)")

    from gasp_vlm.bench.registry import get_benchmark
    from gasp_vlm.bench.runner import load_generator, run_eval

    with _clean_errors():
        bench = get_benchmark(benchmark)
        bench.check_profile(profile)
        generation = bench.generation_config(profile)
        if max_new_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens
        pixels = bench.pixel_config(profile)
        if min_pixels is not None or max_pixels is not None:
            pixels = dict(pixels or {})
            pixels.update({k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None})
        # validate the data (and media presence) before paying for model loading
        samples = bench.load(data_root, split=split)
        from gasp_vlm.bench.media import check_media_exists

        check_media_exists(samples[:limit] if limit is not None else samples)
        from gasp_vlm.models.runtime import launcher_rank, resolve_device, resolve_dtype

        rank, world, _ = launcher_rank()  # torchrun / accelerate launch: one shard of the samples per rank
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if backend == "vllm":  # same requests, answered by vLLM (bench/vllm_backend.py)
            from gasp_vlm.bench.vllm_backend import VLLMGenerator

            generator = VLLMGenerator(model, generation, pixels, dtype="bfloat16" if dtype == "float32" and
                                      device == "cpu" else dtype, seed=seed)
        else:
            generator = load_generator(model, generation, dtype=dtype, device=device, seed=seed)
        adapter = getattr(generator, "adapter", None)
        if (min_pixels is not None or max_pixels is not None) and adapter is not None \
                and not hasattr(adapter, "max_pixels") and rank == 0:
            click.echo(f"warning: --min-pixels / --max-pixels do not apply to {adapter.family}: it sizes frames by "
                       f"its own rule (tiles / a fixed square); they are ignored", err=True)
        results = run_eval(bench, data_root, generator, out_dir, model_name=str(model), profile=profile, split=split,
                           limit=limit, frames=frames, batch_size=batch_size, generation=generation,
                           pixels=pixels, progress=not no_progress and rank == 0, rank=rank, world=world)
    if rank != 0:
        click.echo(f"rank {rank}/{world}: answered {results['generated']} samples -> {results['predictions']}; "
                   "rank 0 merges and scores")
        return
    _warn_duplicates(results, out_dir / "predictions.jsonl")
    click.echo(_summary(results))
    click.echo(f"wrote {out_dir / 'predictions.jsonl'}, {out_dir / 'run.json'} and {out_dir / 'results.json'}")

