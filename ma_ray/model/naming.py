"""Layout-independent parameter naming and seeded initialisation.

Every parameter of the model has a *global name* that does not depend on how the model is cut:

    embed.tokens, embed.positions
    layers.{l}.ln1.{weight,bias}, layers.{l}.ln2.{weight,bias}
    layers.{l}.attn.heads.{h}.{q,k,v}_weight, layers.{l}.attn.heads.{h}.{q,v}_bias,
    layers.{l}.attn.heads.{h}.o_weight (no key bias: see ma_ray.model.attention)
    layers.{l}.attn.o_bias, layers.{l}.router.weight
    layers.{l}.experts.{e}.{fc1,fc2}_{weight,bias}
    final_ln.{weight,bias}, lm_head.weight

A module that holds some of these (the reference model, an attention shard, an expert group)
lists them with ``global_slices()``: (global name, local parameter name, dim, start, stop) where
the global tensor is the slice ``local[start:stop]`` along ``dim`` (``dim=None``: the whole local
tensor). The same slices cut gradients and optimizer moments, so moving heads or experts between
GPUs and writing checkpoints all go through this one table.

Initialisation is per global name from a generator seeded by (seed, name), so a shard initialises
exactly the numbers the reference would, without anyone materialising the full model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class GlobalSlice:
    name: str  # global name
    local: str  # name of the local parameter in the module
    dim: Optional[int] = None
    start: int = 0
    stop: int = 0

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The part of ``tensor`` (the local parameter, its grad or a moment) this name covers."""
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)


def head_slices(prefix: str, local_prefix: str, heads: Iterable[int], head_dim: int) -> Iterator[GlobalSlice]:
    """Slices of packed Q/K/V rows and O columns for ``heads`` stored in that order."""
    for i, h in enumerate(heads):
        lo, hi = i * head_dim, (i + 1) * head_dim
        for part in ("q", "k", "v"):
            yield GlobalSlice(f"{prefix}.heads.{h}.{part}_weight", f"{local_prefix}{part}_weight", 0, lo, hi)
            if part != "k":
                yield GlobalSlice(f"{prefix}.heads.{h}.{part}_bias", f"{local_prefix}{part}_bias", 0, lo, hi)
        yield GlobalSlice(f"{prefix}.heads.{h}.o_weight", f"{local_prefix}o_weight", 1, lo, hi)


def expert_slices(prefix: str, local_prefix: str, experts: Iterable[int]) -> Iterator[GlobalSlice]:
    """Slices of expert weights stacked along dim 0 for ``experts`` stored in that order."""
    for i, e in enumerate(experts):
        for part in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
            yield GlobalSlice(f"{prefix}.experts.{e}.{part}", f"{local_prefix}{part}", 0, i, i + 1)


def _squeeze_expert(s: GlobalSlice, t: torch.Tensor) -> torch.Tensor:
    # Expert slices keep a leading dim of 1 locally; the global tensor has no such dim.
    return t.squeeze(0) if ".experts." in s.name and s.dim == 0 and s.stop - s.start == 1 else t


def global_view(s: GlobalSlice, tensor: torch.Tensor) -> torch.Tensor:
    """The global tensor ``s.name`` as a view of ``tensor`` (its local parameter, grad or moment):
    no copy, so it shares (and keeps alive) the local tensor's storage."""
    return _squeeze_expert(s, s.view(tensor))


def global_views(module: nn.Module, slices: Iterable[GlobalSlice], which: str = "param",
                 optimizer: Optional[torch.optim.Optimizer] = None, key: str = "") -> Dict[str, torch.Tensor]:
    """Parameters (``which="param"``), their grads (``"grad"``) or an optimizer state entry
    (``"state"`` with ``key``, e.g. ``exp_avg``) by global name, as views of the local tensors."""
    params = dict(module.named_parameters())
    out: Dict[str, torch.Tensor] = {}
    for s in slices:
        p = params[s.local]
        if which == "param":
            src = p.detach()
        elif which == "grad":
            # No grad means the parameter took no part (an expert no token reached): zero.
            src = p.grad if p.grad is not None else torch.zeros_like(p)
        else:
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            if key not in state:
                continue
            src = state[key]
        out[s.name] = global_view(s, src)
    return out


def export_global(module: nn.Module, slices: Iterable[GlobalSlice], which: str = "param",
                  optimizer: Optional[torch.optim.Optimizer] = None, key: str = "") -> Dict[str, torch.Tensor]:
    """Copy out parameters, grads or an optimizer state entry by global name (``global_views``)."""
    return {name: t.clone() for name, t in global_views(module, slices, which, optimizer, key).items()}


def import_global(module: nn.Module, slices: Iterable[GlobalSlice], tensors: Dict[str, torch.Tensor],
                  targets: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Copy tensors in by global name; every slice of the module must be present. ``targets``
    (local parameter name -> tensor of its shape, e.g. an AdamW moment) default to the parameters."""
    targets = dict(module.named_parameters()) if targets is None else targets
    with torch.no_grad():
        for s in slices:
            if s.name not in tensors:
                raise KeyError(f"missing parameter {s.name}")
            dst = s.view(targets[s.local])
            dst.copy_(tensors[s.name].reshape(dst.shape))


# --- initialisation --------------------------------------------------------------------------

def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def init_value(name: str, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    """The initial value of one global tensor: LayerNorm weights 1, biases 0, the rest N(0, std)."""
    if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "final_ln.weight":
        return torch.ones(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(_seed_for(seed, name))
    return torch.randn(shape, generator=gen) * std


def initialize(module: nn.Module, slices: Iterable[GlobalSlice], std: float, seed: int) -> None:
    """Fill every global slice of ``module`` with its layout-independent initial value."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for s in slices:
            dst = s.view(params[s.local])
            shape = _squeeze_expert(s, dst).shape
            dst.copy_(init_value(s.name, shape, std, seed).reshape(dst.shape))


def prefixed(slices: Iterable[GlobalSlice], prefix: str) -> Iterator[GlobalSlice]:
    """The same slices for a module held as the submodule ``prefix`` of a larger module."""
    for s in slices:
        yield GlobalSlice(s.name, f"{prefix}.{s.local}", s.dim, s.start, s.stop)
