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
            ops += [Op("expert_recv", mb, l), Op("expert_fwd", mb, l)]
        for l in reversed(range(layers)):
            ops += [Op("expert_bwd", mb, l)]
    return ops


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
    assert [(o.kind, o.micro, o.layer) for o in moe_schedule(2, 2, 2)][:4] == [
        ("expert_recv", 0, 0), ("expert_fwd", 0, 0), ("expert_recv", 1, 0), ("expert_fwd", 1, 0)]


@pytest.mark.parametrize("layers, micro, in_flight", list(itertools.product([1, 3], [1, 2, 5], [1, 2, 3, 8])))
def test_any_in_flight_keeps_every_rule_the_runtime_relies_on(layers, micro, in_flight):
    att = attention_schedule(layers, micro, in_flight)
    moe = moe_schedule(layers, micro, in_flight)
    # Every op once; each micro-batch's own ops in their one-at-a-time order (data dependencies).
    assert sorted(att) == sorted(sequential_attention(layers, micro))
    assert sorted(moe) == sorted(sequential_moe(layers, micro))
    for mb in range(micro):
        assert [o for o in att if o.micro == mb] == [o for o in sequential_attention(layers, micro) if o.micro == mb]
    # Point-to-point pairing: the MoE worker serves requests in the order they are sent, and the
    # attention worker waits for the answers in that same order.
    requests = [(o.kind, o.micro, o.layer) for o in att if o.kind in REQUESTS]
    waits = [(o.kind, o.micro, o.layer) for o in att if o.kind in REQUESTS.values()]
    assert [(REQUESTS[k], m, l) for k, m, l in requests] == waits
    served = [(o.micro, o.layer, "fwd" if o.kind == "expert_recv" else "bwd")
              for o in moe if o.kind in ("expert_recv", "expert_bwd")]
    assert served == [(m, l, "fwd" if k == "dispatch" else "bwd") for k, m, l in requests]
    # Gradient sums: every op kind of a layer (one accumulation per parameter) meets the
    # micro-batches in increasing order, as with one micro-batch at a time.
    for ops in (att, moe):
        for kind, layer in {(o.kind, o.layer) for o in ops}:
            order = [o.micro for o in ops if (o.kind, o.layer) == (kind, layer)]
            assert order == sorted(order)
