"""The GASP training recipe: one readable loop, config in, atomic checkpoints out (torchtune style).

    L = L_LM + λ_corr · L_corr + λ_depth · L_depth      (method/gasp.py)

Setup, in this order (the order matters):
  1. load the base VLM (preset / HF dir / hub id) on this rank's device;
  2. build the correspondence heads from each layer's q_proj by SVD -- fp32, *before* LoRA wrapping and
     before any engine touches the weights (method/gasp.py: build_heads). LM-only runs build none;
  3. LoRA on the LLM decoder only (train/lora.py), or full fine-tuning of the LLM (``lora.enabled:
     false``); the vision tower and projector are frozen and run under no_grad in every step;
  4. non-reentrant activation checkpointing of the decoder layers (each layer's head + loss is
     checkpointed separately inside ``gasp_losses``);
  5. AdamW with two param groups -- backbone at ``optim.lr``, heads at ``optim.head_lr_mult`` × lr
     (the paper's 4×) -- and one LambdaLR (linear warm-up, cosine) that scales both groups alike;
  6. ``accelerate`` prepares model + optimizer: single process, DDP (torchrun / accelerate launch,
     gloo on CPU), DeepSpeed ZeRO-2 (``deepspeed:`` key or an accelerate DeepSpeed config), or FSDP2
     (``fsdp2: true``, train/fsdp.py; gloo on CPU too).

Each optimizer step runs ``optim.grad_accum`` micro-batches; micro-batch i is ``StepBatches[i]``, a pure
function of (seed, i, rank, world), so the data state of a checkpoint is just its step and ``--resume``
continues bit-exactly (weights, AdamW moments, LR schedule, RNG restored). A micro-batch's geometry and
instruction parts run in one forward and one backward (train/stream.py), so the step's gradient is that
of L_LM + λ_corr·L_corr + λ_depth·L_depth, with the λ's the only weights between the terms. bf16 autocast is used when
the device supports it (``precision: auto``); on CPU training runs in fp32.

Python API (what the demo and the CLI call)::

    ckpt = train(cfg, out_dir, resume=False, progress=True)      # -> final checkpoint dir
    adapter, heads, meta = load_checkpoint(ckpt)                 # re-exported from checkpoint.py

Outputs under ``out_dir``: ``config.yaml``, ``logs/train.jsonl`` (one record per optimizer step:
loss, lm, corr, depth and their per-layer values corr_per_layer / depth_per_layer, lr, head_lr,
grad_norm, kinds (the parts of each micro-batch: g, i, gi), step time, samples/s, tokens/s (visual and
text), data-wait time and fraction, model TFLOP/s and MFU (train/watch.py), peak memory), ``tb/``
(TensorBoard, when installed and in ``report_to``; per-layer terms under train_layers/),
``plots/per_layer_losses.png`` (written at the end of a run), ``checkpoints/step-NNNNNN`` and ``latest``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from gasp_vlm.io import write_json_atomic
from gasp_vlm.method.gasp import GaspModel, Part, build_heads
from gasp_vlm.train.bad_media import BadMediaTracker
from gasp_vlm.train.checkpoint import (latest_checkpoint, load_checkpoint, read_meta,
                                       restore_training_state, save_checkpoint, verify_checkpoint)
from gasp_vlm.train.config import ConfigError, TrainConfig, save_config
from gasp_vlm.train.engine import check_engine, deepspeed_plugin, fill_deepspeed_auto, mixed_precision
from gasp_vlm.train.fsdp import shard_model
from gasp_vlm.train.lora import VISION_MODULE_MARKERS, apply_lora
from gasp_vlm.train.resume import check_resume_config
from gasp_vlm.train.stream import PreparedSteps, StepBatches
from gasp_vlm.train.watch import (JsonlLog, console_line, flops_per_token, plot_per_layer_losses, step_scalars,
                                  throughput, token_counts)

__all__ = ["GaspRecipe", "train", "load_checkpoint", "load_model_adapter", "lr_lambda"]

# ------------------------------------------------------------------------------------------------
# Small pieces
# ------------------------------------------------------------------------------------------------
def lr_lambda(step: int, warmup: int, total: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """LR multiplier of optimizer step ``step`` (0-based): linear warm-up from 1/(warmup+1), then cosine
    from 1 down to ``min_ratio`` at ``total`` (or constant)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_for_epochs(cfg: TrainConfig, data: StepBatches, world: int) -> int:
    """Optimizer steps for ``optim.epochs`` passes over the geometry sequences (the instruction set when
    there is no geometry): each step takes batch_size × world × grad_accum sequences of the stream."""
    if data.geometry is not None:  # a manifest source holds one rank's rows; ``total`` is all of them
        n = getattr(data.geometry, "total", len(data.geometry))
        per_step = cfg.data.batch_size * world * cfg.optim.grad_accum
    else:
        n = len(data.instructions)
        per_step = cfg.data.batch_size * world * cfg.optim.grad_accum * cfg.data.instruction_ratio
    return max(1, math.ceil(cfg.optim.epochs * n / per_step))


