"""The attention pool's collectives: the per-layer all-gather and reduce-scatter of token slices
(the output aggregation) and the all-reduce of the replicated gradients, in one level or two.

``FlatAggregation`` runs each as one ring over the pool's group. ``TwoLevelAggregation`` runs
them inside each node, then across nodes, over the groups and pieces that
``parallel.hierarchy.TwoLevelLayout`` plans (its docstring has the recipe, why it cannot
deadlock, and the analytic time of both). ``Links`` chooses one when a worker takes its role
(``comm.hierarchical_allreduce``); the roles never ask which they have.

Both count the bytes each level sends through this GPU's link per step, twice: as modelled
(``level_bytes``: ``full_bytes``, what the whole tensor stands for at the configured shapes or its
own size computing for real, times the level's fraction from ``parallel.hierarchy``) and as sent
(``sent_bytes``: what ``comm.uneven`` counted leaving this process in each level's groups, scaled
by the same ``full_bytes`` over the tensor's own size). The two are equal at every split: the
uneven ops send no padding, and the model counts each GPU's real chunks. The cross-node
all-reduce of a held piece has equal shapes everywhere; what it sends is the reducer's count
(``comm.cross_node``), in both.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import torch

from ma_ray.comm import groups
from ma_ray.comm.cross_node import DenseCrossNode
from ma_ray.comm.uneven import allgather_uneven, reducescatter_uneven, sent_bytes
from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE, TwoLevelLayout, ring_sent


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


class _ByteCounts:
    def __init__(self):
        self.level_bytes: Dict[str, float] = {INTRA_NODE: 0.0, INTER_NODE: 0.0}
        self.sent_bytes: Dict[str, float] = {INTRA_NODE: 0.0, INTER_NODE: 0.0}
        self.group_levels: Dict[str, str] = {}  # each group's level, for the sent counts

    def reset_counts(self) -> None:
        for level in self.level_bytes:
            self.level_bytes[level] = 0.0
            self.sent_bytes[level] = 0.0

    def _count(self, fractions: Dict[str, tuple], full_bytes: float) -> None:
        for level, (fraction, _members) in fractions.items():
            self.level_bytes[level] += fraction * full_bytes

    def _sent_so_far(self) -> Dict[str, float]:
        return {group: sent_bytes(group) for group in self.group_levels}

    def _count_sent(self, before: Dict[str, float], scale: float) -> None:
        """Add what ``comm.uneven`` sent in each group since ``before``, times ``scale``."""
        for group, level in self.group_levels.items():
            self.sent_bytes[level] += (sent_bytes(group) - before[group]) * scale


class FlatAggregation(_ByteCounts):
    """One ring over the pool's group ``group``; its link is the network as soon as the pool
    spans two nodes."""

    reducer = DenseCrossNode()  # no cross-node level, nothing to compress

    def __init__(self, group: str, pool_size: int, one_node: bool):
        super().__init__()
        self.group = group
        self.pool_size = pool_size
        self.level = INTRA_NODE if one_node else INTER_NODE
        self.group_levels = {group: self.level}

    def _fractions(self, all_reduce: bool, sizes: Sequence[int] = (), gather: bool = True) -> Dict[str, tuple]:
        k = self.pool_size
        if all_reduce or not sizes:
            fraction = (2.0 if all_reduce else 1.0) * (k - 1) / k
        else:  # token slices differ by a row or so: the ring over the real slices
            total = sum(sizes)
            fraction = ring_sent([n / total for n in sizes], groups.rank(self.group), gather) if total else 0.0
        return {self.level: (fraction, k)}

    def held_ranges(self, numel: int) -> Dict[int, range]:
        return {}

    def gather_tokens(self, local: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        before = self._sent_so_far()
        out = torch.cat(allgather_uneven(local.contiguous(), self.group, sizes))
        full_bytes = full_bytes if full_bytes else _nbytes(out)
        self._count(self._fractions(False, sizes, gather=True), full_bytes)
        self._count_sent(before, full_bytes / max(_nbytes(out), 1.0))
        return out

    def scatter_tokens(self, full: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        before = self._sent_so_far()
        scale = (full_bytes if full_bytes else _nbytes(full)) / max(_nbytes(full), 1.0)
        self._count(self._fractions(False, sizes, gather=False), full_bytes if full_bytes else _nbytes(full))
        out = reducescatter_uneven(full.contiguous(), sizes, self.group)
        self._count_sent(before, scale)
        return out

    def allreduce(self, flat: torch.Tensor, full_bytes: Optional[float] = None,
                  tensor_sizes: Sequence[int] = ()) -> None:
        self._count(self._fractions(True), full_bytes if full_bytes else _nbytes(flat))
        groups.allreduce(flat, self.group)
        # Equal shapes: the ring's bytes are the model's.
        self.sent_bytes[self.level] += self._fractions(True)[self.level][0] * (full_bytes if full_bytes else _nbytes(flat))


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
        self.group_levels = {name: INTER_NODE for name in self.cross_groups.values()}
        if self.intra_group is not None:
            self.group_levels[self.intra_group] = INTRA_NODE

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

    def _token_fractions(self, sizes: Sequence[int], gather: bool) -> Dict[str, tuple]:
        return self.layout.level_fractions(self.rank, self.layout.token_piece_shares(sizes), False,
                                           part_shares=self.layout.token_part_shares(sizes), gather=gather)

    def gather_tokens(self, local: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        total = sum(sizes)
        before = self._sent_so_far()
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
        full_bytes = full_bytes if full_bytes else _nbytes(out)
        self._count(self._token_fractions(sizes, gather=True), full_bytes)
        self._count_sent(before, full_bytes / max(_nbytes(out), 1.0))
        return out

    def scatter_tokens(self, full: torch.Tensor, sizes: Sequence[int], full_bytes: Optional[float] = None) -> torch.Tensor:
        full_bytes = full_bytes if full_bytes else _nbytes(full)
        self._count(self._token_fractions(sizes, gather=False), full_bytes)
        before, scale = self._sent_so_far(), full_bytes / max(_nbytes(full), 1.0)
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
        self._count_sent(before, scale)
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
        modelled = self.layout.level_fractions(
            self.rank, shares, True, lambda members: self.reducer.wire_factor(members, piece_numel, element))
        self._count(modelled, full_bytes)
        before, scale = self._sent_so_far(), full_bytes / max(_nbytes(flat), 1.0)
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
        self._count_sent(before, scale)
        self.sent_bytes[INTER_NODE] += modelled[INTER_NODE][0] * full_bytes  # the reducer's, as said above
