"""Where and in what precision a model runs: ``auto`` resolves to the GPU in bf16 when there is one."""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def launcher_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK);
    (0, 1, 0) for a plain process."""
    import os

    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> this process's GPU (``cuda:LOCAL_RANK`` under a launcher) when one is visible, else
    ``cpu``; a bare ``cuda`` under a launcher is this process's GPU too (else every rank would use GPU 0);
    anything else is passed through."""
    if device not in ("auto", "cuda"):
        return device
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    _, world, local = launcher_rank()
    return f"cuda:{local}" if world > 1 else "cuda"


def resolve_dtype(dtype: str | None, device: str) -> str:
    """``auto`` (or None) -> bfloat16 on a GPU that supports it, float32 otherwise (CPU bf16 matmuls are
    slow and fp16 overflows in these models' attention)."""
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        return dtype
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"
