"""comm.uneven's ring of ragged rows, run to the end in a blocking, unbuffered simulation (a
send completes only when its receiver reaches the matching receive, every op in issue order:
NCCL's rule and the CPU backend's strict mode): it never deadlocks, delivers every chunk (every
rank's contribution to every partial sum), and each rank sends exactly what
``parallel.hierarchy.ring_sent`` models. Then the model at the splits of 4 x 4 against the
padded chunks it replaces."""

from __future__ import annotations

import itertools
import random

import pytest

from ma_ray import config as C
from ma_ray.comm.uneven import ring_schedule
from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE, TwoLevelLayout, ring_sent
from ma_ray.parallel.placement import make_plan
from ma_ray.parallel.shares import share_counts


def run_ring(sizes, gather):
    """Every rank's schedule, matched pairwise as NCCL would; returns (what each rank holds of
    each chunk: the set of ranks whose rows or contributions it has, rows each rank sent)."""
    m = len(sizes)
    queues = [list(ring_schedule(sizes, me, gather)) for me in range(m)]
    # gather: holds[r][c] = {c} once rank r has chunk c. scatter: the contributors of r's
    # partial sum of chunk c (its own contribution from the start).
    holds = [{c: ({c} if c == r else set()) if gather else {r} for c in range(m)} for r in range(m)]
    sent = [0] * m
    while any(queues):
        progressed = False
        for a in range(m):
            if not queues[a] or queues[a][0][0] != "send":
                continue
            _, b, chunk = queues[a][0]
            if queues[b] and queues[b][0] == ("recv", a, chunk):
                queues[a].pop(0)
                queues[b].pop(0)
                assert sizes[chunk] > 0, "an empty chunk went round"
                if gather:
                    assert holds[a][chunk] == {chunk}, "sent a chunk it does not have"
                    holds[b][chunk] = {chunk}
                else:
                    holds[b][chunk] = holds[b][chunk] | holds[a][chunk]
                sent[a] += sizes[chunk]
                progressed = True
        if not progressed:
            heads = {r: q[0] for r, q in enumerate(queues) if q}
            raise AssertionError(f"deadlock at sizes {sizes} ({'gather' if gather else 'scatter'}): heads {heads}")
    return holds, sent


def patterns():
    for m in range(1, 7):
        for zeros in itertools.product((0, 1), repeat=m):
            yield [z * (1 + (r * 7) % 3) for r, z in enumerate(zeros)]
    rng = random.Random(0)
    for _ in range(200):
        yield [rng.choice((0, 0, 1, 2, 5)) for _ in range(rng.randint(7, 16))]


@pytest.mark.parametrize("gather", [True, False], ids=["all-gather", "reduce-scatter"])
def test_ring_never_deadlocks_delivers_everything_and_sends_the_model(gather):
    for sizes in patterns():
        m = len(sizes)
        holds, sent = run_ring(sizes, gather)
        for r in range(m):
            if gather:  # every non-empty chunk everywhere
                assert all(holds[r][c] == {c} for c in range(m) if sizes[c]), sizes
            elif sizes[r]:  # its own chunk summed over every rank
                assert holds[r][r] == set(range(m)), (sizes, r)
            assert sent[r] == ring_sent(sizes, r, gather), (sizes, r)


def test_ring_sent_is_the_ring_with_equal_chunks():
    for m in range(1, 9):
        for me in range(m):
            for gather in (True, False):
                assert ring_sent([5.0] * m, me, gather) == pytest.approx(5.0 * (m - 1))


def padded_intra(layout, rank, shares, all_reduce):
    """What the intra-node level sent before: every chunk padded to the largest."""
    ranks = layout.nodes[layout.node_of(rank)]
    held = [sum(shares[j] for j in layout.pieces_of(r)) for r in ranks]
    return (2 if all_reduce else 1) * (len(ranks) - 1) * max(held)


@pytest.mark.parametrize("k", [9, 14])
def test_model_counts_the_real_chunks_at_uneven_splits(k):
    layout = TwoLevelLayout.of_plan(make_plan(C.load("cluster/paper-16gpu.yaml", [f"cluster.attention_gpus={k}"])))
    sizes = share_counts(64 * 2048, k)
    shares, parts = layout.token_piece_shares(sizes), layout.token_part_shares(sizes)
    flat = layout.flat_piece_shares(10 ** 9)
    assert [sum(p) for p in parts] == pytest.approx(shares)
    worst_old, worst_new = 0.0, 0.0
    for rank in range(k):
        for gather in (True, False):
            f = layout.level_fractions(rank, shares, False, part_shares=parts, gather=gather)
            # Never more than the padded chunks sent; the node's GPUs together send what the
            # old per-GPU formula summed to (a ring moves (k_n - 1) x the buffer either way).
            assert f[INTRA_NODE][0] <= padded_intra(layout, rank, shares, False) + 1e-12
        f = layout.level_fractions(rank, flat, True)
        assert f[INTRA_NODE][0] <= padded_intra(layout, rank, flat, True) + 1e-12
        worst_old = max(worst_old, padded_intra(layout, rank, flat, True))
        worst_new = max(worst_new, f[INTRA_NODE][0])
    for ranks in layout.nodes:
        n = len(ranks)
        for gather in (True, False):
            total = sum(layout.level_fractions(r, shares, False, part_shares=parts, gather=gather)[INTRA_NODE][0]
                        for r in ranks)
            assert total == pytest.approx(n - 1)
    # The gradients' intra-node level at 14 (3, 3, 4, 4): the smaller nodes' GPU 0 holds half
    # the vector, so padding sent 2 x 1/2 x 2 = 2 vectors where the ring sends 1.5.
    if k == 14:
        assert worst_old == pytest.approx(2.0) and worst_new == pytest.approx(1.5)


def test_equal_nodes_keep_the_old_figures():
    layout = TwoLevelLayout.of_plan(make_plan(C.load("cluster/paper-16gpu.yaml")))
    shares = [1 / 3] * 3
    for rank in range(12):
        for gather in (True, False):
            f = layout.level_fractions(rank, shares, False, gather=gather)
            assert f[INTRA_NODE][0] == pytest.approx(2 / 3)
            assert f[INTER_NODE][0] == pytest.approx(3 / 4 / 3)
