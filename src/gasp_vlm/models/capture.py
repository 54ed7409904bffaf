"""Per-layer capture of visual-token features in one forward pass.

Hooks slice every captured tensor to the visual rows *inside* the hook, so at most one layer's
full-sequence activations exist at a time (the model's own) and only (B, N_visual, ·) slices are kept.

Captured per decoder layer l:
- ``hidden[l]``  (B, N, D)      output of layer l (keeps its autograd graph when grad is enabled; the
                                 last layer is taken *before* the final norm, unlike output_hidden_states).
                                 With ``hidden_from_next_input`` it is the stream layer l+1 reads: the same
                                 tensor, except where the model adds features between layers (Qwen3-VL's
                                 DeepStack adds vision-layer features to the visual tokens after layers 0..k)
- ``q[l]``       (B, N, H*hd)   pre-RoPE query: q_proj's output, after the per-head ``q_norm`` where the
                                 attention has one (Qwen3's QK-norm), i.e. what RoPE is applied to
- ``k[l]``       (B, N, H*hd)   the same for keys (k_proj, ``k_norm``), GQA kv heads repeated to the H query heads
- ``q_rope[l]``, ``k_rope[l]``  the same after the model's own rotary (M-RoPE for Qwen, 1-D for Llama),
                                 applied with the attention module's own ``apply_rotary_pos_emb``

Why hooks and not ``output_hidden_states``: we need q/k (not exposed) and want visual rows only.
Hooks never run a loss inside a decoder layer (that silently loses gradients under reentrant
checkpointing); heads and losses run after the forward on the captured slices.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

CAPTURE_KINDS = ("hidden", "q", "k", "q_rope", "k_rope")


@dataclass
class CaptureResult:
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    q_rope: dict[int, torch.Tensor] = field(default_factory=dict)
    k_rope: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, S, C), rows (B, N) long -> (B, N, C)."""
    return torch.gather(x, 1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _repeat_kv(k: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """(B, N, Hkv*hd) -> (B, N, H*hd): each kv head serves num_heads/Hkv consecutive query heads."""
    b, n, c = k.shape
    hkv = c // head_dim
    if hkv == num_heads:
        return k
    k = k.view(b, n, hkv, head_dim).repeat_interleave(num_heads // hkv, dim=2)
    return k.reshape(b, n, num_heads * head_dim)


@contextlib.contextmanager
def capture_visual_features(
    decoder_layers: Sequence[nn.Module],
    rows: torch.Tensor,
    what: Sequence[str],
    layers: Sequence[int] | None,
    num_heads: int,
    head_dim: int,
    hidden_from_next_input: bool = False,
) -> Iterator[CaptureResult]:
    """Register capture hooks for the duration of one forward.

    rows: (B, N) long — sequence index of each visual token of each sample (same N for all).
    """
    unknown = set(what) - set(CAPTURE_KINDS)
    if unknown:
        raise ValueError(f"unknown capture kinds {sorted(unknown)}; choose from {CAPTURE_KINDS}")
    layer_ids = list(range(len(decoder_layers))) if layers is None else list(layers)
    result = CaptureResult()
    handles: list[torch.utils.hooks.RemovableHandle] = []
    want_rope = "q_rope" in what or "k_rope" in what
    pre_q: dict[int, torch.Tensor] = {}
    pre_k: dict[int, torch.Tensor] = {}
    rope_cs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    for l in layer_ids:
        layer = decoder_layers[l]
        attn = layer.self_attn
        if "hidden" in what and hidden_from_next_input and l + 1 < len(decoder_layers):
            def next_input_hook(mod, args, kwargs, l=l):
                h = args[0] if args else kwargs["hidden_states"]
                result.hidden[l] = _gather_rows(h, rows)
            handles.append(decoder_layers[l + 1].register_forward_pre_hook(next_input_hook, with_kwargs=True))
        elif "hidden" in what:
            def hidden_hook(mod, args, out, l=l):
                h = out[0] if isinstance(out, tuple) else out
                result.hidden[l] = _gather_rows(h, rows)
            handles.append(layer.register_forward_hook(hidden_hook))
        # QK-norm (Qwen3): its (B, S, heads, hd) output is the query RoPE rotates, so capture that
        q_mod = attn.q_norm if getattr(attn, "q_norm", None) is not None else attn.q_proj
        k_mod = attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj
        if "q" in what or want_rope:
            def q_hook(mod, args, out, l=l):
                pre_q[l] = _gather_rows(out.flatten(2), rows)
            handles.append(q_mod.register_forward_hook(q_hook))
        if "k" in what or want_rope:
            def k_hook(mod, args, out, l=l):
                pre_k[l] = _gather_rows(out.flatten(2), rows)
            handles.append(k_mod.register_forward_hook(k_hook))
        if want_rope:
            def attn_pre_hook(mod, args, kwargs, l=l):
                cos, sin = kwargs["position_embeddings"]  # (B, S, hd) each
                rope_cs[l] = (_gather_rows(cos, rows), _gather_rows(sin, rows))
            handles.append(attn.register_forward_pre_hook(attn_pre_hook, with_kwargs=True))
    try:
        yield result
    finally:
        for h in handles:
            h.remove()

    for l in layer_ids:
        if l not in pre_q and l not in pre_k:
            continue
        q = pre_q.get(l)
        k = _repeat_kv(pre_k[l], num_heads, head_dim) if l in pre_k else None
        if "q" in what:
            result.q[l] = q
        if "k" in what:
            result.k[l] = k
        if want_rope:
            attn = decoder_layers[l].self_attn
            # The model's own rotary function, from the module that defines its attention class.
            apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            cos, sin = rope_cs[l]
            b, n, _ = q.shape
            qh = q.view(b, n, num_heads, head_dim).transpose(1, 2)  # (B, H, N, hd)
            kh = k.view(b, n, num_heads, head_dim).transpose(1, 2)
            q_r, k_r = apply_rope(qh, kh, cos, sin)
            result.q_rope[l] = q_r.transpose(1, 2).reshape(b, n, -1)
            result.k_rope[l] = k_r.transpose(1, 2).reshape(b, n, -1)
