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
        assert form(peers, name, indices) == ["MA_GLOO"] * len(indices)

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


def test_teardown_and_rebuild_with_other_membership(peers):
    def store_of(index, name):
        import ray.util.collective as col
        return col.get_group_handle(name).store_address

    host, port = on(peers, [LAYOUT["A"][0]], store_of, "A")[0]
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
    form(peers, "S", [0, 1, 2], timeout_ms=timeout_ms)

    def stall(index):
        from ma_ray.comm import allreduce, irecv

        t0 = time.monotonic()
        try:
            if index == 0:
                allreduce(torch.ones(2), "S")  # actor 2 never joins the all-reduce
            else:
                irecv(torch.zeros(2), 2, "S").wait()  # actor 2 never sends
        except CommTimeoutError as exc:
            elapsed = time.monotonic() - t0
            try:  # the group is now known broken: the next op fails at once
                allreduce(torch.ones(1), "S")
            except CommError as again:
                return str(exc), elapsed, str(again)
        return None

    (msg0, t_0, again0), (msg1, t_1, _) = on(peers, [0, 1], stall)
    assert "comm timeout after 1000 ms: allreduce(SUM) in group 'S' (worker peer-0, rank 0 of 3)" \
        in msg0
    assert "comm timeout after 1000 ms: recv from rank 2 (peer-2) in group 'S' " \
        "(worker peer-1, rank 1 of 3)" in msg1
    assert 0.9 < t_0 < 4.0 and 0.9 < t_1 < 4.0
    assert "broken" in again0

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
    ray.kill(peers[VICTIM])

    def after_death(index):
        from ma_ray.comm import allreduce
        time.sleep(0.5)  # let the kill land
        t0 = time.monotonic()
        try:
            allreduce(torch.ones(1), "D")
        except CommError as exc:
            return str(exc), time.monotonic() - t0
        return None

    msg, elapsed = on(peers, [0], after_death)[0]
    assert "allreduce(SUM) in group 'D' (worker peer-0, rank 0 of 2)" in msg
    assert elapsed < 4.0
    disband(peers, "D", [0])


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
