"""Training checkpoints: atomic writes, exact resume, and reload without the training config.

Layout of one checkpoint directory (``<output_dir>/checkpoints/step-000123``)::

    gasp_checkpoint.json      what to rebuild: base model (preset+overrides+seed, or path), family,
                              frame_mode, dtype, finetune, lora settings, heads config, step, full train config
    adapter/                  finetune=lora: the PEFT adapter (adapter_config.json + adapter_model.safetensors)
    llm.safetensors           finetune=full: every trainable LLM weight, under the HF model's parameter names
    heads.safetensors         the correspondence heads (absent for the LM-only control)
    trainer_state.{json,safetensors}  optimizer + LR scheduler state, step (data state = step, see stream.py)
    rng/rank{r}.{json,safetensors}    python / numpy / torch (+CUDA) RNG state of each rank
    engine/                   DeepSpeed only: accelerate.save_state (partitioned optimizer state)
    shards/rank{r}.{json,safetensors}  FSDP2 only: rank r's slices of the trainable weights + optimizer state

No pickle: trainer and RNG state are safetensors + JSON (gasp_vlm/io.py), so loading a checkpoint from
a shared run folder cannot run code (``trainer_state.pt`` of older checkpoints is read with
``torch.load(weights_only=True)``).

A checkpoint is written into ``.tmp-<name>`` next to its final place and renamed when complete, so a
crash never leaves a half-written checkpoint under the final name; ``<output_dir>/latest`` (written
by rename too) names the newest one *relative to the run folder*, so a copied run resumes from its own
checkpoints, and a pointer outside the run is refused. Only directories with ``gasp_checkpoint.json``
count as checkpoints; leftover ``.tmp-*`` directories of a crashed run are ignored and overwritten.
Every file is checked before use (``verify_checkpoint``): a truncated or damaged one is named, with
the newest intact older checkpoint to fall back to.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gasp_vlm.io import StateFileError, atomic_write_text, check_safetensors, load_tree, save_tree, tree_files
from gasp_vlm.train.fsdp import full_trainable_state, is_sharded, load_rank_shard, save_rank_shard

FORMAT = "gasp-checkpoint/1"
META = "gasp_checkpoint.json"
OWNER = ".written-by-rank0"  # in a checkpoint being written: tells the other nodes they share rank 0's disk


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (the message names the file and what to do)."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_meta(cfg, adapter, heads, step: int) -> dict:
    from gasp_vlm.models import PRESETS

    name = cfg.model.name
    is_preset = name in PRESETS
    if not is_preset and Path(name).expanduser().exists():
        name = str(Path(name).expanduser().resolve())  # reloadable from anywhere
    return {
        "format": FORMAT,
        "step": int(step),
        "model": {"name": name, "preset": name if is_preset else None, "overrides": dict(cfg.model.overrides),
                  "seed": cfg.model.seed, "dtype": cfg.model.dtype, "family": adapter.family,
                  "frame_mode": adapter.frame_mode, "attn_implementation": cfg.model.attn_implementation,
                  "num_layers": adapter.num_layers, "hidden_size": adapter.hidden_size},
        "finetune": cfg.finetune,
        "lora": dict(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, pattern=cfg.lora.pattern,
                     rslora=cfg.lora.rslora) if cfg.finetune == "lora" else None,
        "heads": None if heads is None else {
            "layers": list(heads.layer_indices), "d_model": adapter.hidden_size,
            "d_hidden": cfg.gasp.d_hidden, "d_out": cfg.gasp.d_out, "tau": cfg.gasp.tau,
            "input_norm": cfg.gasp.head_norm,
            "lambda_corr": cfg.gasp.lambda_corr, "lambda_depth": cfg.gasp.lambda_depth},
        "train_config": cfg.to_dict(),
    }


def save_checkpoint(ckpt_dir: str | Path, *, accelerator, model, optimizer, scheduler, cfg, step: int,
                    output_dir: str | Path | None = None, keep_last: int | None = None) -> Path:
    """Write one checkpoint atomically. Call on *every* rank (ranks meet at barriers); returns its path.

    No shared file system is assumed: rank 0 writes the checkpoint, and so does the first rank of every
    node that cannot see rank 0's folder (node-local disks), so each node holds a complete checkpoint
    it can resume from; on a shared file system only rank 0 writes. ``keep_last``: prune older ones."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.parent / f".tmp-{ckpt_dir.name}"
    gm = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    sharded = is_sharded(gm)

    def fresh_tmp() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
        if sharded:
            (tmp / "shards").mkdir()

    if main:
        fresh_tmp()
        (tmp / OWNER).write_text(f"{os.uname().nodename}:{os.getpid()}\n")  # what the other nodes look for
    accelerator.wait_for_everyone()
    # a node whose first rank does not see rank 0's folder has its own disk: it writes a copy of its own
    writer = main or (accelerator.local_process_index == 0 and not (tmp / OWNER).is_file())
    if writer and not main:
        fresh_tmp()
    accelerator.wait_for_everyone()
    save_tree(rng_state(), tmp / "rng" / f"rank{accelerator.process_index}")
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    if deepspeed:  # partitioned optimizer state: every rank writes its shard
        accelerator.save_state(str(tmp / "engine"), exclude_frozen_parameters=True)  # never the frozen base
    if sharded:  # FSDP2: every rank its own slices
        save_rank_shard(gm, optimizer, tmp / "shards" / f"rank{accelerator.process_index}", accelerator.num_processes)
    if sharded or writer:  # FSDP2 gathers the trainable weights: a collective, so every rank takes part
        trained = full_trainable_state(gm)
    if writer:
        adapter = gm.adapter
        _save_trainable(gm, trained, tmp, cfg.finetune)
        state = {"step": int(step), "scheduler": scheduler.state_dict()}
        if not deepspeed and not sharded:
            state["optimizer"] = optimizer.state_dict()
        save_tree(state, tmp / "trainer_state")
        (tmp / META).write_text(json.dumps(checkpoint_meta(cfg, adapter, gm.heads, step), indent=2))
    # every rank's own files (rng, engine shards) must be in tmp before rank 0 renames it: a slow rank
    # would otherwise write into a folder that has already moved (seen in CI: rank 1 died mid-save)
    accelerator.wait_for_everyone()
    if writer:
        (tmp / OWNER).unlink(missing_ok=True)
        if ckpt_dir.exists():  # re-saving the same step: swap the old one out first
            old = ckpt_dir.parent / f".old-{ckpt_dir.name}"
            os.replace(ckpt_dir, old)
            shutil.rmtree(old)
        os.replace(tmp, ckpt_dir)
        if output_dir is not None:  # relative: a copied run folder points at its own checkpoints
            atomic_write_text(Path(output_dir) / "latest",
                              os.path.relpath(ckpt_dir.resolve(), Path(output_dir).resolve()) + "\n")
        if keep_last is not None:
            prune_checkpoints(ckpt_dir.parent, keep_last)
    accelerator.wait_for_everyone()
    return ckpt_dir


