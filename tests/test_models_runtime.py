"""--device auto / --dtype auto: the GPU in bf16 when there is one, else CPU float32."""

import pytest
import torch

from gasp_vlm.models.runtime import resolve_device, resolve_dtype


def test_auto_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype(None, "cpu") == "float32" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("float16", "cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda:0") == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cuda")


def test_launcher_rank_and_per_rank_gpu(monkeypatch):
    from gasp_vlm.models.runtime import launcher_rank

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert launcher_rank() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_rank() == (5, 8, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda:1"
    assert resolve_device("cuda") == "cuda:1" and resolve_device("cuda:0") == "cuda:0"  # bare: this rank's GPU
