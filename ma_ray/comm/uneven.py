"""All-gather and reduce-scatter of tensors whose first dimension differs between ranks, sending
only the rows that are there.

The runtime moves token slices whose lengths depend on routing, and the two-level collectives
move pieces of unequal size (a GPU of a smaller node holds more), so rank i may hold n_i rows.
Collectives need equal shapes. Padding every slice to max(n_i) would send up to (max/mean - 1)
more than the data, so instead:

* the ``min(n_i)`` rows every rank has go through the group's collective (equal shapes: NCCL's
  own ring, at its speed);
* the rest, ``n_i - min`` rows per rank, goes around a ring of sends and receives
  (``ring_schedule``): rank i sends to i + 1 and receives from i - 1, each step passing on what it
  received the step before, skipping empty chunks (every rank knows every size).

Per rank, the two together send what one ring over the unpadded slices would: an all-gather sends
every slice but its successor's, ``sum(n) - n_{i+1}`` rows; a reduce-scatter sends every partial
sum but its own, ``sum(n) - n_i`` (``parallel.hierarchy.ring_sent``, the model the time and the
byte counts use). That is the least a rank can move: the rank holding the fewest rows must
receive everyone else's.

No schedule here can deadlock, even when every send waits for its receive (NCCL, and the CPU
backend's strict mode): within each step an even rank sends before it receives and an odd rank
receives before it sends, and ``tests/unit/test_uneven_ring.py`` runs every schedule to the end
under that rule. The ring runs at the call, before the collective is queued; the ``i`` variants
return a handle for the collective only.

``sent_bytes(group)`` counts what this process sent in each group: sends by their size, a
collective as its ring moves it (``(m - 1)`` chunks of the common rows).

Works on any backend (it only uses groups.py's ops). Other dimensions, dtype and device must
match across ranks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from ray.util.collective.types import ReduceOp

from ma_ray.comm import groups
from ma_ray.comm.handles import CompletedHandle

_sent: Dict[str, float] = defaultdict(float)


def sent_bytes(group: str) -> float:
    """Bytes this process has sent in ``group`` through this module since it started."""
    return _sent[group]


def exchange_sizes(n: int, group: str, device: Optional[torch.device] = None) -> List[int]:
    """Every rank's `n`, by rank (one small blocking all-gather)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    outs = [torch.empty_like(mine) for _ in range(groups.world_size(group))]
    groups.allgather(outs, mine, group)
    _sent[group] += (len(outs) - 1) * _nbytes(mine)
    return [int(t.item()) for t in outs]


# -- the ring of the ragged rows ----------------------------------------------------------------

def ring_schedule(sizes: Sequence[int], me: int, gather: bool) -> List[Tuple[str, int, int]]:
    """Rank ``me``'s ops of the ring over chunks of ``sizes`` rows, in issue order:
    (``"send"`` or ``"recv"``, peer rank, chunk). All-gather (``gather``): step s passes chunk
    ``me - s`` on to ``me + 1`` and takes chunk ``me - s - 1`` from ``me - 1``. Reduce-scatter:
    step s passes the partial sum of chunk ``me - s - 1`` on and takes that of chunk
    ``me - s - 2``, which the next step adds to and passes on, until chunk ``me`` arrives last.
    Empty chunks are skipped on both sides."""
    m = len(sizes)
    nxt, prv = (me + 1) % m, (me - 1) % m
    ops: List[Tuple[str, int, int]] = []
    for s in range(m - 1):
        out_chunk = (me - s) % m if gather else (me - s - 1) % m
        in_chunk = (out_chunk - 1) % m
        send = [("send", nxt, out_chunk)] if sizes[out_chunk] else []
        recv = [("recv", prv, in_chunk)] if sizes[in_chunk] else []
        ops += send + recv if me % 2 == 0 else recv + send
    return ops


def _ring_allgather(tensor: torch.Tensor, sizes: Sequence[int], group: str, me: int) -> List[torch.Tensor]:
    rest = tuple(tensor.shape[1:])
    chunks = [tensor if c == me else tensor.new_empty((n,) + rest) for c, n in enumerate(sizes)]
    for kind, peer, chunk in ring_schedule(sizes, me, gather=True):
        if kind == "send":
            groups.send(chunks[chunk], peer, group)
            _sent[group] += _nbytes(chunks[chunk])
        else:
            groups.recv(chunks[chunk], peer, group)
    return chunks


