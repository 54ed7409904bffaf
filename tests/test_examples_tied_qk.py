"""examples/miniature/tied_qk_base.py: the written folder loads as a model whose keys equal its queries."""

import runpy
from pathlib import Path

import torch

from gasp_vlm.models import load_adapter

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "miniature" / "tied_qk_base.py"


def test_tied_base_loads_with_keys_equal_to_queries(tmp_path):
    mod = runpy.run_path(str(SCRIPT))
    out = mod["main"](str(tmp_path / "tied"), layers=2)
    model = load_adapter(str(out)).model
    cfg = model.config.get_text_config()
    hd = cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    layers = model.model.language_model.layers
    assert len(layers) == 2
    x = torch.randn(5, cfg.hidden_size)
    for layer in layers:
        q = layer.self_attn.q_proj(x).view(5, cfg.num_attention_heads, hd)
        k = layer.self_attn.k_proj(x).view(5, cfg.num_key_value_heads, hd)
        for j in range(cfg.num_key_value_heads):
            torch.testing.assert_close(k[:, j], q[:, j * group])  # the group's first query head
        assert not torch.allclose(k[:, 0], q[:, 1])  # the other query heads are untouched
