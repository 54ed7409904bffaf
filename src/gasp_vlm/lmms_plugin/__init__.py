"""lmms-eval model plugin: ``lmms_eval --model gasp --model_args pretrained=DIR ...`` runs any gasp-vlm model
(preset, HF folder, ``gasp export`` folder) with gasp-vlm's own preprocessing (models/gasp.py).

Registered two ways lmms-eval reads: the entry point ``lmms_eval.models: gasp`` (pyproject.toml, active once
gasp-vlm is installed, it calls ``manifest``) and the legacy ``LMMS_EVAL_PLUGINS=gasp_vlm.lmms_plugin``
(``models.AVAILABLE_MODELS``). Nothing here imports lmms-eval until it asks.
"""

from __future__ import annotations

MODEL_CLASS = "gasp_vlm.lmms_plugin.models.gasp.GaspLMM"


def manifest():
    """The ``lmms_eval.models`` entry point payload: the ``gasp`` model's manifest."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="gasp", simple_class_path=MODEL_CLASS)
