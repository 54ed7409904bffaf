"""Spatial benchmark harness: VSI-Bench, All-Angles Bench, BLINK and MMSI-Bench, scored as their official code does.

    from gasp_vlm.bench import get_benchmark, score_samples, run_eval
    bench = get_benchmark("vsibench")
    samples = bench.load("~/VSI-Bench")                  # on-disk layout -> Sample records
    results, preds = score_samples(bench, samples, {"0": "A", "1": "3"})   # percent, official aggregation

Nothing here imports torch; the model is loaded only by `runner.load_generator`.
"""

from gasp_vlm.bench.records import Media, Prediction, PredictionsFileError, Sample, read_predictions
from gasp_vlm.bench.registry import Benchmark, ScoreResult, available_benchmarks, get_benchmark, register, score_samples
from gasp_vlm.bench.tables import BenchmarkDataError


def run_eval(*args, **kwargs):  # lazy: keeps `import gasp_vlm.bench` free of tqdm/PyAV imports
    from gasp_vlm.bench.runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)


__all__ = ["Benchmark", "BenchmarkDataError", "Media", "Prediction", "PredictionsFileError", "Sample", "ScoreResult",
           "available_benchmarks", "get_benchmark", "read_predictions", "register", "run_eval", "score_samples"]