def _save_trainable(gm, full: dict[str, torch.Tensor], out: Path, finetune: str) -> None:
    """The trainable weights (full tensors under their GaspModel names; gathered under FSDP2) in the
    checkpoint layout: the PEFT adapter, llm.safetensors (HF names) for a full fine-tune, heads.safetensors."""
    backbone = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
    if finetune == "lora":  # peft's own writer (its key mapping, config, model card) over these tensors
        gm.backbone.save_pretrained(str(out / "adapter"), state_dict=backbone)
    else:
        save_file(backbone, str(out / "llm.safetensors"))
    if gm.heads is not None:
        save_file({k.removeprefix("heads."): v for k, v in full.items() if k.startswith("heads.")},
                  str(out / "heads.safetensors"))


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete step checkpoints under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def prune_checkpoints(ckpt_root: str | Path, keep_last: int) -> None:
    """Delete all but the ``keep_last`` newest step checkpoints (rename first, so a crash mid-delete
    never leaves a damaged directory under a checkpoint name)."""
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        trash = old.parent / f".del-{old.name}"
        os.replace(old, trash)
        shutil.rmtree(trash)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``<output_dir>/latest`` names, else the newest complete one, else None.

    The pointer is relative to ``output_dir`` (older runs wrote absolute paths); one that leads outside
    the run folder -- a run copied from elsewhere -- is refused rather than followed."""
    out = Path(output_dir)
    pointer = out / "latest"
    if pointer.is_file():
        q = Path(pointer.read_text().strip())
        target = (q if q.is_absolute() else out / q).resolve()
        if not target.is_relative_to(out.resolve()):
            raise CheckpointError(f"{pointer}: names {q}, outside the run folder {out} (a copied run?); delete "
                                  f"{pointer} to use the newest checkpoint under {out / 'checkpoints'}")
        if (target / META).is_file():
            return out / target.relative_to(out.resolve())
    found = list_checkpoints(out / "checkpoints")
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or an output dir whose ``latest`` names one."""
    p = Path(path)
    if (p / META).is_file():
        return p
    q = latest_checkpoint(p) if p.is_dir() else None
    if q is not None:
        return q
    raise FileNotFoundError(f"{p}: not a gasp checkpoint (no {META}), and no checkpoint found under it")


