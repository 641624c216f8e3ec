"""ma_ray.comm on a real local Ray cluster: 4 CPU actors, groups of different membership.

They run on the shared emulated cluster (``conftest.py``). Each test body runs functions inside the actors (shipped by
value with cloudpickle, so the workers need not import this file).
"""

from __future__ import annotations

import pickle
import socket
import sys
import time

import pytest
import ray
import torch
from ray import cloudpickle

from ma_ray.comm import CommError, CommTimeoutError

N_PEERS = 4
VICTIM = N_PEERS  # a fifth actor, killed by the last test


@ray.remote(num_cpus=0)
class Peer:
    def __init__(self, index: int):
        import ma_ray.comm  # noqa: F401 - pay torch's import once, at start-up

        self.index = index

    def run(self, fn, *args):
        return fn(self.index, *args)


@pytest.fixture(scope="module")
def peers(ray_cluster):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actors = [Peer.remote(i) for i in range(N_PEERS + 1)]
    ray.get([a.run.remote(lambda i: i) for a in actors], timeout=120)
    yield actors
    for actor in actors:
        ray.kill(actor)


def name_of(index: int) -> str:
    return f"peer-{index}"


def on(peers, indices, fn, *args, timeout=60):
    """Run fn(index, *args) in the given actors concurrently; results by position."""
    return ray.get([peers[i].run.remote(fn, *args) for i in indices], timeout=timeout)


def form(peers, name, indices, **kwargs):
    """Create group `name` whose rank r is actor indices[r]."""
    members = [name_of(i) for i in indices]

    def join(index, name, members, kwargs):
        from ma_ray.comm import create_group
        return create_group(name, members, members.index(name_of(index)), **kwargs)

    return on(peers, indices, join, name, members, kwargs)


def disband(peers, name, indices):
    def leave(index, name):
        from ma_ray.comm import destroy_group, has_group
        destroy_group(name)
        return has_group(name)

    assert on(peers, indices, leave, name) == [False] * len(indices)


LAYOUT = {"A": [0, 1, 2, 3], "B": [3, 2], "C": [1, 3]}


def test_comm_error_survives_pickling():
    err = CommTimeoutError("comm timeout after 5 ms: barrier", group="g", rank=1, worker="w",
                           op="barrier")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CommTimeoutError and str(back) == str(err)
    assert (back.group, back.rank, back.worker, back.op) == ("g", 1, "w", "barrier")


def test_overlapping_groups_reduce_independently(peers):
    for name, indices in LAYOUT.items():
        assert form(peers, name, indices) == ["gloo"] * len(indices)

    def reduce_all(index, layout):
        import ray.util.collective as col
        from ma_ray.comm import ReduceOp, allreduce, rank

        out = {}
        for name, indices in layout.items():  # same order everywhere: no cross-group deadlock
            if index not in indices:
                continue
            t = torch.full((3,), float(10 ** index))
            col.allreduce(t, group_name=name)  # the public API dispatches to the backend
            m = torch.tensor([float(index)])
            allreduce(m, name, op=ReduceOp.MAX)
            out[name] = (rank(name), t.tolist(), m.item())
        return out

    results = on(peers, range(N_PEERS), reduce_all, LAYOUT)
    expected_sum = {n: float(sum(10 ** i for i in idx)) for n, idx in LAYOUT.items()}
    for index, got in enumerate(results):
        assert set(got) == {n for n, idx in LAYOUT.items() if index in idx}
        for name, (r, total, biggest) in got.items():
            assert r == LAYOUT[name].index(index)
            assert total == [expected_sum[name]] * 3, (name, index, total)
            assert biggest == float(max(LAYOUT[name]))


def test_send_recv_broadcast_use_group_ranks(peers):
    def exchange(index):
        from ma_ray.comm import barrier, broadcast, irecv, isend, recv, send

        got = {}
        # B: rank 0 is actor 3, rank 1 is actor 2.
        if index == 3:
            send(torch.arange(4.0), 1, "B")
        if index == 2:
            t = torch.zeros(4)
            recv(t, 0, "B")
            got["B"] = t.tolist()
        # C: rank 0 is actor 1, rank 1 is actor 3; two tagged messages in flight.
        if index == 3:
            hs = [isend(torch.full((2,), 7.0), 0, "C", tag=1),
                  isend(torch.full((5,), 9.0), 0, "C", tag=2)]
            for h in hs:
                h.wait()
        if index == 1:
            late, early = torch.zeros(5), torch.zeros(2)
            h2 = irecv(late, 1, "C", tag=2)
            h1 = irecv(early, 1, "C", tag=1)
            h2.wait()
            h1.wait()
            got["C"] = (early.tolist(), late.tolist())
        # A: broadcast from group rank 2 (actor 2).
        t = torch.full((2,), float(index))
        broadcast(t, 2, "A")
        got["A"] = t.tolist()
        barrier("A")
        return got

    results = on(peers, range(N_PEERS), exchange)
    assert results[2]["B"] == [0.0, 1.0, 2.0, 3.0]
    assert results[1]["C"] == ([7.0] * 2, [9.0] * 5)
    assert all(r["A"] == [2.0, 2.0] for r in results)


