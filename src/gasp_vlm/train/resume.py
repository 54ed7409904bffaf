"""What a resumed run may change: every config key must match its checkpoint's, except those that change
no result (logging, checkpoint cadence, data-loading workers, ...). ``optim.max_steps`` may grow or
shrink a run, with a loud warning: the LR schedule is recomputed for the new length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gasp_vlm.train.config import ConfigError, TrainConfig

RESUME_MAY_DIFFER = frozenset({
    "output_dir", "save_every", "keep_last", "log_every", "report_to", "activation_checkpointing",
    "data.num_workers", "data.prefetch_factor", "data.pin_memory", "data.cache_frames", "data.decode_threads", "gasp.batched_layers"})
RESUME_WARN = frozenset({"optim.max_steps"})


def _diffs(a: Any, b: Any, key: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diffs(a.get(k), b.get(k), f"{key}.{k}" if key else k, out)
    elif a != b and key not in RESUME_MAY_DIFFER:
        out.append((key, a, b))


def check_resume_config(cfg: TrainConfig, meta: dict, ckpt: Path) -> list[str]:
    """Refuse (ConfigError listing every differing key) a resume whose config differs from the
    checkpoint's where it would change the result; return warnings for the keys that may differ loudly."""
    found: list[tuple[str, Any, Any]] = []
    _diffs(meta.get("train_config", {}), cfg.to_dict(), "", found)
    refused = [f"'{k}' (checkpoint: {a!r}, now: {b!r})" for k, a, b in found if k not in RESUME_WARN]
    if refused:
        raise ConfigError(f"--resume from {ckpt}: config key{'s' * (len(refused) > 1)} {', '.join(refused)} "
                          "differ from the checkpoint's; resume with the checkpoint's settings (its config is in "
                          f"{ckpt / 'gasp_checkpoint.json'}) or start a new run")
    step = meta.get("step")
    return [f"--resume from {ckpt}: {k} changed from {a!r} to {b!r}; the learning-rate schedule is recomputed "
            f"for the new length from step {step} on (the LR jumps), so this run differs from one trained "
            f"with {k}={b!r} from the start" for k, a, b in found if k in RESUME_WARN]