def _fallback_hint(ckpt_dir: Path, trainer_state: bool = True) -> str:
    prev = previous_intact_checkpoint(ckpt_dir, trainer_state=trainer_state)
    if prev is None:
        return "; no older intact checkpoint is left in that run"
    return (f"; the previous checkpoint {prev} is intact: continue from it with `gasp train ... --resume-from "
            f"{prev}` or export it with `gasp export {prev}`")


def _checkpoint_files(ckpt_dir: Path, meta: dict) -> list[Path]:
    """The safetensors files a checkpoint's meta says it holds (weights, then trainer state)."""
    files = [ckpt_dir / "adapter" / "adapter_model.safetensors"] if meta.get("finetune") == "lora" \
        else [ckpt_dir / "llm.safetensors"]
    if meta.get("heads") is not None:
        files.append(ckpt_dir / "heads.safetensors")
    return files


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFileError(f"{path}: truncated or damaged JSON ({e})") from None


def _problem(ckpt_dir: Path, trainer_state: bool) -> str | None:
    """The first missing/truncated/damaged file of a checkpoint (headers and sizes only, no weights read);
    ``trainer_state=False`` checks only what a reload for inference reads (export, diagnose, eval)."""
    try:
        meta = read_meta(ckpt_dir)
        for f in _checkpoint_files(ckpt_dir, meta):
            check_safetensors(f)
        if meta.get("finetune") == "lora":
            _check_json(ckpt_dir / "adapter" / "adapter_config.json")
        if trainer_state and not (ckpt_dir / "trainer_state.pt").is_file():  # older: read with weights_only
            js, st = tree_files(ckpt_dir / "trainer_state")
            check_safetensors(st)
            _check_json(js)
    except (CheckpointError, StateFileError, FileNotFoundError) as e:
        return str(e)
    return None


def previous_intact_checkpoint(ckpt_dir: str | Path, trainer_state: bool = True) -> Path | None:
    """The newest checkpoint of the same run older than ``ckpt_dir`` whose files all check out."""
    ckpt_dir = Path(ckpt_dir)
    older = [p for p in list_checkpoints(ckpt_dir.parent) if p.name < ckpt_dir.name]
    return next((p for p in reversed(older) if _problem(p, trainer_state) is None), None)


def verify_checkpoint(ckpt_dir: str | Path, *, trainer_state: bool = True) -> Path:
    """Raise CheckpointError naming the first missing, truncated or damaged file of a checkpoint (and
    the newest intact older one to use instead); return the checkpoint dir when every file checks out.
    ``trainer_state=False``: only the files a reload for inference needs."""
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    problem = _problem(ckpt_dir, trainer_state)
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {problem}{_fallback_hint(ckpt_dir, trainer_state)}")
    return ckpt_dir


