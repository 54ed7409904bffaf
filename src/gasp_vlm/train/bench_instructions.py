"""`gasp bench instructions`: what loading one instruction sample costs (time, CPU, peak memory).

Memory per sample: the set (and the model, for the encode step) is loaded once, then every sample is
loaded in its own forked child process. Linux starts a forked child's peak-RSS counter (ru_maxrss) at
its RSS at fork, so the child's ru_maxrss after the sample minus its RSS at start is exactly that
sample's peak resident memory over the loader's baseline -- transient peaks inside the decoder
included, no polling, no leftovers of earlier samples. Time: wall and CPU seconds of the child (the
decoder runs on ``data.decode_threads`` threads, 1 by default: wall ≈ per-core time).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from gasp_vlm.train.config import DataConfig


class _Meter:
    """Wall and CPU seconds since it was made, and the peak RSS since then over the RSS at that moment."""

    def __init__(self) -> None:
        import psutil

        self.base = psutil.Process().memory_info().rss
        self.r0, self.t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()

    def seconds(self) -> tuple[float, float]:
        """(wall, CPU) seconds so far."""
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter() - self.t0, (r1.ru_utime + r1.ru_stime) - (self.r0.ru_utime + self.r0.ru_stime)

    def peak_over_baseline_mib(self) -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        return max(0, peak - self.base) / 2 ** 20


def _load_one(ds, pos: int, cfg: DataConfig, adapter) -> dict[str, Any]:
    from gasp_vlm.train.stream import prepare_conversations, robust_instruction_sample

    meter = _Meter()
    item, bad = robust_instruction_sample(ds, pos, cfg.seed + 1000)
    t_dec, cpu_dec = meter.seconds()
    t_enc = None
    if adapter is not None:
        t1 = time.perf_counter()
        prepare_conversations(adapter, [item], max_length=cfg.max_length)
        t_enc = time.perf_counter() - t1
    return {"decode_s": t_dec, "decode_cpu_s": cpu_dec, "encode_s": t_enc,
            "peak_rss_over_baseline_mib": meter.peak_over_baseline_mib(),
            "frames": len(item["frames"]), "frame_hw": list(item["frames"][0].shape[:2]) if item["frames"] else None,
            "media": item.get("media"), "bad_media": len(bad)}


def _in_child(fn, timeout_s: float = 600.0) -> dict:
    """Run ``fn()`` in a forked child; return its JSON-able result (an exception becomes an error). A child
    that has not answered after ``timeout_s`` (a fork of a threaded process can deadlock) is killed and
    reported, so a benchmark never hangs."""
    import select
    import signal

    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rd)
        try:
            out = json.dumps(fn())
        except BaseException as e:  # report, never fall back into the parent's code
            out = json.dumps({"error": f"{type(e).__name__}: {e}"})
        with os.fdopen(wr, "w") as f:
            f.write(out)
        os._exit(0)
    os.close(wr)
    chunks, deadline = [], time.monotonic() + timeout_s
    with os.fdopen(rd) as f:
        while True:
            ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise RuntimeError(f"bench instructions: the measuring child process gave no answer in {timeout_s:g} s")
            chunk = os.read(f.fileno(), 1 << 16).decode()
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    text = "".join(chunks)
    res = json.loads(text) if text else {"error": "the child process died"}
    if "error" in res:
        raise RuntimeError(f"bench instructions: {res['error']}")
    return res


def benchmark_instructions(cfg: DataConfig, data: str | Path, model: str | None = None, samples: int = 8,
                           model_overrides: dict | None = None) -> dict[str, Any]:
    """Load ``samples`` instruction samples of ``data`` (stream order, bad media skipped) one by one."""
    import torch

    from gasp_vlm.train.stream import build_instructions

    if not hasattr(os, "fork"):
        raise RuntimeError("bench instructions measures each sample in a forked process (Linux/macOS)")
    torch.set_num_threads(1)  # no OpenMP pool exists at fork time (children inherit a single thread)
    try:  # the decoder's libraries belong to the baseline, not to the first sample
        import av  # noqa: F401
    except ImportError:
        pass
    import psutil  # noqa: F401  (nothing is imported inside a forked child: see _in_child)

    from gasp_vlm.train.stream import prepare_conversations, robust_instruction_sample  # noqa: F401

    cfg.instructions, cfg.instruction_ratio = str(data), 1.0
    ds = build_instructions(cfg)
    adapter = None
    if model:
        from gasp_vlm.models import load_adapter

        adapter = load_adapter(model, overrides=model_overrides or None)
    t0 = time.perf_counter()
    per = [_in_child(lambda pos=pos: _load_one(ds, pos, cfg, adapter)) for pos in range(samples)]
    wall = time.perf_counter() - t0
    med = lambda k: statistics.median(p[k] for p in per)  # noqa: E731
    out = {"data": str(data), "set_size": len(ds), "samples": samples, "model": model,
           "video": {"sampling": cfg.video_sampling, "max_frames": cfg.instruction_frames, "fps": cfg.video_fps,
                     "max_pixels": cfg.video_max_pixels, "seek": cfg.video_seek, "threads": cfg.decode_threads},
           "samples_per_s": samples / wall,
           "decode_s_per_sample": {"median": med("decode_s"), "max": max(p["decode_s"] for p in per)},
           "decode_cpu_s_per_sample": {"median": med("decode_cpu_s"), "max": max(p["decode_cpu_s"] for p in per)},
           "peak_rss_over_baseline_mib": {"median": med("peak_rss_over_baseline_mib"),
                                          "max": max(p["peak_rss_over_baseline_mib"] for p in per)},
           "bad_media_skipped": sum(p["bad_media"] for p in per), "per_sample": per}
    if adapter is not None:
        out["encode_s_per_sample"] = {"median": med("encode_s"), "max": max(p["encode_s"] for p in per)}
    return out


def _decode_one(path: str, opts) -> dict[str, Any]:
    from gasp_vlm.train.instructions import read_video  # imported by the parent before it forks

    meter = _Meter()
    _, idx = read_video(path, opts)
    wall, cpu = meter.seconds()
    return {"decode_s": wall, "decode_cpu_s": cpu, "peak_rss_over_baseline_mib": meter.peak_over_baseline_mib(),
            "indices": idx}


def benchmark_video(path: str | Path, opts, samples: int = 3) -> dict[str, Any]:
    """Decode the frames ``opts`` choose from one video file ``samples`` times, each in a forked child
    (as benchmark_instructions: wall and CPU seconds, peak RSS over the child's start); medians."""
    if not hasattr(os, "fork"):
        raise RuntimeError("bench video measures each decode in a forked process (Linux/macOS)")
    import av  # noqa: F401  (the decoder's libraries belong to the baseline)
    import psutil  # noqa: F401  (nothing is imported inside a forked child: see _in_child)

    from gasp_vlm.train.instructions import read_video  # noqa: F401

    per = [_in_child(lambda: _decode_one(str(path), opts)) for _ in range(samples)]
    med = lambda k: statistics.median(p[k] for p in per)  # noqa: E731
    return {"decode_s_per_sample": med("decode_s"), "decode_cpu_s_per_sample": med("decode_cpu_s"),
            "decode_cpu_s_max": max(p["decode_cpu_s"] for p in per),
            "peak_rss_over_baseline_mib": med("peak_rss_over_baseline_mib"), "indices": per[0]["indices"]}
