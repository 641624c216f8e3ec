"""The two-level collectives' plan (parallel.hierarchy): groups, pieces, row orders and the
analytic time, for the splits the policy allows on 4 x 4 (nodes with unequal attention GPUs)."""

from __future__ import annotations

import pytest

from ma_ray import config as C
from ma_ray.parallel.emulation import stage_durations
from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE, TwoLevelLayout, flat_ring_s, two_level_s
from ma_ray.parallel.placement import make_plan
from ma_ray.parallel.shares import share_counts


def paper(attention_gpus: int):
    return C.load("cluster/paper-16gpu.yaml", [f"cluster.attention_gpus={attention_gpus}"])


@pytest.mark.parametrize("k, per_node", [(9, [2, 2, 2, 3]), (12, [3, 3, 3, 3]), (14, [3, 3, 4, 4]), (8, [2, 2, 2, 2])])
def test_layout_follows_the_plan(k, per_node):
    layout = TwoLevelLayout.of_plan(make_plan(paper(k)))
    assert [len(ranks) for ranks in layout.nodes] == per_node
    assert [r for ranks in layout.nodes for r in ranks] == list(range(k))  # the pool is node-major
    assert layout.pieces == max(per_node)


@pytest.mark.parametrize("per_node", [[2, 2, 2, 3], [3, 3, 4, 4], [1, 3], [2, 1, 1], [4]])
def test_every_piece_has_one_holder_per_node_and_groups_nest(per_node):
    starts = [sum(per_node[:i]) for i in range(len(per_node))]
    layout = TwoLevelLayout(nodes=tuple(tuple(range(s, s + n)) for s, n in zip(starts, per_node)),
                            node_ids=tuple(range(len(per_node))))
    for piece in range(layout.pieces):
        members = layout.cross_members(piece)
        assert [layout.node_of(r) for r in members] == list(range(len(per_node)))
        assert all(piece in layout.pieces_of(r) for r in members)
    # Every piece is held exactly once on every node.
    for ranks in layout.nodes:
        held = sorted(p for r in ranks for p in layout.pieces_of(r))
        assert held == list(range(layout.pieces))
    # Each group's members agree on its members and on their ranks in it.
    seen = {}
    for ranks in layout.nodes:
        for rank in ranks:
            for suffix, members, mine in layout.groups_to_join(rank):
                assert members[mine] == rank
                assert seen.setdefault(suffix, members) == members


@pytest.mark.parametrize("per_node, tokens", [([2, 2, 2, 3], 37), ([3, 3, 4, 4], 64), ([1, 3], 10), ([2, 1, 1], 5)])
def test_node_row_order_is_a_permutation_and_keeps_pieces_contiguous(per_node, tokens):
    starts = [sum(per_node[:i]) for i in range(len(per_node))]
    layout = TwoLevelLayout(nodes=tuple(tuple(range(s, s + n)) for s, n in zip(starts, per_node)),
                            node_ids=tuple(range(len(per_node))))
    sizes = share_counts(tokens, sum(per_node))
    for node in range(len(per_node)):
        order = [i for r in layout.node_row_order(node, sizes) for i in r]
        assert sorted(order) == list(range(tokens))
    assert sum(layout.piece_rows(j, sizes) for j in range(layout.pieces)) == tokens
    assert sum(layout.token_piece_shares(sizes)) == pytest.approx(1.0)


def test_analytic_time_at_the_paper_preset():
    """The module docstring's figures: a 1 GB aggregation at 12 / 4, 450 and 50 GB/s."""
    cfg = paper(12)
    layout = TwoLevelLayout.of_plan(make_plan(cfg))
    gb, intra, inter = 1e9, 450e9, 50e9
    levels = two_level_s(layout, gb, [1 / 3] * 3, False, intra, inter)
    assert levels[INTRA_NODE] == pytest.approx(2 / 3 * gb / intra)
    assert levels[INTER_NODE] == pytest.approx(3 / 4 * gb / 3 / inter)
    assert flat_ring_s(gb, 12, False, inter) == pytest.approx(11 / 12 * gb / inter)
    # An all-reduce moves twice what an all-gather does, at both levels.
    twice = two_level_s(layout, gb, [1 / 3] * 3, True, intra, inter)
    assert twice[INTER_NODE] == pytest.approx(2 * levels[INTER_NODE])
    # The emulator's figure is the same model.
    d = stage_durations(cfg)
    plan = make_plan(cfg)
    assert d.pool_collective_s(plan, gb, False, True) == pytest.approx(sum(levels.values()))
    assert d.pool_collective_s(plan, gb, False, False) == pytest.approx(flat_ring_s(gb, 12, False, inter))


def test_unequal_nodes_are_paced_by_the_gpu_holding_most():
    cfg = paper(9)  # 2, 2, 2, 3 per node: a GPU of a 2-GPU node holds pieces 0 and 2
    layout = TwoLevelLayout.of_plan(make_plan(cfg))
    assert layout.pieces_of(layout.nodes[0][0]) == (0, 2)
    shares = [1 / 3] * 3
    inter = two_level_s(layout, 1.0, shares, False, 1.0, 1.0)[INTER_NODE]
    assert inter == pytest.approx(3 / 4 * 2 / 3)