def read_meta(ckpt_dir: str | Path) -> dict:
    p = resolve_checkpoint(ckpt_dir)
    try:
        meta = json.loads((p / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p / META}: truncated or damaged ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{p / META}: unsupported format {got!r} (expected {FORMAT})")
    return meta


def load_trainable_weights(ckpt_dir: Path, gm) -> None:
    """Put a checkpoint's trained weights (adapter or LLM, + heads) into a live GaspModel (resume)."""
    if (ckpt_dir / "adapter").is_dir():
        from peft import set_peft_model_state_dict

        state = load_file(str(ckpt_dir / "adapter" / "adapter_model.safetensors"))
        res = set_peft_model_state_dict(gm.backbone, state)
        if getattr(res, "unexpected_keys", None):
            raise CheckpointError(f"{ckpt_dir}: adapter keys do not fit the model: {res.unexpected_keys[:3]}")
    else:
        _load_llm(ckpt_dir, gm.adapter.model)
    if gm.heads is not None:
        gm.heads.load_state_dict(load_file(str(ckpt_dir / "heads.safetensors")))


def _load_llm(ckpt_dir: Path, hf_model: torch.nn.Module) -> None:
    state = load_file(str(ckpt_dir / "llm.safetensors"))
    res = hf_model.load_state_dict(state, strict=False)
    if res.unexpected_keys:
        raise CheckpointError(f"{ckpt_dir / 'llm.safetensors'}: keys not in the model, e.g. {res.unexpected_keys[:3]}")


def _read_state(ckpt_dir: Path, name: str, required: bool = True) -> dict | None:
    """State tree ``name`` of a checkpoint (safetensors + JSON); older checkpoints' ``.pt`` via
    weights_only, which runs no code. ``required=False``: None when absent."""
    stem = ckpt_dir / name
    legacy = stem.with_name(stem.name + ".pt")
    if legacy.is_file() and not tree_files(stem)[0].is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- truncated, or holds types weights_only refuses
            if required:
                raise CheckpointError(f"{legacy}: unreadable without unpickling code ({type(e).__name__}: {e})"
                                      f"{_fallback_hint(ckpt_dir)}") from None
            warnings.warn(f"{legacy}: not restored ({type(e).__name__}); RNG streams restart", stacklevel=2)
            return None
    if not required and not tree_files(stem)[0].is_file():
        return None
    try:
        return load_tree(stem)
    except StateFileError as e:
        raise CheckpointError(f"{e}{_fallback_hint(ckpt_dir)}") from None


def restore_training_state(ckpt_dir: str | Path, *, accelerator, model, optimizer, scheduler) -> int:
    """Resume: weights, optimizer, scheduler and this rank's RNG; returns the step to continue from."""
    ckpt_dir = verify_checkpoint(ckpt_dir)
    gm = accelerator.unwrap_model(model)
    state = _read_state(ckpt_dir, "trainer_state")
    if is_sharded(gm):  # FSDP2: this rank's own slices of the weights and the optimizer state
        stem = ckpt_dir / "shards" / f"rank{accelerator.process_index}"
        if not tree_files(stem)[1].is_file():
            raise CheckpointError(f"{ckpt_dir}: no FSDP2 shard for rank {accelerator.process_index} ({stem}.safetensors); "
                                  f"resume with the world size and engine that wrote it")
        try:
            load_rank_shard(gm, optimizer, stem, accelerator.num_processes)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    elif (ckpt_dir / "shards").is_dir():
        raise CheckpointError(f"{ckpt_dir}: written by an FSDP2 run (shards/); resume it with fsdp2: true, or export "
                              f"it and start a new run from the export")
    else:
        load_trainable_weights(ckpt_dir, gm)
        if (ckpt_dir / "engine").is_dir():
            accelerator.load_state(str(ckpt_dir / "engine"), load_module_strict=False)  # the base: from the model
        else:
            optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = _read_state(ckpt_dir, f"rng/rank{accelerator.process_index}", required=False)
    if rng is not None:
        set_rng_state(rng)
    return int(state["step"])


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu", merge: bool = True,
                    dtype: Any = None) -> tuple[Any, Any, dict]:
    """Rebuild a trained model from a checkpoint alone -> (adapter, heads or None, meta).

    The adapter holds the base model with the trained weights: LoRA merged into the base weights
    (``merge=False`` keeps the LoRA layers unmerged, injected in place, so ``adapter.model`` is still
    the HF model and every adapter method works), or the full-finetune LLM weights.
    ``heads`` is a CorrespondenceHeads on ``device`` (None for an LM-only run). Both are in eval mode.
    """
    from gasp_vlm.method.heads import CorrespondenceHeads
    from gasp_vlm.models import load_adapter

    ckpt_dir = verify_checkpoint(ckpt_dir, trainer_state=False)
    meta = read_meta(ckpt_dir)
    m = meta["model"]
    adapter = load_adapter(m["name"], dtype=dtype or m["dtype"], device=device,
                           attn_implementation=m.get("attn_implementation", "sdpa"), seed=m.get("seed", 0),
                           frame_mode=m.get("frame_mode"), overrides=m.get("overrides") or None)
    if meta["finetune"] == "lora":
        from peft import PeftModel

        with warnings.catch_warnings():  # peft still calls the deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(adapter.model, str(ckpt_dir / "adapter"))
        if merge:
            adapter.model = peft_model.merge_and_unload()
        # else: peft injected the LoRA layers into adapter.model's modules in place
    else:
        _load_llm(ckpt_dir, adapter.model)
    adapter.model.to(device).eval()
    heads = None
    h = meta.get("heads")
    if h is not None:
        heads = CorrespondenceHeads.random_init(h["d_model"], m["num_layers"], h["layers"], h["d_hidden"], h["d_out"])
        heads.load_state_dict(load_file(str(ckpt_dir / "heads.safetensors")))
        heads = heads.to(device).eval()
        heads.input_norm = h.get("input_norm", "none")  # what the heads were trained to read
    return adapter, heads, meta
