"""Two-level collectives over the attention pool, planned: which GPUs form each level's groups,
which rows or elements each holds between the levels, and what each level moves and costs.

The standard recipe (Horovod's hierarchical all-reduce, NCCL's trees): a reduction first runs
inside each node over NVLink, then across nodes among the GPUs that hold the same piece, so only
one node-summed copy of each piece crosses the network; a gather runs the other way round.

Groups. Node ``n`` holds ``k_n`` attention GPUs (pool ranks in order: the pool is node-major),
and they form its intra-node group. ``K = max k_n`` pieces; cross-node group ``j`` (``0 <= j <
K``) has one member per node, the node's local GPU ``j mod k_n``. With unequal nodes (the plan
puts 2, 2, 2, 3 per node at 9 attention GPUs on 4 x 4) a GPU of a smaller node belongs to more
than one cross-node group; it runs them in increasing ``j``, as every member does, so the
lowest unfinished group always has all its members and the sequence cannot deadlock.

Pieces of a token-sliced tensor (the output aggregation): rank ``r`` owns token slice ``S_r``.
Piece ``j`` is the ``j``-th slice of every node that has a ``j``-th GPU, in node order. So the
cross-node reduce-scatter of piece ``j`` leaves each member exactly its own slice (or nothing,
for a member that stands in for a node without a ``j``-th GPU), and no third level is needed:
  reduce-scatter = intra-node reduce-scatter (rows reordered so each GPU's pieces are
                   contiguous), then each held piece's cross-node reduce-scatter;
  all-gather     = each held piece's cross-node all-gather, then an intra-node all-gather
                   (and the rows put back in token order).
Pieces of a flat vector (the replicated gradients' all-reduce): ``K`` balanced ranges:
  all-reduce     = intra-node reduce-scatter, cross-node all-reduce of each held piece (where
                   gradient compression goes), intra-node all-gather.

Analytic time (ring algorithms, each level at its own link's bandwidth, ``B`` the full tensor's
bytes, ``k`` the pool's GPUs over ``N`` nodes):
  flat all-gather or reduce-scatter:  (k - 1) / k * B / bw_slowest  (a ring across nodes runs at
                                      the network's speed)
  flat all-reduce:                    2 (k - 1) / k * B / bw_slowest
  two-level, per GPU:                 (k_n - 1) / k_n * B / bw_intra
                                      + sum over held pieces (N - 1) / N * B_j / bw_inter
                                      (all-reduce: both terms twice, the cross-node one as an
                                      all-reduce of each piece)
Those are for equal chunks. Where chunks differ (a GPU of a smaller node holds two pieces; a
cross-node member standing in for a missing GPU holds no rows) ``comm.uneven`` sends no padding,
and a GPU sends what one ring over the unpadded chunks sends (``ring_sent``): in an all-gather
every chunk of its group but its successor's, in a reduce-scatter every chunk but its own. The
``(k_n - 1) / k_n`` and ``(N - 1) / N`` above are that with equal chunks; ``level_fractions``
counts the real chunks, so the bytes each GPU sends equal the bytes modelled at every split.
The pool's time is its slowest GPU's (``two_level_s``). At the paper preset (3 per node on 4
nodes, 450 and 50 GB/s) a 1 GB aggregation's flat ring takes 18.3 ms; two levels 1.5 + 5.0 ms.
With gradient compression the all-reduce's cross-node term sends ``cross_factor(N)`` bytes per
byte of a piece instead of a ring's ``2 (N - 1) / N`` (``comm.cross_node``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ma_ray.parallel.shares import balanced_ranges

INTRA_NODE = "intra_node"
INTER_NODE = "inter_node"


@dataclass(frozen=True)
class TwoLevelLayout:
    nodes: Tuple[Tuple[int, ...], ...]  # the pool ranks on each node holding attention GPUs, node order
    node_ids: Tuple[int, ...]  # those nodes' ids in the topology

    @classmethod
    def of_plan(cls, plan) -> "TwoLevelLayout":
        by_node: Dict[int, List[int]] = {}
        for rank, g in enumerate(plan.attention_workers()):
            by_node.setdefault(g.node, []).append(rank)
        ids = sorted(by_node)
        return cls(nodes=tuple(tuple(by_node[n]) for n in ids), node_ids=tuple(ids))

    # -- groups -------------------------------------------------------------------------------

    @property
    def pieces(self) -> int:
        return max(len(ranks) for ranks in self.nodes)

    def node_of(self, rank: int) -> int:
        """The index (in ``nodes``) of the node holding pool rank ``rank``."""
        for i, ranks in enumerate(self.nodes):
            if rank in ranks:
                return i
        raise ValueError(f"pool rank {rank} is not in the layout")

    def local_of(self, rank: int) -> int:
        return self.nodes[self.node_of(rank)].index(rank)

    def holder(self, node: int, piece: int) -> int:
        ranks = self.nodes[node]
        return ranks[piece % len(ranks)]

    def cross_members(self, piece: int) -> Tuple[int, ...]:
        """Cross-node group ``piece``'s members, by their rank in it (node order)."""
        return tuple(self.holder(n, piece) for n in range(len(self.nodes)))

    def pieces_of(self, rank: int) -> Tuple[int, ...]:
        """The pieces ``rank`` holds between the levels, in the order it runs their groups."""
        n, i = self.node_of(rank), self.local_of(rank)
        return tuple(j for j in range(self.pieces) if j % len(self.nodes[n]) == i)

    @property
    def crosses_nodes(self) -> bool:
        return len(self.nodes) > 1

    def intra_group(self, rank: int) -> Optional[str]:
        """The name suffix of ``rank``'s intra-node group; None alone on its node."""
        n = self.node_of(rank)
        return f"node{self.node_ids[n]}" if len(self.nodes[n]) > 1 else None

    def cross_groups(self, rank: int) -> Dict[int, str]:
        """The name suffix of the cross-node group of each piece ``rank`` holds (none on one node)."""
        return {piece: f"x{piece}" for piece in self.pieces_of(rank)} if self.crosses_nodes else {}

    def groups_to_join(self, rank: int) -> List[Tuple[str, Tuple[int, ...], int]]:
        """(name suffix, member ranks, ``rank``'s rank in it) of each group ``rank`` joins, in the
        order every member creates them: its node's, then its pieces' in increasing order."""
        out = []
        intra = self.intra_group(rank)
        if intra is not None:
            ranks = self.nodes[self.node_of(rank)]
            out.append((intra, ranks, ranks.index(rank)))
        for piece, suffix in self.cross_groups(rank).items():
            out.append((suffix, self.cross_members(piece), self.node_of(rank)))
        return out

    def group_sizes(self) -> Dict[str, int]:
        """Every group's name suffix and size."""
        return {suffix: len(members) for ranks in self.nodes for rank in ranks
                for suffix, members, _ in self.groups_to_join(rank)}

    # -- token-sliced tensors -----------------------------------------------------------------

    def piece_slices(self, piece: int) -> Tuple[Tuple[int, ...], ...]:
        """Per cross-group member (node order): the ranks whose token slices form that member's
        part of ``piece`` (its node's ``piece``-th GPU, or none)."""
        return tuple((ranks[piece],) if piece < len(ranks) else () for ranks in self.nodes)

    def node_row_order(self, node: int, slice_sizes: Sequence[int]) -> List[range]:
        """The token ranges of the whole micro-batch in node ``node``'s buffer order: its GPUs'
        held pieces one after another, each piece's slices in node order. An intra-node
        reduce-scatter of rows in this order leaves each GPU its pieces, contiguous."""
        starts = [sum(slice_sizes[:r]) for r in range(len(slice_sizes))]
        order = []
        for rank in self.nodes[node]:
            for piece in self.pieces_of(rank):
                for part in self.piece_slices(piece):
                    order += [range(starts[r], starts[r] + slice_sizes[r]) for r in part]
        return order

    def piece_rows(self, piece: int, slice_sizes: Sequence[int]) -> int:
        return sum(slice_sizes[r] for part in self.piece_slices(piece) for r in part)

    # -- flat vectors -------------------------------------------------------------------------

    def flat_pieces(self, numel: int) -> List[range]:
        """The ``K`` element ranges of a flat vector."""
        return balanced_ranges(numel, self.pieces)

    # -- cost -----------------------------------------------------------------------------------

    def level_fractions(self, rank: int, piece_share: Sequence[float], all_reduce: bool,
                        cross_factor: Optional[Callable[[int], float]] = None,
                        part_shares: Optional[Sequence[Sequence[float]]] = None,
                        gather: bool = True) -> Dict[str, Tuple[float, int]]:
        """What ``rank``'s ring steps move at each level, as (fraction of the full tensor sent
        over this GPU's link, members of that level's groups). ``piece_share[j]``: piece ``j``'s
        share of the full tensor. ``cross_factor(members)``: bytes an all-reduce's cross-node
        level sends per byte of a piece (default a dense ring's, ``2 (N - 1) / N``; gradient
        compression sends fewer). Token slices (not ``all_reduce``): ``gather`` or a
        reduce-scatter, and ``part_shares[j]``: each cross-node member's share of the full tensor
        in piece ``j`` (``token_part_shares``; default equal parts)."""
        node = self.node_of(rank)
        ranks, n_nodes = self.nodes[node], len(self.nodes)
        # Inside the node: one chunk per GPU, the pieces it holds.
        held = [sum(piece_share[j] for j in self.pieces_of(r)) for r in ranks]
        i = ranks.index(rank)
        if all_reduce:
            intra = ring_sent(held, i, gather=False) + ring_sent(held, i, gather=True)
        else:
            intra = ring_sent(held, i, gather)
        inter = 0.0
        if n_nodes > 1:
            for j in self.pieces_of(rank):
                if all_reduce:
                    per_piece = cross_factor(n_nodes) if cross_factor is not None else 2.0 * (n_nodes - 1) / n_nodes
                    inter += per_piece * piece_share[j]
                else:
                    parts = part_shares[j] if part_shares is not None else [piece_share[j] / n_nodes] * n_nodes
                    inter += ring_sent(parts, node, gather)
        return {INTRA_NODE: (intra, len(ranks)), INTER_NODE: (inter, n_nodes)}

    def token_piece_shares(self, slice_sizes: Sequence[int]) -> List[float]:
        total = sum(slice_sizes)
        return [self.piece_rows(j, slice_sizes) / total for j in range(self.pieces)]

    def token_part_shares(self, slice_sizes: Sequence[int]) -> List[List[float]]:
        """Per piece, each cross-node member's share of the full tensor: its node's slice of the
        piece (zero for a member standing in for a node without that GPU)."""
        total = sum(slice_sizes)
        return [[sum(slice_sizes[r] for r in part) / total for part in self.piece_slices(j)]
                for j in range(self.pieces)]

    def flat_piece_shares(self, numel: int) -> List[float]:
        return [len(r) / numel for r in self.flat_pieces(numel)]


