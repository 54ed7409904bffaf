"""Training configuration: nested dataclasses loaded from YAML, with ``--set a.b=value`` overrides.

Every value is type-checked against its field; unknown keys are errors naming the key and the file.
Sections: model, lora, gasp (GaspLossConfig: heads + loss weights), optim, data, and run-level fields.

lora.enabled: true (the paper: LoRA on the LLM decoder, r = 512 for the 7B models) or false = full
fine-tuning of every LLM parameter (embeddings, decoder, final norm, lm_head); the vision tower and
projector stay frozen either way. Full training is the sensible choice for the random-initialised
presets: a low-rank update of random weights has little to work with, and a ~5 M-parameter LLM is cheap.

The three variants of the miniature experiment (demo.py) differ only in config:
    LM-only control      gasp.lambda_corr=0 gasp.lambda_depth=0   (no heads are built)
    correspondence-only  gasp.lambda_depth=0                      (InfoNCE, no depth term)
    full GASP            both lambdas > 0
All three see the same data stream (the same geometry and instruction steps).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gasp_vlm.method.gasp import GaspLossConfig
from gasp_vlm.train.instructions.video import SAMPLINGS, SEEK_MODES
from gasp_vlm.train.lora import LLM_LORA_PATTERN


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    name: str = "tiny-qwen2.5-vl"  # preset name, local HF directory or hub id
    dtype: str = "float32"  # weights dtype: float32 | bfloat16
    frame_mode: str | None = None  # None = the family's default (Qwen: video_dup)
    overrides: dict = field(default_factory=dict)  # preset config overrides, e.g. {num_hidden_layers: 2}
    attn_implementation: str = "sdpa"
    seed: int = 0  # preset init seed
    min_pixels: int | None = None  # Qwen families: per-frame pixel budget (None = the checkpoint's own)
    max_pixels: int | None = None


@dataclass
class LoraSettings:
    enabled: bool = True  # false = full fine-tuning of the LLM (vision side frozen)
    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    pattern: str = LLM_LORA_PATTERN
    rslora: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    head_lr_mult: float = 4.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    max_steps: int = 1000
    # passes over the geometry sequences; when set, it decides max_steps (recipe.steps_for_epochs)
    epochs: float | None = None
    grad_clip: float = 1.0  # max global grad norm (0 = no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of the peak


@dataclass
class DataConfig:
    geometry: list[str] = field(default_factory=list)  # scene folders, or "toy" (built-in, see toy_geometry.py)
    # a sequence manifest (`gasp data manifest`, data/manifest.py) instead of scanning geometry folders:
    # each rank reads only its shards; scene metadata loads on first use
    manifest: str | None = None
    manifest_id: str | None = None  # filled in by the trainer from the manifest (a resume checks it)
    toy_sequences: int = 64  # size of the built-in toy set
    frame_hw: list[int] = field(default_factory=lambda: [112, 112])  # toy frame size
    frames_min: int = 8
    frames_max: int = 24
    window_radius: int = 48  # frames sampled within ± this of the anchor frame
    grid: str = "coarse"  # target grid for data/targets.py: coarse | fine
    # one: the paper's single anchor frame per sequence | all: every frame in turn (scene folders; the
    # built-in toy source always anchors frame 0)
    anchors: str = "one"
    cache_frames: bool = False  # keep decoded scene frames in memory (small datasets such as the demo's)
    # auto: in scenes with sparse depth (DL3DV from SfM points) queries snap to a valid pixel of their token
    # and token depth averages whatever points a token holds | on | off (data/sequences.py)
    snap_queries: str = "auto"
    # a mixture YAML (train/instructions/mixture.py), one LLaVA-Video-178K style JSON, or "generated"
    instructions: str | None = None
    generated_instructions: int = 32  # size of the "generated" set
    media_root: str | None = None  # single JSON only (a mixture names its own); default: the JSON's folder
    instruction_ratio: float = 0.0  # fraction of micro-batches that add an instruction part to their geometry part
    instruction_frames: int = 8  # frames per video (uniform) or the cap (fps)
    video_sampling: str = "uniform"  # uniform | fps (qwen-vl-utils' rule: video_fps frames per second, capped)
    video_fps: float = 2.0
    video_min_frames: int = 4  # fps sampling only
    video_max_pixels: int | None = 448 * 448  # per decoded frame, aspect kept, resized while decoding
    # exact frames | nearest_key (a frame within video_seek_tolerance_s of a keyframe moves to it, the rest
    # exact: approximate) | keyframe (the keyframe at or before each: fastest, approximate)
    video_seek: str = "exact"
    video_seek_tolerance_s: float = 1.0
    decode_threads: int = 1  # decoder threads per loader process
    max_length: int | None = None  # instruction sample tokens; longer ones lose trailing turns (never visual tokens)
    max_bad_media_fraction: float = 0.01  # stop when more of the instruction samples tried so far are bad
    bad_media_min_tries: int = 100  # ...but only after this many were tried
    prompt: str = "Describe the scene."  # user text of geometry samples (they carry no answer)
    batch_size: int = 1
    num_workers: int = 0  # DataLoader processes building each step's tokens, pixels and targets
    prefetch_factor: int = 2  # steps each worker prepares ahead
    pin_memory: bool = True  # page-locked batches for an asynchronous host->GPU copy (CUDA only)
    seed: int = 0


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    gasp: GaspLossConfig = field(default_factory=GaspLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: str = "auto"  # auto (bf16 autocast when CUDA supports it, else fp32) | bf16 | fp32
    activation_checkpointing: bool = True  # non-reentrant
    output_dir: str = "runs/train"
    save_every: int = 500  # optimizer steps between checkpoints (the final step is always saved)
    keep_last: int = 2  # newest step checkpoints kept on disk
    log_every: int = 10  # console/tensorboard cadence; the jsonl log gets every step
    report_to: list[str] = field(default_factory=lambda: ["console", "tensorboard"])
    deepspeed: str | None = None  # DeepSpeed JSON (e.g. configs/deepspeed/zero2.json); "auto" fields are filled
    # FSDP2 (torch fully_shard): one unit per decoder layer + the root, per-rank checkpoint shards (train/fsdp.py)
    fsdp2: bool = False
    seed: int = 0

    @property
    def finetune(self) -> str:
        return "lora" if self.lora.enabled else "full"

    def validate(self, where: str = "<config>", origins: dict[str, str] | None = None) -> "TrainConfig":
        """Range checks; an error names the key and where it was set (``origins``: key -> "--set ...",
        else ``where``, the config file)."""
        checks = [
            (self.lora.r > 0, "lora.r", "must be > 0"),
            (not (self.fsdp2 and self.deepspeed), "fsdp2", "cannot be combined with deepspeed: choose one engine"),
            (self.optim.lr > 0, "optim.lr", "must be > 0"),
            (self.optim.head_lr_mult > 0, "optim.head_lr_mult", "must be > 0"),
            (self.optim.grad_accum >= 1, "optim.grad_accum", "must be >= 1"),
            (self.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (len(self.optim.betas) == 2, "optim.betas", "needs two values"),
            (self.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be float32 | bfloat16"),
            (self.gasp.lambda_corr >= 0, "gasp.lambda_corr", "loss weights must be >= 0"),
            (self.gasp.lambda_depth >= 0, "gasp.lambda_depth", "loss weights must be >= 0"),
            (self.gasp.tau > 0, "gasp.tau", "must be > 0"),
            (self.gasp.head_init in ("svd", "random"), "gasp.head_init", "must be svd | random"),
            (self.gasp.head_init_layer in ("same", "next"), "gasp.head_init_layer", "must be same | next"),
            (self.gasp.head_norm in ("none", "rms"), "gasp.head_norm", "must be none | rms"),
            (len(self.data.frame_hw) == 2, "data.frame_hw", "needs [height, width]"),
            (self.save_every > 0, "save_every", "must be > 0"),
            (self.keep_last >= 1, "keep_last", "must be >= 1"),
            (self.precision in ("auto", "bf16", "fp32"), "precision", "must be auto | bf16 | fp32"),
            (self.optim.schedule in ("cosine", "constant"), "optim.schedule", "must be cosine | constant"),
            (self.data.grid in ("coarse", "fine"), "data.grid", "must be coarse | fine"),
            (self.data.snap_queries in ("auto", "on", "off"), "data.snap_queries", "must be auto | on | off"),
            (self.data.anchors in ("one", "all"), "data.anchors", "must be one | all"),
            (1 <= self.data.frames_min <= self.data.frames_max, "data.frames_min",
             "needs 1 <= frames_min <= frames_max"),
            (0.0 <= self.data.instruction_ratio <= 1.0, "data.instruction_ratio", "must be in [0, 1]"),
            (self.data.instruction_ratio == 0 or self.data.instructions, "data.instructions",
             "instruction_ratio > 0 needs an instruction JSON or mixture YAML"),
            (self.data.video_sampling in SAMPLINGS, "data.video_sampling", f"must be {' | '.join(SAMPLINGS)}"),
            (self.data.video_seek in SEEK_MODES, "data.video_seek", f"must be {' | '.join(SEEK_MODES)}"),
            (self.data.video_seek_tolerance_s >= 0, "data.video_seek_tolerance_s", "must be >= 0"),
            (self.data.video_fps > 0, "data.video_fps", "must be > 0"),
            (self.data.instruction_frames >= 1 and self.data.video_min_frames >= 1, "data.instruction_frames",
             "instruction_frames and video_min_frames must be >= 1"),
            (self.data.decode_threads >= 1, "data.decode_threads", "must be >= 1"),
            (self.data.video_max_pixels is None or self.data.video_max_pixels >= 64, "data.video_max_pixels",
             "must be >= 64 (or null: original size)"),
            (self.data.max_length is None or self.data.max_length > 0, "data.max_length", "must be > 0 (or null)"),
            (0.0 <= self.data.max_bad_media_fraction <= 1.0, "data.max_bad_media_fraction", "must be in [0, 1]"),
            (self.data.bad_media_min_tries >= 1, "data.bad_media_min_tries", "must be >= 1"),
            (self.data.instruction_ratio == 1 or bool(self.data.geometry) or bool(self.data.manifest), "data.geometry",
             "needs at least one geometry source (a scene folder, 'toy' or data.manifest) unless "
             "instruction_ratio = 1"),
            (not (self.data.manifest and self.data.geometry), "data.manifest",
             "set either data.manifest or data.geometry, not both (a manifest already names its datasets)"),
            (self.optim.max_steps > 0, "optim.max_steps", "must be > 0"),
            (self.optim.epochs is None or self.optim.epochs > 0, "optim.epochs", "must be > 0 (or null: use max_steps)"),
            (self.data.batch_size > 0, "data.batch_size", "must be > 0"),
            (all(r in ("console", "tensorboard", "wandb") for r in self.report_to), "report_to",
             "entries must be console | tensorboard | wandb"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"{(origins or {}).get(key, where)}: config key {key!r}: {msg}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Typed loading
# ------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str, origins: dict[str, str]) -> Any:
    """Check ``value`` against annotation ``tp`` (int -> float allowed); nested dataclasses recurse.
    ``origins`` maps keys set by ``--set`` to that option, so an error names what the user typed."""
    where = origins.get(key, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key, where, origins)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: key {key!r} expects {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r} is a section; expected a mapping, got {value!r}")
        return _from_dict(tp, value, where, prefix=f"{key}.", origins=origins)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key {key!r} expects a list, got {value!r}")
        (arm,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, arm, f"{key}[{i}]", where, origins) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _from_dict(cls: type, data: dict, where: str, prefix: str = "", origins: dict[str, str] | None = None) -> Any:
    origins = origins or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{origins.get(prefix + unknown[0], where)}: unknown key {prefix + unknown[0]!r} (section {prefix.rstrip('.') or 'top'} "
                          f"accepts: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k, where, origins) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: cannot set {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 3e-4); the value is parsed as YAML (numbers, lists, null, ...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, _fix_yaml_floats(value)  # the same YAML 1.1 fix as for config files


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML (YAML 1.1) reads '1e-4' as a string; turn such scientific-notation strings into floats."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str):
        try:
            if "e" in node.lower() and node.lower() not in ("true", "false") and float(node) == float(node):
                return float(node)
        except ValueError:
            return node
    return node


def config_from_dict(data: dict, overrides: list[str] | None = None, where: str = "<config>") -> TrainConfig:
    data = _fix_yaml_floats(dict(data or {}))
    origins: dict[str, str] = {}  # dotted key -> the --set option that gave it
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(data, key, value, f"--set {item}")
        origins[key] = f"--set {item}"
    return _from_dict(TrainConfig, data, where, origins=origins).validate(where, origins)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or None for the defaults) + ``key=value`` overrides -> validated TrainConfig."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        where = str(p)
    return config_from_dict(data, overrides, where)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
