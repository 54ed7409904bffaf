"""The paper's experiment in miniature (issue 15), all on CPU with nothing downloaded (`gasp demo`):

0. ``data``: synthetic rooms (train / held-out seeds) and three question sets (demo/data.py);
1. ``base``: a tiny random-initialised Qwen2.5-VL pretrained with the project's trainer on general
   tasks (single-frame, and a two-room image pair) plus a small share of spatial-format QA -- the "pretrained VLM" (demo/training.py);
2. ``variants``: LoRA on that base, heads at 4x, three ways on identical data/steps/seeds with
   non-spatial instructions only -- LM-only control (λ = 0), GASP corr-only, GASP full;
3. ``diagnose``: the paper's diagnostic (anchor = first frame, growing gaps, both directions) on
   held-out rooms (demo/diagnosis.py);
4. ``downstream``: held-out spatial QA by exact match (demo/downstream.py);
5. ``report``: report.json / report.md + plots, each target met / not met (demo/report.py, plots.py).
"""

from gasp_vlm.demo.diagnosis import DIAG_MODES, heldout_indices, lookalike_pck
from gasp_vlm.demo.plan import BASE_CONFIG, DEFAULT_CONFIG, LABELS, MODELS, VARIANTS, DemoError, DemoPlan
from gasp_vlm.demo.report import aggregate_seeds, check_targets, console_table
from gasp_vlm.demo.run import run_demo, run_demo_seeds

__all__ = ["BASE_CONFIG", "DEFAULT_CONFIG", "DIAG_MODES", "LABELS", "MODELS", "VARIANTS", "DemoError", "DemoPlan",
           "aggregate_seeds", "check_targets", "console_table", "heldout_indices", "lookalike_pck", "run_demo",
           "run_demo_seeds"]
