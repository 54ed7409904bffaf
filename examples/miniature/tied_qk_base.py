"""The miniature's "content-matching attention" experiment (README, *The miniature experiment*).

Writes the demo's random-initialised tiny Qwen2.5-VL (4 decoder layers) with every decoder layer's
``k_proj`` set equal to its ``q_proj`` (key head j takes the rows of the first query head of its group,
biases too): q·k is then a content similarity from the start, a stand-in for the matching heads a real
LLM's text pretraining gives it. Use it as stage 0's starting point::

    python examples/miniature/tied_qk_base.py runs/tied_init
    gasp demo --out runs/demo_tied --base-set model.name=runs/tied_init --base-set "model.overrides={}"
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gasp_vlm.models import load_adapter
from gasp_vlm.models.processors import write_processor_files


def tie_keys_to_queries(model: torch.nn.Module) -> int:
    """Copy each LLM decoder layer's query rows into its key projection (GQA: one query head per key head);
    returns the number of layers tied."""
    cfg = model.config.get_text_config()
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv_heads
    tied = 0
    with torch.no_grad():
        for name, attn in model.named_modules():
            if "language_model" not in name or not name.endswith("self_attn"):
                continue
            for j in range(kv_heads):
                src = slice(j * group * head_dim, (j * group + 1) * head_dim)  # first query head of group j
                dst = slice(j * head_dim, (j + 1) * head_dim)
                attn.k_proj.weight[dst] = attn.q_proj.weight[src]
                if attn.k_proj.bias is not None and attn.q_proj.bias is not None:
                    attn.k_proj.bias[dst] = attn.q_proj.bias[src]
            tied += 1
    return tied


def main(out: str, layers: int = 4, seed: int = 0) -> Path:
    adapter = load_adapter("tiny-qwen2.5-vl", overrides={"num_hidden_layers": layers}, seed=seed)
    n = tie_keys_to_queries(adapter.model)
    out_dir = Path(out)
    adapter.save_pretrained(out_dir)
    write_processor_files(adapter, out_dir)  # a complete model folder: load_adapter refuses one without them
    print(f"wrote {out_dir} ({n} decoder layers with k_proj = q_proj)")
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/miniature/tied_qk_base.py OUT_DIR")
    main(sys.argv[1])
