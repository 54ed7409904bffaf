"""Where and in what precision a model runs: ``auto`` resolves to the GPU in bf16 when there is one."""

from __future__ import annotations

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is passed through."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


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
