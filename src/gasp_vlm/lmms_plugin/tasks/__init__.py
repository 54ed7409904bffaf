"""Task folder lmms-eval adds to its include path for ``LMMS_EVAL_PLUGINS=gasp_vlm.lmms_plugin`` (it requires
one); gasp-vlm ships no lmms-eval tasks, pass your own with ``--include_path``."""
