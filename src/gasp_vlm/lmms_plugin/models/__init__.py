"""lmms-eval's legacy plugin contract (``LMMS_EVAL_PLUGINS=gasp_vlm.lmms_plugin``): model name -> class name,
the class living in ``gasp_vlm.lmms_plugin.models.<name>``."""

AVAILABLE_MODELS = {"gasp": "GaspLMM"}