def test_uneven_allgather_reducescatter_and_async(peers):
    def ragged(index):
        from ma_ray.comm import (allgather_uneven, iallgather_uneven, iallreduce,
                                 reducescatter_uneven)

        # Actor i holds i rows (actor 0 none) of value i; sizes exchanged, then given.
        mine = torch.full((index, 2), float(index))
        gathered = allgather_uneven(mine, "A")
        again = iallgather_uneven(mine, "A", sizes=[0, 1, 2, 3]).wait()
        # Rows 0..5, split 2,0,1,3; every rank contributes rows * (index + 1).
        full = torch.arange(6.0).unsqueeze(1).repeat(1, 3) * (index + 1)
        part = reducescatter_uneven(full, [2, 0, 1, 3], "A")
        # A non-blocking all-reduce overlapped with local work.
        x = torch.ones(8) * index
        h = iallreduce(x, "A")
        busy = torch.randn(64, 64) @ torch.randn(64, 64)
        h.wait()
        return ([g.tolist() for g in gathered], [g.shape[0] for g in again], part.tolist(),
                x.tolist(), busy.shape[0])

    results = on(peers, range(N_PEERS), ragged)
    offsets = [0, 2, 2, 3, 6]
    for index, (gathered, again, part, x, _) in enumerate(results):
        assert gathered == [[[float(i)] * 2] * i for i in range(N_PEERS)]
        assert again == [0, 1, 2, 3]
        rows = range(offsets[index], offsets[index + 1])
        assert part == [[10.0 * r] * 3 for r in rows]
        assert x == [6.0] * 8


@pytest.mark.parametrize("per_node", [(2, 3), (1, 2, 2), (3,)])
def test_two_level_aggregation_equals_one_level(peers, per_node):
    """comm.aggregation's two levels against the one-level ring, on nodes with unequal GPUs (a
    GPU of the smaller node holds two pieces), a node with one GPU, and one node. Integer-valued
    fp64 data, so any summation order is exact and the results must be equal, bit for bit."""
    from ma_ray.parallel.hierarchy import TwoLevelLayout

    members = list(range(sum(per_node)))
    starts = [sum(per_node[:i]) for i in range(len(per_node))]
    layout = TwoLevelLayout(nodes=tuple(tuple(range(s, s + n)) for s, n in zip(starts, per_node)),
                            node_ids=tuple(range(len(per_node))))
    prefix = f"agg{len(per_node)}{sum(per_node)}"
    form(peers, f"{prefix}-flat", members, strict=True)
    groups_of = {r: layout.groups_to_join(r) for r in members}

    def join_levels(index, layout, prefix, specs):
        from ma_ray.comm import create_group
        for suffix, ranks, rank in specs[index]:
            create_group(f"{prefix}-{suffix}", [name_of(r) for r in ranks], rank, strict=True)
        return [f"{prefix}-{suffix}" for suffix, _, _ in specs[index]]

    names = on(peers, members, join_levels, layout, prefix, groups_of)

    def aggregate(index, layout, prefix, k):
        from ma_ray.comm.aggregation import FlatAggregation, TwoLevelAggregation
        from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE

        sizes = [3, 0, 5, 2, 4][:k]  # uneven token slices, one empty
        g = torch.Generator().manual_seed(index)
        local = torch.randint(-50, 50, (sizes[index], 4), generator=g).double()
        full = torch.randint(-50, 50, (sum(sizes), 4), generator=g).double()
        flat_vec = torch.randint(-50, 50, (23,), generator=g).double()
        out = {}
        for name, agg in (("flat", FlatAggregation(f"{prefix}-flat", k, one_node=False)),
                          ("two", TwoLevelAggregation(layout, index, prefix))):
            vec = flat_vec.clone()
            agg.allreduce(vec)
            out[name] = (agg.gather_tokens(local, sizes), agg.scatter_tokens(full, sizes), vec)
            out[name + "_bytes"] = (agg.level_bytes[INTRA_NODE], agg.level_bytes[INTER_NODE])
        same = all(torch.equal(a, b) for a, b in zip(out["flat"], out["two"]))
        return same, [t.shape[0] for t in out["two"][:2]], out["flat_bytes"], out["two_bytes"]

    results = on(peers, members, aggregate, layout, prefix, len(members))
    sizes = [3, 0, 5, 2, 4][:len(members)]
    for rank, (same, shapes, flat_bytes, two_bytes) in enumerate(results):
        assert same, f"rank {rank}: two levels differ from one"
        assert shapes == [sum(sizes), sizes[rank]]
        if len(per_node) > 1:  # across nodes, two levels send less over the network than a ring
            assert two_bytes[1] < flat_bytes[1]

    def leave_levels(index, names):
        from ma_ray.comm import destroy_group
        for name in names[index]:
            destroy_group(name)

    on(peers, members, leave_levels, names)
    disband(peers, f"{prefix}-flat", members)