def _ring_reducescatter(tensor: torch.Tensor, sizes: Sequence[int], group: str, me: int) -> torch.Tensor:
    own = list(torch.split(tensor, list(sizes), dim=0))
    if len(sizes) == 1:
        return own[0].clone()
    rest = tuple(tensor.shape[1:])
    # Chunk c's partial sum as it travels: this rank's contribution, then what arrived plus it.
    partial = {c: own[c] for c in range(len(sizes))}
    for kind, peer, chunk in ring_schedule(sizes, me, gather=False):
        if kind == "send":
            groups.send(partial[chunk], peer, group)
            _sent[group] += _nbytes(partial[chunk])
        else:
            arrived = tensor.new_empty((sizes[chunk],) + rest)
            groups.recv(arrived, peer, group)
            partial[chunk] = arrived.add_(own[chunk])
    # A chunk that skipped the ring is empty; an own chunk is a view: give back a tensor of its own.
    out = partial[me]
    return out.clone() if out is own[me] else out


# -- the public ops -----------------------------------------------------------------------------

def iallgather_uneven(tensor: torch.Tensor, group: str, sizes: Optional[Sequence[int]] = None):
    """Start gathering every rank's `tensor` (first dims may differ); `.wait()` returns the list
    of tensors by rank. Pass `sizes` (all ranks' first dims) when known to skip an exchange.
    The ragged rows move at the call (see the module docstring)."""
    if sizes is None:
        sizes = exchange_sizes(tensor.shape[0], group, tensor.device)
    sizes = list(sizes)
    me = groups.rank(group)
    if sizes[me] != tensor.shape[0]:
        raise ValueError(f"allgather_uneven in group '{group}': sizes[{me}]={sizes[me]} but "
                         f"this rank holds {tensor.shape[0]} rows")
    rest = tuple(tensor.shape[1:])
    common = min(sizes)
    if max(sizes) == 0:  # nothing to move; every rank knows it from `sizes`
        return CompletedHandle([tensor.new_empty((0,) + rest) for _ in sizes], "allgather_uneven")
    extra = None
    if max(sizes) > common:
        extra = _ring_allgather(tensor[common:].contiguous(), [n - common for n in sizes], group, me)
    if common == 0:
        return CompletedHandle(extra, "allgather_uneven")
    heads = [tensor.new_empty((common,) + rest) for _ in sizes]
    head = tensor[:common].contiguous()
    handle = groups.iallgather(heads, head, group)
    _sent[group] += (len(sizes) - 1) * _nbytes(head)
    if extra is None:
        return _Then(handle, lambda: heads)
    return _Then(handle, lambda: [torch.cat([h, e]) if e.shape[0] else h for h, e in zip(heads, extra)])


def allgather_uneven(tensor: torch.Tensor, group: str,
                     sizes: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
    """Every rank's `tensor`, by rank; first dims may differ."""
    return iallgather_uneven(tensor, group, sizes).wait()


def ireducescatter_uneven(tensor: torch.Tensor, sizes: Sequence[int], group: str,
                          op: ReduceOp = ReduceOp.SUM):
    """Start reducing `tensor` (same shape on every rank, first dim sum(sizes)) across the group
    and scattering it: rank i gets rows [sum(sizes[:i]), sum(sizes[:i+1])) reduced.
    `.wait()` returns this rank's slice. Sums only (the ring adds)."""
    sizes = list(sizes)
    if sum(sizes) != tensor.shape[0]:
        raise ValueError(f"reducescatter_uneven in group '{group}': sizes sum to {sum(sizes)} "
                         f"but the tensor has {tensor.shape[0]} rows")
    me = groups.rank(group)
    rest = tuple(tensor.shape[1:])
    common = min(sizes)
    if max(sizes) == 0:
        return CompletedHandle(tensor.new_empty((0,) + rest), "reducescatter_uneven")
    chunks = torch.split(tensor, sizes, dim=0)
    extra = None
    if max(sizes) > common:
        if op != ReduceOp.SUM:
            raise ValueError(f"reducescatter_uneven in group '{group}': unequal sizes reduce by SUM only")
        tails = torch.cat([c[common:] for c in chunks])
        extra = _ring_reducescatter(tails, [n - common for n in sizes], group, me)
    if common == 0:
        return CompletedHandle(extra, "reducescatter_uneven")
    heads = [c[:common].contiguous() for c in chunks]
    out = tensor.new_empty((common,) + rest)
    handle = groups.ireducescatter(out, heads, group, op)
    _sent[group] += (len(sizes) - 1) * _nbytes(out)
    if extra is None or extra.shape[0] == 0:
        return _Then(handle, lambda: out)
    return _Then(handle, lambda: torch.cat([out, extra]))


def reducescatter_uneven(tensor: torch.Tensor, sizes: Sequence[int], group: str,
                         op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
    """This rank's reduced slice of `tensor`; see ireducescatter_uneven."""
    return ireducescatter_uneven(tensor, sizes, group, op).wait()


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


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
