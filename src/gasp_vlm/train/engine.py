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
    check_zero_stage(ds, str(path))
    import torch

    if not torch.cuda.is_available():  # accelerate would run the job as plain DDP, under a DeepSpeed name
        raise ConfigError("config key 'deepspeed': DeepSpeed needs CUDA GPUs (none here); on CPUs train with DDP "
                          "or fsdp2: true")
    fill_deepspeed_auto(ds, cfg)
    return DeepSpeedPlugin(hf_ds_config=ds)


def check_zero_stage(ds: dict, where: str) -> None:
    """ZeRO-3 is refused: it partitions the LoRA and head weights themselves, which the heads' SVD init,
    the checkpoint (gathered adapter + heads files) and the diagnostic read whole. FSDP2 shards them and
    is tested end to end (``fsdp2: true``); ZeRO-2 (optimizer + gradient partitioning) is supported."""
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage >= 3:
        raise ConfigError(f"{where}: ZeRO stage {stage} is not supported (it partitions the trainable LoRA / head "
                          f"weights the heads' init and the checkpoints read whole); use ZeRO-2 "
                          f"(configs/deepspeed/zero2.json) or shard parameters with fsdp2: true")


def check_engine(cfg: TrainConfig, accelerator) -> None:
    """The engine the config asks for is the one running: accelerate silently runs a DeepSpeed config as
    plain DDP without CUDA GPUs, which would train unsharded under a DeepSpeed name."""
    if accelerator.state.deepspeed_plugin is not None:
        check_zero_stage(accelerator.state.deepspeed_plugin.deepspeed_config, "the accelerate DeepSpeed config")
    if cfg.deepspeed and accelerator.distributed_type.name != "DEEPSPEED":
        raise ConfigError(f"config key 'deepspeed': DeepSpeed needs CUDA GPUs (accelerate runs this job as "
                          f"{accelerator.distributed_type.name}); on CPUs train with DDP or fsdp2: true")


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
