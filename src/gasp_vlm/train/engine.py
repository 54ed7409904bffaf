"""Engine settings of a run: mixed precision and DeepSpeed, derived from the training config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gasp_vlm.train.config import ConfigError, TrainConfig


def mixed_precision(precision: str) -> str:
    if precision == "fp32":
        return "no"
    if precision == "bf16":
        return "bf16"
    # auto: bf16 only where it is fast (CUDA with bf16 support); CPU bf16 autocast is slower than fp32
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def deepspeed_plugin(cfg: TrainConfig):
    """DeepSpeedPlugin from ``cfg.deepspeed`` with its "auto" fields filled from the config."""
    if not cfg.deepspeed:
        return None
    from accelerate.utils import DeepSpeedPlugin

    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ConfigError(f"config key 'deepspeed': {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key 'deepspeed': {path} is not valid JSON ({e})") from e
    fill_deepspeed_auto(ds, cfg)
    return DeepSpeedPlugin(hf_ds_config=ds)


def fill_deepspeed_auto(ds: dict, cfg: TrainConfig) -> None:
    """Fill DeepSpeed "auto" values that accelerate can only infer from a prepared DataLoader."""
    fills = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
             "gradient_accumulation_steps": cfg.optim.grad_accum,
             "gradient_clipping": cfg.optim.grad_clip}
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    mp = mixed_precision(cfg.precision)
    for key, on in (("bf16", mp == "bf16"), ("fp16", False)):
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = on
