"""The per-worker step schedule (pure): one micro-batch at a time, and micro-batches in flight."""

import itertools

import pytest

from ma_ray.runtime.schedule import Op, attention_schedule, moe_schedule, schedule_for
from ma_ray.parallel.placement import ATTENTION, MOE

REQUESTS = {"dispatch": "combine", "combine_bwd": "dispatch_bwd"}  # attention send -> its wait


def sequential_attention(layers, micro):
    ops = []
    for mb in range(micro):
        ops.append(Op("embed", mb))
        for l in range(layers):
            ops += [Op("attn_fwd", mb, l), Op("dispatch", mb, l), Op("combine", mb, l)]
        ops.append(Op("head", mb))
        for l in reversed(range(layers)):
            ops += [Op("combine_bwd", mb, l), Op("dispatch_bwd", mb, l), Op("attn_bwd", mb, l)]
        ops.append(Op("embed_bwd", mb))
    return ops


def sequential_moe(layers, micro):
    ops = []
    for mb in range(micro):
        for l in range(layers):
            ops += [Op("expert_recv", mb, l), Op("expert_fwd", mb, l), Op("expert_return", mb, l)]
        for l in reversed(range(layers)):
            ops += [Op("expert_bwd", mb, l), Op("expert_return_bwd", mb, l)]
    return ops


# The MoE ops that serve each attention exchange.
SERVED_BY = {"dispatch": ("expert_recv", "expert_fwd"), "combine": ("expert_return",),
             "combine_bwd": ("expert_bwd",), "dispatch_bwd": ("expert_return_bwd",)}


@pytest.mark.parametrize("layers, micro", [(1, 1), (2, 3), (4, 2)])
def test_one_in_flight_is_one_micro_batch_after_another(layers, micro):
    assert schedule_for(ATTENTION, layers, micro) == sequential_attention(layers, micro)
    assert schedule_for(MOE, layers, micro) == sequential_moe(layers, micro)
    assert schedule_for(ATTENTION, layers, micro, 1) == sequential_attention(layers, micro)


def test_two_in_flight_alternate_around_the_moe_pool():
    got = [(o.kind, o.micro, o.layer) for o in attention_schedule(2, 2, 2)]
    assert got[:13] == [("embed", 0, -1), ("attn_fwd", 0, 0), ("dispatch", 0, 0),
                        ("embed", 1, -1), ("attn_fwd", 1, 0), ("dispatch", 1, 0),
                        ("combine", 0, 0), ("attn_fwd", 0, 1), ("dispatch", 0, 1),
                        ("combine", 1, 0), ("attn_fwd", 1, 1), ("dispatch", 1, 1),
                        ("combine", 0, 1)]
    # The MoE pool sends micro-batch 0's outputs back only once it has taken micro-batch 1's rows:
    # the exchanges go in the attention pool's order.
    assert [(o.kind, o.micro, o.layer) for o in moe_schedule(2, 2, 2)][:8] == [
        ("expert_recv", 0, 0), ("expert_fwd", 0, 0), ("expert_recv", 1, 0), ("expert_fwd", 1, 0),
        ("expert_return", 0, 0), ("expert_recv", 0, 1), ("expert_fwd", 0, 1), ("expert_return", 1, 0)]


@pytest.mark.parametrize("layers, micro, in_flight", list(itertools.product([1, 3], [1, 2, 5], [1, 2, 3, 8])))
def test_any_in_flight_keeps_every_rule_the_runtime_relies_on(layers, micro, in_flight):
    att = attention_schedule(layers, micro, in_flight)
    moe = moe_schedule(layers, micro, in_flight)
    # Every op once; each micro-batch's own ops in their one-at-a-time order (data dependencies).
    assert sorted(att) == sorted(sequential_attention(layers, micro))
    assert sorted(moe) == sorted(sequential_moe(layers, micro))
    for mb in range(micro):
        assert [o for o in att if o.micro == mb] == [o for o in sequential_attention(layers, micro) if o.micro == mb]
    # Point-to-point pairing: the attention worker waits for the answers in the order it sent
    # the requests, and the MoE worker takes part in every exchange in the attention order.
    requests = [(o.kind, o.micro, o.layer) for o in att if o.kind in REQUESTS]
    waits = [(o.kind, o.micro, o.layer) for o in att if o.kind in REQUESTS.values()]
    assert [(REQUESTS[k], m, l) for k, m, l in requests] == waits
    assert moe == [Op(kind, o.micro, o.layer) for o in att if o.kind in SERVED_BY for kind in SERVED_BY[o.kind]]
    # Gradient sums: every op kind of a layer (one accumulation per parameter) meets the
    # micro-batches in increasing order, as with one micro-batch at a time.
    for ops in (att, moe):
        for kind, layer in {(o.kind, o.layer) for o in ops}:
            order = [o.micro for o in ops if (o.kind, o.layer) == (kind, layer)]
            assert order == sorted(order)


