"""The attention pool's collectives: the per-layer all-gather and reduce-scatter of token slices
(the output aggregation) and the all-reduce of the replicated gradients, in one level or two.

``FlatAggregation`` runs each as one ring over the pool's group. ``TwoLevelAggregation`` runs
them inside each node, then across nodes, over the groups and pieces that
``parallel.hierarchy.TwoLevelLayout`` plans (its docstring has the recipe, why it cannot
deadlock, and the analytic time of both). ``Links`` chooses one when a worker takes its role
(``comm.hierarchical_allreduce``); the roles never ask which they have.

Both count the bytes each level sends through this GPU's link per step (``level_bytes``), as
the ring algorithm moves them: ``full_bytes`` (what the whole tensor stands for at the configured
shapes, or its own size computing for real) times the level's fraction.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch

from ma_ray.comm import groups
from ma_ray.comm.cross_node import DenseCrossNode
from ma_ray.comm.uneven import allgather_uneven, reducescatter_uneven
from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE, TwoLevelLayout


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


class _ByteCounts:
    def __init__(self):
        self.level_bytes: Dict[str, float] = {INTRA_NODE: 0.0, INTER_NODE: 0.0}

    def reset_counts(self) -> None:
        for level in self.level_bytes:
            self.level_bytes[level] = 0.0

    def _count(self, fractions: Dict[str, tuple], full_bytes: float) -> None:
        for level, (fraction, _members) in fractions.items():
            self.level_bytes[level] += fraction * full_bytes


class FlatAggregation(_ByteCounts):
    """One ring over the pool's group ``group``; its link is the network as soon as the pool
    spans two nodes."""

    reducer = DenseCrossNode()  # no cross-node level, nothing to compress

    def __init__(self, group: str, pool_size: int, one_node: bool):
        super().__init__()
        self.group = group
        self.pool_size = pool_size
        self.level = INTRA_NODE if one_node else INTER_NODE

    def _fractions(self, all_reduce: bool) -> Dict[str, tuple]:
        k = self.pool_size
        fraction = (2.0 if all_reduce else 1.0) * (k - 1) / k
        return {self.level: (fraction, k)}

    def held_ranges(self, numel: int) -> Dict[int, range]:
        return {}

    def gather_tokens(self, local: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        out = torch.cat(allgather_uneven(local.contiguous(), self.group, sizes))
        self._count(self._fractions(False), full_bytes if full_bytes else _nbytes(out))
        return out

    def scatter_tokens(self, full: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        self._count(self._fractions(False), full_bytes if full_bytes else _nbytes(full))
        return reducescatter_uneven(full.contiguous(), sizes, self.group)

    def allreduce(self, flat: torch.Tensor, full_bytes: Optional[float] = None,
                  tensor_sizes: Sequence[int] = ()) -> None:
        self._count(self._fractions(True), full_bytes if full_bytes else _nbytes(flat))
        groups.allreduce(flat, self.group)


class TwoLevelAggregation(_ByteCounts):
    """Inside each node, then across nodes (``parallel.hierarchy``), over the groups
    ``TwoLevelLayout.groups_to_join`` names, each ``prefix + "-" + suffix`` and already created.
    ``reducer``: how a held piece of a flat vector is summed across nodes (``comm.cross_node``:
    dense by default; gradient compression plugs in here)."""

    def __init__(self, layout: TwoLevelLayout, rank: int, prefix: str, reducer: Optional[DenseCrossNode] = None):
        super().__init__()
        self.reducer = reducer if reducer is not None else DenseCrossNode()
        self.layout, self.rank = layout, rank
        self.node = layout.node_of(rank)
        self.local = layout.local_of(rank)
        intra = layout.intra_group(rank)
        self.intra_group = f"{prefix}-{intra}" if intra is not None else None
        self.cross_groups = {piece: f"{prefix}-{suffix}" for piece, suffix in layout.cross_groups(rank).items()}
        self.held = layout.pieces_of(rank)
        self._row_orders: Dict[tuple, torch.Tensor] = {}

    # -- token slices -------------------------------------------------------------------------

    def _row_order(self, sizes: Sequence[int], device) -> torch.Tensor:
        """This node's buffer order of the micro-batch's rows (``TwoLevelLayout.node_row_order``),
        as an index tensor made once per slice sizes."""
        key = (tuple(sizes), str(device))
        if key not in self._row_orders:
            ranges = self.layout.node_row_order(self.node, sizes)
            self._row_orders[key] = torch.tensor([i for r in ranges for i in r], dtype=torch.long, device=device)
        return self._row_orders[key]

    def _intra_sizes(self, sizes: Sequence[int]) -> List[int]:
        return [sum(self.layout.piece_rows(j, sizes) for j in self.layout.pieces_of(r))
                for r in self.layout.nodes[self.node]]

    def _member_rows(self, piece: int, sizes: Sequence[int]) -> List[int]:
        return [sum(sizes[r] for r in part) for part in self.layout.piece_slices(piece)]

    def gather_tokens(self, local: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        total = sum(sizes)
        # Across nodes: each held piece, from the member of every node that has its slice.
        # (A worker's rank in a cross-node group is its node's index.) Only the piece of the
        # worker's own local index holds its slice; the others it stands in for, with no rows.
        mine = []
        for piece in self.held:
            contribution = local if piece == self.local else local[:0]
            if piece in self.cross_groups:
                mine += allgather_uneven(contribution.contiguous(), self.cross_groups[piece],
                                         self._member_rows(piece, sizes))
            else:
                mine.append(contribution)
        held = torch.cat(mine)
        # Inside the node: every GPU's held pieces, in the node's buffer order.
        if self.intra_group is not None:
            buffer = torch.cat(allgather_uneven(held.contiguous(), self.intra_group, self._intra_sizes(sizes)))
        else:
            buffer = held
        out = buffer.new_empty((total,) + tuple(buffer.shape[1:]))
        out.index_copy_(0, self._row_order(sizes, buffer.device), buffer)
        self._count(self.layout.level_fractions(self.rank, self.layout.token_piece_shares(sizes), False),
                    full_bytes if full_bytes else _nbytes(out))
        return out

    def scatter_tokens(self, full: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        self._count(self.layout.level_fractions(self.rank, self.layout.token_piece_shares(sizes), False),
                    full_bytes if full_bytes else _nbytes(full))
        # Inside the node: the node's sum of every held piece, contiguous in buffer order.
        buffer = full.index_select(0, self._row_order(sizes, full.device))
        if self.intra_group is not None:
            held = reducescatter_uneven(buffer, self._intra_sizes(sizes), self.intra_group)
        else:
            held = buffer
        # Across nodes: each held piece's sum, of which every member keeps its own slice.
        out = None
        offset = 0
        for piece in self.held:
            n = self.layout.piece_rows(piece, sizes)
            part = held[offset:offset + n]
            offset += n
            if piece in self.cross_groups:
                part = reducescatter_uneven(part.contiguous(), self._member_rows(piece, sizes), self.cross_groups[piece])
            if piece == self.local:
                out = part
        return out

    # -- flat vectors ---------------------------------------------------------------------------

    def held_ranges(self, numel: int) -> Dict[int, range]:
        """The element range of each piece this worker holds of a ``numel``-entry flat vector."""
        ranges = self.layout.flat_pieces(numel)
        return {piece: ranges[piece] for piece in self.held}

    def allreduce(self, flat: torch.Tensor, full_bytes: Optional[float] = None,
                  tensor_sizes: Sequence[int] = ()) -> None:
        """Sum ``flat`` over the pool, in place. ``tensor_sizes``: the lengths of the tensors
        ``flat`` concatenates, for a reducer that treats each apart (``comm.cross_node``)."""
        full_bytes = full_bytes if full_bytes else _nbytes(flat)
        shares = self.layout.flat_piece_shares(flat.numel())
        # The cross-node level's bytes per byte of a piece, at the size the piece stands for.
        element = flat.element_size()
        piece_numel = int(full_bytes / element / self.layout.pieces)
        self._count(self.layout.level_fractions(
            self.rank, shares, True, lambda members: self.reducer.wire_factor(members, piece_numel, element)),
            full_bytes)
        ranges = self.layout.flat_pieces(flat.numel())
        node_ranks = self.layout.nodes[self.node]
        # The node's buffer order: each GPU's held pieces, one after another.
        order = [ranges[j] for r in node_ranks for j in self.layout.pieces_of(r)]
        sizes = [sum(len(ranges[j]) for j in self.layout.pieces_of(r)) for r in node_ranks]
        if self.intra_group is not None:
            buffer = torch.cat([flat[r.start:r.stop] for r in order])
            held = reducescatter_uneven(buffer, sizes, self.intra_group)
        else:
            held = flat.clone()
        ends = list(itertools.accumulate(tensor_sizes or [flat.numel()]))
        offset = 0
        for piece in self.held:
            r = ranges[piece]
            if piece in self.cross_groups:
                cuts = [r.start] + [e for e in ends if r.start < e < r.stop] + [r.stop]
                self.reducer.reduce(piece, held[offset:offset + len(r)], self.cross_groups[piece],
                                    [b - a for a, b in zip(cuts, cuts[1:])])
            offset += len(r)
        if self.intra_group is not None:
            buffer = torch.cat(allgather_uneven(held, self.intra_group, sizes))
        else:
            buffer = held
        offset = 0
        for r in order:
            flat[r.start:r.stop] = buffer[offset:offset + len(r)]
            offset += len(r)
