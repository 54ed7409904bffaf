"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a GaspModel, and its per-rank checkpoint state.

Sharding (``fsdp2: true`` in the training config): every LLM decoder layer is its own FSDP unit (its
parameters all-gathered just before it runs and freed after), then the root GaspModel holds the rest:
embeddings, LM head, the frozen vision tower and the correspondence heads (gathered at the root's
forward). LoRA and head parameters are sharded like the rest; their gradients are reduce-scattered
(averaged over ranks), so a step equals one process accumulating the same global batch (tested, gloo).
accelerate does not wrap the model (its FSDP path needs CUDA, and a second wrapper would add DDP); it
still owns the process group, autocast, gradient accumulation and the optimizer.

Checkpoints: each rank writes its own shard file (``shards/rank{r}``: its local slices of every
trainable parameter and of their optimizer state), so resuming reads no other rank's data and needs no
shared file system beyond the checkpoint folder each node holds; rank 0 also writes the gathered
trainable weights in the usual layout (adapter/ or llm.safetensors, heads.safetensors), so export,
diagnose and eval read an FSDP2 checkpoint like any other. The frozen base is never written.
A resume must use the same world size (the shards are the slices of that many ranks; checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from gasp_vlm.io import load_tree, save_tree


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(gm: nn.Module, decoder_layers: nn.ModuleList, device: torch.device) -> nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer, then the root (needs an initialised process group)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("fsdp2 needs a distributed launch (torchrun / accelerate launch)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(gm, mesh=mesh)
    return gm


def _local(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_trainable_state(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter as its own contiguous CPU copy (safetensors-ready: no shared storage),
    keyed by its GaspModel name; an FSDP2 parameter is gathered first, a collective: then call on every
    rank (only trainable parameters travel: the LoRA / heads, never the frozen base)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in gm.named_parameters():
        if p.requires_grad:
            t = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
            out[name] = t.cpu().clone(memory_format=torch.contiguous_format)
    return out


def _optimizer_names(gm: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """GaspModel names of the optimizer's parameters in its state-dict index order (saved by name, so a
    shard does not depend on the order parameters were grouped in)."""
    name_of = {id(p): n for n, p in gm.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def save_rank_shard(gm: nn.Module, optimizer: torch.optim.Optimizer, stem: Path, world: int) -> None:
    """This rank's slices of the trainable parameters and of their optimizer state -> ``stem``.{json,safetensors}."""
    params = {n: _local(p.detach()).cpu() for n, p in gm.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    by_index = _optimizer_names(gm, optimizer)
    state = {by_index[i]: {k: _local(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in opt["state"].items()}
    save_tree({"world": world, "params": params, "optim_state": state,
               "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]}, stem)


def load_rank_shard(gm: nn.Module, optimizer: torch.optim.Optimizer, stem: Path, world: int) -> None:
    """Inverse of ``save_rank_shard`` on a model sharded the same way (same world size)."""
    from torch.distributed.tensor import DTensor

    tree = load_tree(stem)
    if int(tree["world"]) != world:
        raise ValueError(f"{stem}: written by {tree['world']} ranks, this run has {world}; resume with the same "
                         f"world size (or export the checkpoint and start a new run from it)")
    named = dict(gm.named_parameters())
    with torch.no_grad():
        for n, t in tree["params"].items():
            _local(named[n]).copy_(t)

    def back(p: torch.Tensor, v: Any) -> Any:  # a saved local slice -> a DTensor laid out like its parameter
        if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0:
            return DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())
        return v

    index = {n: i for i, n in enumerate(_optimizer_names(gm, optimizer))}
    state = {index[n]: {k: back(named[n], v) for k, v in s.items()} for n, s in tree["optim_state"].items()}
    groups = optimizer.state_dict()["param_groups"]
    for g, saved in zip(groups, tree["param_groups"]):
        g.update(saved)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
