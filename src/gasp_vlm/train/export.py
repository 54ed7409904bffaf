"""Export a training checkpoint as a plain Hugging Face model: heads dropped, LoRA merged.

The result is the base architecture with the trained weights -- same class, same parameter names and
count as the base model (zero inference overhead, the paper's "discarded at inference"), saved as
safetensors with its tokenizer and processor files (image/video processor, chat template, generation
config: models/processors.py), so ``Qwen2_5_VLForConditionalGeneration.from_pretrained(DIR)`` (or the
LLaVA-NeXT-Video / Qwen2-VL class) loads it with no gasp-vlm code, and ``gasp eval --model DIR`` too.

The directory is written to ``.tmp-<name>`` and renamed when complete (no partial exports).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gasp_vlm.models.processors import write_processor_files
from gasp_vlm.train.checkpoint import load_checkpoint, resolve_checkpoint

PEFT_MARKERS = ("lora_", "base_layer", "modules_to_save")
EXPORT_META = "gasp_export.json"  # marks a folder as written here (the only kind --overwrite replaces)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                      overwrite: bool = False) -> Path:
    """Checkpoint dir (or a run dir, meaning its latest checkpoint) -> plain HF model dir. Returns ``out_dir``.

    ``dtype`` (e.g. "bfloat16") casts the saved weights; default: the training weights' dtype.
    """
    ckpt = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out_dir.exists() and not (out_dir / EXPORT_META).is_file():
        # --overwrite deletes the folder: only ever one this function wrote
        raise FileExistsError(f"{out_dir} exists and is not a previous gasp export (no {EXPORT_META}); refusing to "
                              "replace it -- choose another --out or remove it yourself")
    adapter, heads, meta = load_checkpoint(ckpt, device="cpu", merge=True, dtype=dtype)
    del heads  # training-only: the exported model has no head parameters
    leftovers = [n for n, _ in adapter.model.named_parameters() if any(m in n for m in PEFT_MARKERS)]
    if leftovers:
        raise RuntimeError(f"{ckpt}: LoRA merge left adapter parameters behind, e.g. {leftovers[:3]}")
    if hasattr(adapter.model, "peft_config"):  # merge_and_unload leaves the config attribute behind
        del adapter.model.peft_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        adapter.save_pretrained(tmp)
        processor_files = write_processor_files(adapter, tmp)  # what AutoProcessor / lmms-eval / vLLM read
        (tmp / EXPORT_META).write_text(json.dumps({
            "source_checkpoint": str(ckpt.resolve()), "step": meta["step"], "family": adapter.family,
            "base_model": meta["model"]["name"], "finetune": meta["finetune"],
            "heads_dropped": meta.get("heads") is not None, "processor_files": processor_files,
            "num_parameters": sum(p.numel() for p in adapter.model.parameters())}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial export left behind
        raise
    if out_dir.exists():
        old = out_dir.parent / f".old-{out_dir.name}"
        os.replace(out_dir, old)
        shutil.rmtree(old)
    os.replace(tmp, out_dir)
    return out_dir
