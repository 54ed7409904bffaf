"""What one demo run is: its sizes (DemoPlan), the variants and the names they are reported under."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "demo_base.yaml"  # stage 0: the pretrained base
DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"  # stage 1: GASP with LoRA on that base

# Variant -> stage-1 config overrides (everything else is shared: data, steps, seeds, LoRA).
VARIANTS: dict[str, list[str]] = {
    "lm_only": ["gasp.lambda_corr=0", "gasp.lambda_depth=0"],
    "corr_only": ["gasp.lambda_depth=0"],
    "full": [],
}
MODELS: tuple[str, ...] = ("base", *VARIANTS)
LABELS = {"untrained": "untrained", "base": "pretrained base", "lm_only": "LM-only control",
          "corr_only": "GASP corr-only", "full": "GASP full"}
COLORS = {"untrained": "0.7", "base": "0.35", "lm_only": "tab:orange", "corr_only": "tab:blue", "full": "tab:green"}


class DemoError(RuntimeError):
    pass


@dataclass
class DemoPlan:
    """Sizes of one demo run (training hyper-parameters live in configs/demo_base.yaml and demo.yaml).

    Seeds: training rooms use data seed ``2*seed + 1000``, held-out rooms ``2*seed + 1001`` and the held-out
    questions their own task seed, so nothing is tuned on the held-out rooms."""

    train_scenes: int = 24
    heldout_scenes: int = 6
    scene_frames: int = 24  # rendered frames per scene
    size: int = 224  # square frames, 8x8 tokens of 28 px for Qwen
    camouflage_fraction: float = 0.34
    # stage 0 (pretraining the base): general tasks (one frame; a two-room image pair) + a small share of
    # spatial-format QA
    base_general: int = 150  # samples per general task
    base_spatial: int = 30  # samples per spatial task (the format, as a real VLM's pre-training has)
    base_steps: int | None = None  # None: configs/demo_base.yaml's optim.max_steps
    # stage 1 (GASP fine-tuning): non-spatial instructions only
    finetune_general: int = 60  # samples per general task
    max_steps: int | None = None  # None: configs/demo.yaml's optim.max_steps
    qa_clip_frames: int = 3  # frames of a spatial question's clip
    qa_clip_stride: int = 3  # frame steps between them
    heldout_questions: int = 25  # per spatial task, from the held-out rooms
    diag_sequences: int = 24  # held-out sequences per diagnosis
    diag_frames: int = 8  # the anchor (first) + 7 targets
    diag_gap_stride: int = 3  # targets at gaps 3, 6, ..., 21 frames after the anchor
    # trainings run side by side, each in its own process with cpu_count // jobs torch threads
    jobs: int = 3
    seed: int = 0
    # config overrides of this plan (before the user's --set, which win): stage 0 and stage 1
    base_overrides: tuple[str, ...] = ()
    config_overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> "DemoPlan":
        """About 1.5 minutes on 2 cores: small data, a 2-layer model, few steps -- checks every stage and
        a measurable (small) lift of GASP's qk matching over the control, which the tests assert."""
        return cls(train_scenes=6, heldout_scenes=2, scene_frames=16, camouflage_fraction=0.5, base_general=30,
                   base_spatial=10, base_steps=60, finetune_general=10, max_steps=250, heldout_questions=6,
                   diag_sequences=8, diag_frames=6, diag_gap_stride=2,
                   base_overrides=("model.overrides={num_hidden_layers: 2}", "save_every=1000"),
                   config_overrides=("save_every=1000",))
