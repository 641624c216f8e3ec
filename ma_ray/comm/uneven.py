"""All-gather and reduce-scatter of tensors whose first dimension differs between ranks.

The runtime moves token slices whose lengths depend on routing, so rank i may hold n_i rows.
Collectives need equal shapes, so every slice is padded to max(n_i) rows, exchanged, and the
results are sliced back. Works on any backend (it only uses groups.py's ops). Other dimensions,
dtype and device must match across ranks.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from ray.util.collective.types import ReduceOp

from ma_ray.comm import groups
from ma_ray.comm.handles import CompletedHandle


def exchange_sizes(n: int, group: str, device: Optional[torch.device] = None) -> List[int]:
    """Every rank's `n`, by rank (one small blocking all-gather)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    outs = [torch.empty_like(mine) for _ in range(groups.world_size(group))]
    groups.allgather(outs, mine, group)
    return [int(t.item()) for t in outs]


def iallgather_uneven(tensor: torch.Tensor, group: str, sizes: Optional[Sequence[int]] = None):
    """Start gathering every rank's `tensor` (first dims may differ); `.wait()` returns the list
    of tensors by rank. Pass `sizes` (all ranks' first dims) when known to skip an exchange."""
    if sizes is None:
        sizes = exchange_sizes(tensor.shape[0], group, tensor.device)
    sizes = list(sizes)
    me = groups.rank(group)
    if sizes[me] != tensor.shape[0]:
        raise ValueError(f"allgather_uneven in group '{group}': sizes[{me}]={sizes[me]} but "
                         f"this rank holds {tensor.shape[0]} rows")
    width = max(sizes)
    if width == 0:  # nothing to move; every rank knows it from `sizes`
        return CompletedHandle([tensor.new_empty((0,) + tuple(tensor.shape[1:]))
                                for _ in sizes], "allgather_uneven")
    padded = [tensor.new_empty((width,) + tuple(tensor.shape[1:])) for _ in sizes]
    handle = groups.iallgather(padded, _pad(tensor, width), group)
    return _Then(handle, lambda: [p[:n] for p, n in zip(padded, sizes)])


def allgather_uneven(tensor: torch.Tensor, group: str,
                     sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """Every rank's `tensor`, by rank; first dims may differ."""
    return iallgather_uneven(tensor, group, sizes).wait()


def ireducescatter_uneven(tensor: torch.Tensor, sizes: Sequence[int], group: str,
                          op: ReduceOp = ReduceOp.SUM):
    """Start reducing `tensor` (same shape on every rank, first dim sum(sizes)) across the group
    and scattering it: rank i gets rows [sum(sizes[:i]), sum(sizes[:i+1])) reduced.
    `.wait()` returns this rank's slice."""
    sizes = list(sizes)
    if sum(sizes) != tensor.shape[0]:
        raise ValueError(f"reducescatter_uneven in group '{group}': sizes sum to {sum(sizes)} "
                         f"but the tensor has {tensor.shape[0]} rows")
    me = groups.rank(group)
    width = max(sizes)
    if width == 0:
        return CompletedHandle(tensor.new_empty((0,) + tuple(tensor.shape[1:])),
                               "reducescatter_uneven")
    chunks = [_pad(c, width) for c in torch.split(tensor, sizes, dim=0)]
    out = tensor.new_empty((width,) + tuple(tensor.shape[1:]))
    handle = groups.ireducescatter(out, chunks, group, op)
    return _Then(handle, lambda: out[:sizes[me]])


def reducescatter_uneven(tensor: torch.Tensor, sizes: Sequence[int], group: str,
                         op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
    """This rank's reduced slice of `tensor`; see ireducescatter_uneven."""
    return ireducescatter_uneven(tensor, sizes, group, op).wait()


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


class _Then:
    """A handle whose `.wait()` waits on another and then returns `finish()`."""

    def __init__(self, inner, finish):
        self._inner = inner
        self._finish = finish
        self.op = getattr(inner, "op", "")

    def is_completed(self) -> bool:
        return self._inner.is_completed()

    def wait(self):
        self._inner.wait()
        return self._finish()