def _messages(att, moe, k, n, chunks):
    """Each worker's point-to-point and collective calls over a step, in issue order, as the
    roles make them (``runtime.attention_role``, ``runtime.moe_role``, ``runtime.transport``):
    an attention worker sends each MoE worker its counts and ``chunks`` chunks, MoE workers in
    rank order, and receives their answers the same way; a MoE worker takes its sources in rank
    order; the pool's collectives are ``("coll", ...)``."""
    calls = {}
    for i in range(k):
        seq = []
        for o in att:
            key = (o.micro, o.layer)
            if o.kind in ("attn_fwd", "attn_bwd"):
                seq.append(("coll", o.kind, key))
            elif o.kind in ("dispatch", "combine_bwd"):
                for j in range(n):
                    seq += ([("send", ("m", j), (o.kind, key, "counts"))] if o.kind == "dispatch" else [])
                    seq += [("send", ("m", j), (o.kind, key, c)) for c in range(chunks)]
            elif o.kind in ("combine", "dispatch_bwd"):
                for j in range(n):
                    seq += [("recv", ("m", j), (o.kind, key, c)) for c in range(chunks)]
        calls["a", i] = seq
    answers = {"expert_return": "combine", "expert_return_bwd": "dispatch_bwd"}
    for j in range(n):
        seq = []
        for o in moe:
            key = (o.micro, o.layer)
            if o.kind == "expert_recv":
                seq += [("recv", ("a", i), ("dispatch", key, "counts")) for i in range(k)]
            elif o.kind in ("expert_fwd", "expert_bwd"):
                kind = "dispatch" if o.kind == "expert_fwd" else "combine_bwd"
                seq += [("recv", ("a", i), (kind, key, c)) for i in range(k) for c in range(chunks)]
            else:
                seq += [("send", ("a", i), (answers[o.kind], key, c)) for i in range(k) for c in range(chunks)]
        calls["m", j] = seq
    return calls


def _completes_when_every_call_blocks(calls, k):
    """Run every worker's calls where each blocks until its peer is at the matching call (a
    send meets the receive of the same message; a collective needs every attention worker),
    in issue order, nothing buffered: NCCL's point-to-point on Ray's blocking streams."""
    at = {w: 0 for w in calls}
    while True:
        moved = False
        for w, seq in calls.items():
            if at[w] == len(seq):
                continue
            kind, peer, msg = seq[at[w]]
            if kind == "coll":
                members = [("a", i) for i in range(k)]
                if all(at[m] < len(calls[m]) and calls[m][at[m]] == (kind, peer, msg) for m in members):
                    for m in members:
                        at[m] += 1
                    moved = True
            elif kind == "send":
                head = calls[peer][at[peer]] if at[peer] < len(calls[peer]) else None
                if head == ("recv", w, msg):
                    at[w] += 1
                    at[peer] += 1
                    moved = True
        if all(at[w] == len(seq) for w, seq in calls.items()):
            return True
        if not moved:
            return False


@pytest.mark.parametrize("k, n", [(1, 1), (3, 2), (2, 5), (4, 4)])
@pytest.mark.parametrize("layers, micro, in_flight, chunks", [(1, 1, 1, 1), (2, 2, 2, 3), (2, 4, 4, 2),
                                                               (3, 5, 3, 1), (1, 3, 2, 4)])
def test_exchanges_complete_when_every_call_blocks_unbuffered(k, n, layers, micro, in_flight, chunks):
    att, moe = attention_schedule(layers, micro, in_flight), moe_schedule(layers, micro, in_flight)
    assert _completes_when_every_call_blocks(_messages(att, moe, k, n, chunks), k)


def test_the_blocking_model_finds_the_old_deadlock():
    # The schedule before: a MoE worker answered each exchange as soon as it had computed it,
    # so with two micro-batches in flight it sent micro-batch 0's outputs while the attention
    # pool was still sending micro-batch 1's rows: each pool waits for the other.
    att = attention_schedule(1, 2, 2)
    eager = [Op(kind, o.micro, o.layer) for o in att if o.kind in ("dispatch", "combine_bwd")
             for kind in (("expert_recv", "expert_fwd", "expert_return") if o.kind == "dispatch"
                          else ("expert_bwd", "expert_return_bwd"))]
    assert not _completes_when_every_call_blocks(_messages(att, eager, 2, 2, 2), 2)