def two_level_s(layout: TwoLevelLayout, full_bytes: float, piece_share: Sequence[float], all_reduce: bool,
                intra_bytes_per_s: float, inter_bytes_per_s: float,
                cross_factor: Optional[Callable[[int], float]] = None,
                part_shares: Optional[Sequence[Sequence[float]]] = None) -> Dict[str, float]:
    """Seconds of each level of a two-level collective of a ``full_bytes`` tensor: the slowest
    GPU's, level by level (each level's groups finish together). ``cross_factor`` and
    ``part_shares``: as in ``TwoLevelLayout.level_fractions``. Token slices: the slower of an
    all-gather and a reduce-scatter (with unequal chunks a GPU sends different amounts in each)."""
    per_level = {INTRA_NODE: 0.0, INTER_NODE: 0.0}
    for ranks in layout.nodes:
        for rank in ranks:
            for gather in ((True,) if all_reduce else (True, False)):
                fractions = layout.level_fractions(rank, piece_share, all_reduce, cross_factor, part_shares, gather)
                per_level[INTRA_NODE] = max(per_level[INTRA_NODE], fractions[INTRA_NODE][0] * full_bytes / intra_bytes_per_s)
                per_level[INTER_NODE] = max(per_level[INTER_NODE], fractions[INTER_NODE][0] * full_bytes / inter_bytes_per_s)
    return per_level


def ring_sent(shares: Sequence[float], me: int, gather: bool) -> float:
    """What member ``me`` of a ring over chunks ``shares`` (one per member, in ring order) sends,
    in the chunks' unit: in an all-gather every chunk but its successor's (the one chunk it never
    passes on), in a reduce-scatter every partial sum but its own (``comm.uneven``)."""
    m = len(shares)
    if m <= 1:
        return 0.0
    return sum(shares) - shares[(me + 1) % m if gather else me]


def flat_ring_s(full_bytes: float, members: int, all_reduce: bool, bytes_per_s: float) -> float:
    """Seconds of a one-level ring over ``members`` GPUs at the slowest link's ``bytes_per_s``."""
    if members <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (members - 1) / members * full_bytes / bytes_per_s