def test_compressed_cross_node_level_sums_what_every_node_sent(peers):
    """comm.cross_node on two nodes of 2 and 3 GPUs: bf16 sums to bf16's rounding; top-k at ratio 1
    to 8-bit quantisation's; at ratio 0.25 every GPU of the pool gets the same sum, and what the
    nodes did not send stays in their residuals (decoded sum + residuals = the exact sum)."""
    from ma_ray.parallel.hierarchy import TwoLevelLayout

    members = list(range(5))
    layout = TwoLevelLayout(nodes=((0, 1), (2, 3, 4)), node_ids=(0, 1))
    prefix = "cmp"
    groups_of = {r: layout.groups_to_join(r) for r in members}

    def join_levels(index, prefix, specs):
        from ma_ray.comm import create_group
        for suffix, ranks, rank in specs[index]:
            create_group(f"{prefix}-{suffix}", [name_of(r) for r in ranks], rank, strict=True)
        return [f"{prefix}-{suffix}" for suffix, _, _ in specs[index]]

    names = on(peers, members, join_levels, prefix, groups_of)

    def reduce_all(index, layout, prefix):
        from ma_ray.comm.aggregation import TwoLevelAggregation
        from ma_ray.comm.compression import CompressionSettings
        from ma_ray.comm.cross_node import cross_node_reducer

        vectors = [torch.randn(300, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(5)]
        exact = torch.stack(vectors).sum(0)
        out = {}
        for kind, ratio in (("bf16", 0.1), ("topk", 1.0), ("topk", 0.25)):
            reducer = cross_node_reducer(kind, CompressionSettings(ratio, 8, 64))
            agg = TwoLevelAggregation(layout, index, prefix, reducer)
            flat = vectors[index].clone()
            agg.allreduce(flat)
            residual = torch.zeros(300, dtype=torch.float64)
            for piece, r in agg.held_ranges(300).items():
                if piece in reducer.residuals():
                    residual[r.start:r.stop] = reducer.residuals()[piece]
            out[f"{kind}{ratio}"] = (float((flat - exact).abs().max() / exact.abs().max()), flat, residual)
        return out

    results = on(peers, members, reduce_all, layout, prefix)
    exact = torch.stack([torch.randn(300, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
                         for r in range(5)]).sum(0)
    for r in results:
        assert r["bf160.1"][0] < 2 ** -7
        assert r["topk1.0"][0] < 2 / 127  # each node's values to half a step of its block's scale
    sparse = [r["topk0.25"][1] for r in results]
    assert all(torch.equal(s, sparse[0]) for s in sparse)  # one sum on every GPU of the pool
    # The nodes' residuals are held once per node, by the GPUs holding each piece: their sum and
    # the decoded sum give back the exact sum.
    residuals = sum(r["topk0.25"][2] for r in results)
    assert torch.allclose(sparse[0] + residuals, exact, atol=1e-9)
    assert float((sparse[0] - exact).abs().max()) > 1e-3  # and it was compressed

    def leave_levels(index, names):
        from ma_ray.comm import destroy_group
        for name in names[index]:
            destroy_group(name)

    on(peers, members, leave_levels, names)


def test_teardown_and_rebuild_with_other_membership(peers):
    def store_of(index, name):
        import ray.util.collective as col
        return col.get_group_handle(name).store_address

    host, port = on(peers, [LAYOUT["A"][0]], store_of, "A")[0]

    def listening_on(index, port):
        import psutil
        return sorted({c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
                       if c.status == psutil.CONN_LISTEN and c.laddr.port == port})

    # The store listens on the node's Ray address only, not on every interface.
    assert on(peers, [LAYOUT["A"][0]], listening_on, port)[0] == [host]
    for name, indices in LAYOUT.items():
        disband(peers, name, indices)
    # Rank 0 no longer serves the old store.
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()

    new_layout = {"A": [2, 0, 3], "B": [0, 1]}
    for name, indices in new_layout.items():
        form(peers, name, indices)

    def reduce_new(index, layout):
        from ma_ray.comm import allreduce, rank, world_size

        out = {}
        for name, indices in layout.items():
            if index in indices:
                t = torch.tensor([float(10 ** index)])
                allreduce(t, name)
                out[name] = (rank(name), world_size(name), t.item())
        return out

    results = on(peers, range(N_PEERS), reduce_new, new_layout)
    assert results[0] == {"A": (1, 3, 1101.0), "B": (0, 2, 11.0)}
    assert results[1] == {"B": (1, 2, 11.0)}
    assert results[2] == {"A": (0, 3, 1101.0)}
    assert results[3] == {"A": (2, 3, 1101.0)}
    for name, indices in new_layout.items():
        disband(peers, name, indices)


def test_stalled_peer_times_out_with_a_named_error(peers):
    timeout_ms = 1000
    # Two groups: gloo closes a group's connections when one of its members times out, so a
    # second stall in the same group would race to see a closed connection instead of its own
    # timeout (a named CommError, but not the one this test is about).
    form(peers, "S", [0, 1, 2], timeout_ms=timeout_ms)
    form(peers, "R", [1, 2], timeout_ms=timeout_ms)

    def stall(index):
        from ma_ray.comm import allreduce, irecv

        group = "S" if index == 0 else "R"
        t0 = time.monotonic()
        try:
            if index == 0:
                allreduce(torch.ones(2), "S")  # actors 1 and 2 never join the all-reduce
            else:
                irecv(torch.zeros(2), 1, "R").wait()  # actor 2 never sends
        except CommTimeoutError as exc:
            elapsed = time.monotonic() - t0
            try:  # the group is now known broken: the next op fails at once
                allreduce(torch.ones(1), group)
            except CommError as again:
                return str(exc), elapsed, str(again)
        return None

    (msg0, t_0, again0), (msg1, t_1, again1) = on(peers, [0, 1], stall)
    assert "comm timeout after 1000 ms: allreduce(SUM) in group 'S' (worker peer-0, rank 0 of 3)" \
        in msg0
    assert "comm timeout after 1000 ms: recv from rank 1 (peer-2) in group 'R' " \
        "(worker peer-1, rank 0 of 2)" in msg1
    assert 0.9 < t_0 < 4.0 and 0.9 < t_1 < 4.0
    assert "broken" in again0 and "broken" in again1
    disband(peers, "R", [1, 2])

    # The error reaches the driver as CommTimeoutError too.
    def stall_raising(index):
        from ma_ray.comm import barrier
        barrier("S")

    disband(peers, "S", [0, 1, 2])
    form(peers, "S", [0, 1, 2], timeout_ms=timeout_ms)
    with pytest.raises(CommTimeoutError, match="barrier in group 'S'"):
        on(peers, [1], stall_raising)

    # A rebuilt group works again.
    disband(peers, "S", [0, 1, 2])
    form(peers, "S", [0, 1, 2], timeout_ms=timeout_ms)

    def works(index):
        from ma_ray.comm import allreduce
        t = torch.ones(1)
        allreduce(t, "S")
        return t.item()

    assert on(peers, [0, 1, 2], works) == [3.0] * 3
    disband(peers, "S", [0, 1, 2])


def test_missing_member_bounds_group_creation(peers):
    def lonely(index):
        from ma_ray.comm import create_group
        t0 = time.monotonic()
        try:
            # Actor 0 is rank 0 waiting for rank 1; actor 1 is rank 1 of a group with no rank 0.
            create_group(f"lonely-{index}", ["x", "y"], index, init_timeout_ms=1000)
        except CommError as exc:
            return str(exc), time.monotonic() - t0
        return None

    for (msg, elapsed), index in zip(on(peers, [0, 1], lonely), [0, 1]):
        assert f"group 'lonely-{index}'" in msg and "did not connect within 1000 ms" in msg
        assert elapsed < 4.0


def test_dead_peer_fails_fast_with_a_named_error(peers):
    form(peers, "D", [0, VICTIM], timeout_ms=1000)
    form(peers, "D-p2p", [0, VICTIM], timeout_ms=1000)
    form(peers, "D-strict", [0, VICTIM], timeout_ms=1000, strict=True)
    ray.kill(peers[VICTIM])

    def after_death(index):
        from ma_ray.comm import allreduce, irecv, isend
        time.sleep(0.5)  # let the kill land
        # gloo's send and recv touch the closed connection at once, before there is a Work to
        # wait on: that failure must come out named too, not as gloo's bare RuntimeError.
        ops = {"allreduce": lambda: allreduce(torch.ones(1), "D"),
               "send": lambda: isend(torch.ones(2), 1, "D-p2p").wait(),
               "recv": lambda: irecv(torch.zeros(2), 1, "D-p2p").wait(),
               "strict send": lambda: isend(torch.ones(2), 1, "D-strict").wait()}
        out = {}
        for name, op in ops.items():
            t0 = time.monotonic()
            try:
                op()
                out[name] = None
            except CommError as exc:
                out[name] = (str(exc), time.monotonic() - t0)
        return out

    out = on(peers, [0], after_death)[0]
    assert all(v is not None for v in out.values()), out
    assert "allreduce(SUM) in group 'D' (worker peer-0, rank 0 of 2)" in out["allreduce"][0]
    assert "send to rank 1 (peer-4) in group 'D-p2p' (worker peer-0, rank 0 of 2)" in out["send"][0]
    # The send broke the group: the recv after it fails fast, naming the failure before.
    assert "the group is broken by an earlier failure (send to rank 1 (peer-4))" in out["recv"][0]
    assert "send #1 to rank 1 (peer-4) (2 x float32) in group 'D-strict'" in out["strict send"][0]
    assert all(elapsed < 4.0 for _, elapsed in out.values()), out
    disband(peers, "D", [0])
    disband(peers, "D-p2p", [0])
    disband(peers, "D-strict", [0])


def test_strict_mode_completes_a_matched_exchange_and_names_a_deadlock(peers):
    """Strict NCCL mode: every op blocks in issue order until its peer is at the matching one.
    Ordered sends and receives complete; two peers that both send first deadlock, and the
    error names what each of them waits for, within the timeout instead of hanging."""
    form(peers, "X", [0, 1], timeout_ms=1500, strict=True)

    def ordered(index):
        from ma_ray.comm import irecv, isend
        t = torch.zeros(3)
        if index == 0:
            isend(torch.arange(3.0), 1, "X").wait()
            irecv(t, 1, "X").wait()
        else:
            irecv(t, 0, "X").wait()
            isend(t * 10, 0, "X").wait()
        return t.tolist()

    assert on(peers, [0, 1], ordered) == [[0.0, 10.0, 20.0], [0.0, 1.0, 2.0]]

    def both_send_first(index):
        from ma_ray.comm import CommDeadlockError, irecv, isend
        t0 = time.monotonic()
        try:
            # On gloo's buffered sends this would pass; on NCCL it hangs.
            isend(torch.ones(4), 1 - index, "X")
            irecv(torch.zeros(4), 1 - index, "X").wait()
        except CommDeadlockError as exc:
            return str(exc), time.monotonic() - t0
        return None, time.monotonic() - t0

    (msg0, t_0), (msg1, t_1) = on(peers, [0, 1], both_send_first)
    for msg, me, peer in ((msg0, "peer-0", "rank 1 (peer-1)"), (msg1, "peer-1", "rank 0 (peer-0)")):
        assert msg is not None and "\n" not in msg
        assert msg.startswith(f"deadlock (strict NCCL mode): worker {me} has waited 1500 ms in send #3 to {peer} "
                              f"(4 x float32) in group 'X'; {peer} is in send #3 to "), msg
        assert "waiting for" in msg and "to post the matching receive" in msg, msg
    assert t_0 < 10 and t_1 < 10
    disband(peers, "X", [0, 1])


def test_strict_mode_refuses_a_count_or_dtype_mismatch(peers):
    form(peers, "Y", [2, 3], timeout_ms=1500, strict=True)

    def mismatched(index):
        from ma_ray.comm import CommError, irecv, isend
        try:
            if index == 2:
                isend(torch.ones(4), 1, "Y")
            else:
                irecv(torch.zeros(5, dtype=torch.float64), 0, "Y")
        except CommError as exc:
            return str(exc)
        return None

    sender, receiver = on(peers, [2, 3], mismatched)
    assert "the matching receive expects 5 x float64" in sender and "send #1" in sender, sender
    assert "the matching send has another element count or dtype" in receiver, receiver
    disband(peers, "Y", [2, 3])