def load_model_adapter(cfg: TrainConfig, device: torch.device | str):
    """The base VLM adapter of ``cfg.model`` (preset, HF dir or hub id) on ``device``."""
    from gasp_vlm.models import load_adapter

    m = cfg.model
    pixels = {k: v for k, v in (("min_pixels", m.min_pixels), ("max_pixels", m.max_pixels)) if v is not None}
    return load_adapter(m.name, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
                        seed=m.seed, frame_mode=m.frame_mode, overrides=m.overrides or None, **pixels)


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------
class GaspRecipe:
    """Everything one training run holds; ``run()`` trains, ``train_step(step)`` does one optimizer step.

    Public attributes: ``cfg, out_dir, accelerator, adapter, model`` (prepared, maybe DDP-wrapped),
    ``gasp_model`` (unwrapped GaspModel), ``heads`` (CorrespondenceHeads or None), ``optimizer``,
    ``scheduler``, ``data`` (StepBatches), ``step`` (optimizer steps done).
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, *, resume: bool | str | Path = False,
                 progress: bool = True, geometry_parts: bool | None = None) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import set_seed

        self.cfg, self.out_dir, self.progress = cfg, Path(out_dir), progress
        # The recipe owns the process: drop settings a previous Accelerator in it left behind (tests,
        # notebooks), keeping the distributed process group.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = acc = Accelerator(
            # without CUDA, accelerate only recognises a torchrun/launch environment as multi-process
            # (gloo) when told it runs on CPU
            cpu=not torch.cuda.is_available(),
            mixed_precision=mixed_precision(cfg.precision),
            gradient_accumulation_steps=cfg.optim.grad_accum,
            deepspeed_plugin=deepspeed_plugin(cfg),
            # every trainable parameter gets a gradient every step (heads: zero-weighted dummy calls)
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        check_engine(cfg, acc)
        if acc.state.deepspeed_plugin is not None and not cfg.deepspeed:  # launched with a DeepSpeed config
            fill_deepspeed_auto(acc.state.deepspeed_plugin.deepspeed_config, cfg)
        set_seed(cfg.seed)  # same on every rank: identical LoRA init (DDP broadcasts anyway)

        # the LM-only control loads no geometry parts (they carry no loss) unless told to
        # (``geometry_parts=True``: the step-time benchmark's baseline forward on the same batches)
        self.data = StepBatches(cfg.data, rank=acc.process_index, world=acc.num_processes, work_dir=self.out_dir,
                                geometry_parts=not cfg.gasp.lm_only if geometry_parts is None else geometry_parts)
        if cfg.data.manifest:  # the manifest's identity is part of the config: a resume refuses another one
            self.cfg = cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                              manifest_id=self.data.geometry.id))
        if cfg.optim.epochs is not None:  # before the resume check: the derived length is part of the config
            self.cfg = cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
                cfg.optim, max_steps=steps_for_epochs(cfg, self.data, acc.num_processes)))

        # resume=True: this run's latest checkpoint; a path: that checkpoint (e.g. an older intact one)
        resume_from = latest_checkpoint(self.out_dir) if resume is True else (Path(resume) if resume else None)
        if resume_from is not None:
            resume_from = verify_checkpoint(resume_from)  # fail before loading anything big
            for warning in check_resume_config(cfg, read_meta(resume_from), resume_from):
                self._print(f"WARNING: {warning}")

        self.adapter = adapter = load_model_adapter(cfg, acc.device)

        # Heads first: SVD of the pretrained q_proj, before LoRA/sharding. A resumed run overwrites
        # them from the checkpoint, so it skips the calibration forward.
        calib = None if resume_from is not None or cfg.gasp.lm_only else self._calibration_batch()
        self.heads = build_heads(adapter, cfg.gasp, calib_batch=calib)

        if cfg.lora.enabled:
            with warnings.catch_warnings():  # peft still calls the deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                backbone = apply_lora(adapter.model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                      target_pattern=cfg.lora.pattern, use_rslora=cfg.lora.rslora)
        else:  # full fine-tuning of the LLM; the vision side stays frozen
            for name, p in adapter.model.named_parameters():
                p.requires_grad_(not any(mk in name for mk in VISION_MODULE_MARKERS))
            backbone = adapter.model
        if cfg.activation_checkpointing:
            # transformers >= 5.20 renamed gradient_checkpointing_enable; accept both
            enable = getattr(adapter.model, "activation_checkpointing_enable", None) or \
                adapter.model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            # transformers also hooks the input embeddings to require grad (needed only by reentrant
            # checkpointing); with use_reentrant=False that just builds graph for nothing
            adapter.model.disable_input_require_grads()
        # what DataLoader workers run: the step's samples -> tokens, pixels, GT targets (no weights there)
        self.prepared = PreparedSteps(self.data, adapter.preparer(), cfg.data.prompt, cfg.model.frame_mode,
                                      cfg.data.max_length)
        self.gasp_model = gm = GaspModel(backbone, adapter, self.heads, cfg.gasp)
        gm.train()
        adapter.vision_module().eval()  # frozen tower: no dropout, run under no_grad
        if cfg.fsdp2:  # before the optimizer: it must hold the sharded parameters
            shard_model(gm, adapter.decoder_layers(), acc.device)

        self.optimizer = torch.optim.AdamW(self.param_groups(gm), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        o = cfg.optim
        # Not prepared by accelerate on purpose: its AcceleratedScheduler steps num_processes times per call.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, o.warmup_steps, o.max_steps, o.schedule, o.min_lr_ratio))
        if cfg.fsdp2:  # already sharded: accelerate keeps the optimizer, autocast and accumulation
            self.model, self.optimizer = gm, acc.prepare(self.optimizer)
        else:
            self.model, self.optimizer = acc.prepare(gm, self.optimizer)
        self.trainable = [p for p in gm.parameters() if p.requires_grad]
        self.flops_per_token = flops_per_token(adapter)

        self.step = 0
        if resume_from is not None:
            self.step = restore_training_state(resume_from, accelerator=acc, model=self.model,
                                               optimizer=self.optimizer, scheduler=self.scheduler)
            self._print(f"resumed from {resume_from} at step {self.step}")
        elif resume:
            self._print(f"--resume: no checkpoint under {self.out_dir}; starting from step 0")
        self.resumed_from = resume_from

    # ---- setup helpers -------------------------------------------------------------------------
    def param_groups(self, gm: GaspModel) -> list[dict]:
        """Backbone trainables at lr, heads at head_lr_mult × lr (a separate, named group)."""
        head_ids = {id(p) for p in gm.heads.parameters()} if gm.heads is not None else set()
        backbone = [p for p in gm.parameters() if p.requires_grad and id(p) not in head_ids]
        if not backbone:
            raise ConfigError("lora/finetune settings leave no trainable backbone parameter")
        groups = [{"name": "backbone", "params": backbone, "lr": self.cfg.optim.lr}]
        if head_ids:
            groups.append({"name": "heads", "params": list(gm.heads.parameters()),
                           "lr": self.cfg.optim.lr * self.cfg.optim.head_lr_mult})
        return groups

    def _calibration_batch(self):
        """A fixed geometry batch (rank- and world-independent) for the heads' SVD-init calibration."""
        geo = self.data.geometry
        if geo is None:
            return None
        item = geo.sample(0, self.cfg.data.frames_min)
        return self.adapter.prepare_frames([item["frames"]], prompt=self.cfg.data.prompt,
                                           frame_mode=self.cfg.model.frame_mode).to(self.accelerator.device)

    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            print(msg, flush=True)

    # ---- one step --------------------------------------------------------------------------------
    def micro_batch(self, index: int, raw: dict | None = None) -> tuple[list[Part], dict]:
        """Micro-batch ``index`` -> (its parts on device, geometry first, then instruction; its record).

        ``raw`` is ``self.prepared[index]`` when a DataLoader worker already built it (tokens, pixels
        and targets are made there); else it is built here."""
        rec = self.prepared[index] if raw is None else raw
        dev = self.accelerator.device
        parts = [Part(p["batch"].to(dev, non_blocking=True), p["targets"],
                      p["rows"].to(dev) if p["rows"] is not None else None) for p in rec["parts"]]
        return parts, rec

    def forward_backward(self, index: int, raw: dict | None = None) -> dict[str, Any]:
        """Forward + backward of micro-batch ``index`` (gradients accumulate; no optimizer step): all its
        parts in one forward, so one backward carries L_LM + λ_corr·L_corr + λ_depth·L_depth."""
        t0 = time.perf_counter()
        parts, raw = self.micro_batch(index, raw)
        stats = raw["stats"]
        t_data = time.perf_counter() - t0
        # anchor subsampling: a generator seeded by the micro-step, so resume needs no extra state
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        acc = self.accelerator
        zero = torch.zeros(())
        out: dict[str, Any] = {"loss": zero, "lm": zero, "corr": zero, "depth": zero}
        with acc.accumulate(self.model):
            if parts:  # empty only for the LM-only control's micro-batches without instructions
                with acc.autocast():
                    out = self.model(parts, generator=gen)
                acc.backward(out["loss"])
        rec = {"kind": "".join(p.kind[0] for p in parts), "loss": out["loss"].detach().float().cpu(),
               "lm": out["lm"].float().cpu(), "corr": out["corr"].float().cpu(), "depth": out["depth"].float().cpu(),
               "n_pairs": float(out.get("n_pairs", zero).item()), "data_s": t_data,
               "samples": sum(p.batch.inputs["input_ids"].shape[0] for p in parts), **token_counts(parts),
               "bad_media_records": raw.get("bad_media", []), "turns_dropped": stats.get("turns_dropped", 0)}
        for k in ("per_layer_corr", "per_layer_depth"):
            if k in out:
                rec[k] = out[k].detach().float().cpu()
        return rec

    def optimizer_step(self) -> dict[str, float]:
        """Clip (global norm over backbone + heads), AdamW step, LR schedule step, zero grads."""
        acc = self.accelerator
        if not acc.sync_gradients:
            raise RuntimeError("optimizer_step called mid-accumulation")
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            norm = acc.clip_grad_norm_(self.trainable, clip)  # pre-clip total norm
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.trainable if p.grad is not None]))
        if norm is None and hasattr(self.model, "get_global_grad_norm"):  # DeepSpeed clips inside its engine
            norm = self.model.get_global_grad_norm()
        norm = getattr(norm, "full_tensor", lambda: norm)()  # FSDP2: a replicated DTensor
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm) if norm is not None else float("nan"),
                "lr": lrs.get("backbone", float("nan")), "head_lr": lrs.get("heads", float("nan"))}

    def train_step(self, step: int, raws: list[dict] | None = None, data_wait_s: float = 0.0) -> dict[str, Any]:
        """Optimizer step ``step`` (0-based): grad_accum micro-batches, then one update. Returns the log record.

        ``raws``: the step's micro-batches if a DataLoader prefetched them (else loaded here);
        ``data_wait_s``: the time spent waiting for them."""
        t0 = time.perf_counter()
        accum = self.cfg.optim.grad_accum
        raws = raws if raws is not None else [None] * accum
        micro = [self.forward_backward(step * accum + k, raws[k]) for k in range(accum)]
        rec = self.optimizer_step()
        dt = time.perf_counter() - t0 + data_wait_s
        self.step = step + 1
        return {"step": self.step, **self._reduce_terms(micro), **rec,
                "bad_media_records": [r for m in micro for r in m["bad_media_records"]],
                "turns_dropped": sum(m["turns_dropped"] for m in micro),
                "kinds": ",".join(m["kind"] for m in micro), "n_pairs": sum(m["n_pairs"] for m in micro),
                **throughput(micro, dt, data_wait_s + sum(m["data_s"] for m in micro), self.accelerator,
                             self.flops_per_token)}

    def _reduce_terms(self, micro: list[dict]) -> dict[str, Any]:
        """Each loss term averaged over the micro-batches that carry it (lm: instruction parts; corr,
        depth and their per-layer values: geometry parts), then over ranks (one small all-reduce;
        every rank has the same parts). A term no micro-batch carried is 0."""
        n_layers = len(self.heads.layer_indices) if self.heads is not None else 0
        carriers = {"loss": micro, "lm": [m for m in micro if "i" in m["kind"]],
                    "corr": [m for m in micro if "g" in m["kind"]]}
        carriers["depth"] = carriers["corr"]

        def mean(key: str, ms: list[dict], size: int | None = None) -> torch.Tensor:
            vals = [m[key].reshape(-1) for m in ms if key in m]
            return torch.stack(vals).mean(0) if vals else torch.zeros(size or 1)

        n_bad = torch.tensor([float(sum(len(m["bad_media_records"]) for m in micro))])
        flat = torch.cat([mean(k, carriers[k]) for k in ("loss", "lm", "corr", "depth")]
                         + [mean(k, carriers["corr"], n_layers) for k in ("per_layer_corr", "per_layer_depth")]
                         + [n_bad])
        flat = self.accelerator.reduce(flat.to(self.accelerator.device), reduction="mean").tolist()
        out = dict(zip(("loss", "lm", "corr", "depth"), flat[:4]))
        # the step's bad media over all ranks (a mean times the world: no second all-reduce)
        out["bad_media"] = int(round(flat[-1] * self.accelerator.num_processes))
        if n_layers:
            out["corr_per_layer"] = flat[4:4 + n_layers]
            out["depth_per_layer"] = flat[4 + n_layers:4 + 2 * n_layers]
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> Path:
        """Atomic checkpoint of the current step (call on every rank); prunes old ones."""
        root = self.out_dir / "checkpoints"
        path = save_checkpoint(root / f"step-{self.step:06d}", accelerator=self.accelerator, model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler, cfg=self.cfg, step=self.step,
                               output_dir=self.out_dir, keep_last=self.cfg.keep_last)
        return path

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> Path:
        """Train from ``self.step`` to ``optim.max_steps`` (or ``stop_at``, as if interrupted there) and
        return the last checkpoint written."""
        cfg, acc = self.cfg, self.accelerator
        end = cfg.optim.max_steps if stop_at is None else min(stop_at, cfg.optim.max_steps)
        main = acc.is_main_process
        log = tb = wandb_run = None
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.out_dir / ".config.yaml.tmp"
            save_config(cfg, tmp)
            os.replace(tmp, self.out_dir / "config.yaml")
            if cfg.data.manifest:  # which sequences this run trained on
                write_json_atomic(self.out_dir / "data_manifest.json",
                                  {"path": str(Path(cfg.data.manifest).expanduser().resolve()),
                                   **self.data.geometry.meta})
            log = JsonlLog(self.out_dir / "logs" / "train.jsonl", self.step if self.resumed_from else None)
            tb = self._tensorboard()
            wandb_run = self._wandb()
        bad_media = BadMediaTracker(self.out_dir, cfg.data, acc.num_processes, main,
                                    self.step if self.resumed_from else None, cfg.optim.grad_accum)
        bar = None
        if main and self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="gasp train", unit="step", dynamic_ncols=True)
        last = None
        window: list[dict] = []  # records since the last console line
        accum = cfg.optim.grad_accum
        prefetch = self._prefetch(self.step * accum, end * accum)
        try:
            while self.step < end:
                t_wait = time.perf_counter()
                raws = [next(prefetch) for _ in range(accum)] if prefetch is not None else None
                rec = self.train_step(self.step, raws, data_wait_s=time.perf_counter() - t_wait)
                records = rec.pop("bad_media_records")
                if rec["bad_media"] and acc.num_processes > 1:  # rare: collect every rank's records
                    from accelerate.utils import gather_object

                    records = gather_object(records)
                if main and records:
                    (bar.write if bar is not None else print)(
                        f"step {rec['step']}: skipped {len(records)} instruction sample(s) with bad media "
                        f"(logged in {bad_media.path})")
                bad_media.update(rec["step"], records, rec["bad_media"])
                if main:
                    log.write(rec)
                    scalars = step_scalars(rec, self.heads.layer_indices if self.heads is not None else [],
                                           lm_always=cfg.data.instruction_ratio == 0)
                    if tb is not None:
                        for k, v in scalars.items():
                            tb.add_scalar(k, v, rec["step"])
                    if wandb_run is not None:
                        wandb_run.log(scalars, step=rec["step"])
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lm=f"{rec['lm']:.3f}", corr=f"{rec['corr']:.3f}",
                                        depth=f"{rec['depth']:.3f}", refresh=False)
                    window.append(rec)
                    if "console" in cfg.report_to and (rec["step"] % cfg.log_every == 0 or rec["step"] == end):
                        (bar.write if bar is not None else print)(console_line(window))
                        window = []
                if self.step % cfg.save_every == 0 or self.step == end:
                    last = self.save()
        finally:
            if bar is not None:
                bar.close()
            if tb is not None:
                tb.close()
            if wandb_run is not None:
                wandb_run.finish()
        if last is None:  # nothing left to train (resumed at or past the end)
            last = latest_checkpoint(self.out_dir) or self.save()
        if main and self.heads is not None:
            plot_per_layer_losses(self.out_dir / "logs" / "train.jsonl", self.heads.layer_indices,
                                  self.out_dir / "plots" / "per_layer_losses.png")
        return last

    def _prefetch(self, start: int, stop: int):
        """Iterator over prepared micro-batches [start, stop) built by ``data.num_workers`` worker
        processes (decoding, targets, pixels and collation off the training process), pinned for an
        asynchronous copy to the GPU; None to build them in-line. One loader serves the whole run, so
        its workers persist."""
        d = self.cfg.data
        if d.num_workers <= 0 or stop <= start:
            return None
        loader = torch.utils.data.DataLoader(self.prepared, batch_size=None, sampler=range(start, stop),
                                             num_workers=d.num_workers, collate_fn=_keep_as_is,
                                             prefetch_factor=d.prefetch_factor,
                                             pin_memory=d.pin_memory and self.accelerator.device.type == "cuda")
        return iter(loader)

    def _wandb(self):
        if "wandb" not in self.cfg.report_to:
            return None
        try:
            import wandb
        except ImportError:
            print("report_to: wandb is not installed (pip install wandb); logging to logs/train.jsonl only")
            return None
        return wandb.init(project="gasp-vlm", name=self.out_dir.name, dir=str(self.out_dir),
                          config=self.cfg.to_dict(), resume="allow")

    def _tensorboard(self):
        if "tensorboard" not in self.cfg.report_to:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("report_to: tensorboard is not installed (pip install 'gasp-vlm[logging]'); "
                  "logging to logs/train.jsonl only")
            return None
        return SummaryWriter(str(self.out_dir / "tb"))


def _keep_as_is(raw: dict) -> dict:
    # DataLoader's default conversion would turn the numpy frames into tensors; keep them as loaded
    return raw


def train(cfg: TrainConfig, out_dir: str | Path | None = None, *, resume: bool | str | Path = False,
          progress: bool = True, stop_at: int | None = None) -> Path:
    """Train GASP (or a control) per ``cfg``; returns the final checkpoint directory.

    ``out_dir`` defaults to ``cfg.output_dir``. ``resume`` continues from ``out_dir``'s latest checkpoint
    (fresh start, with a note, when there is none); a path resumes from that checkpoint instead (its config
    must match as for ``resume=True``). ``stop_at`` ends after that many optimizer steps (with
    a checkpoint), as an interrupted job would; the LR schedule still follows ``optim.max_steps``.
    """
    recipe = GaspRecipe(cfg, Path(out_dir or cfg.output_dir), resume=resume, progress=progress)
    return recipe.run(stop_at=stop_at)
