"""The per-worker step schedule: the order in which a worker runs the layer-stages of each
micro-batch and posts or waits for their transfers.

A schedule is a plain list of ``Op(kind, micro, layer)``; the worker executes it in order and
never loops over layers or micro-batches itself. Pipelining (several micro-batches in flight)
and chunked transfers change only this list. Sends are posted without waiting; the op that
needs a transfer's result waits for it, so the order here is also the order of every worker's
matching sends and receives, which is what keeps the point-to-point traffic deadlock-free.

Attention worker, per micro-batch:
  embed; per layer: attn_fwd (heads, pool all-gather / reduce-scatter, routing), dispatch (send
  routed rows to the MoE workers), combine (receive expert outputs, add to the residual);
  head (final norm, LM head, loss, start of backward); per layer in reverse: combine_bwd (send
  the gradient of the expert outputs), dispatch_bwd (receive the gradient of the routed rows),
  attn_bwd; embed_bwd.
MoE worker, per micro-batch: per layer: expert_recv (row counts), expert_fwd (receive, compute and
send back, chunk batch by chunk batch); per layer in reverse: expert_bwd (the same for gradients).

Micro-batches in flight (``schedule.micro_batches_in_flight`` = k): the micro-batches of a step go in
groups of k. Within a group, each micro-batch's list above is cut before every op that waits
for the MoE pool (combine, dispatch_bwd), and the pieces are taken round-robin: micro-batch 1's
attention runs while the MoE pool computes micro-batch 0's experts, and the other way round.
The MoE worker serves requests in the order the attention workers send them (a dispatch or a
combine_bwd each), so sends and receives still pair up in order. Every parameter still receives
its micro-batches' gradients in micro-batch order, so the sums are the same as with k = 1.
"""

from __future__ import annotations

from typing import List, NamedTuple

from ma_ray.parallel.placement import ATTENTION


# Op kinds. Attention worker:
EMBED, ATTN_FWD, DISPATCH, COMBINE, HEAD = "embed", "attn_fwd", "dispatch", "combine", "head"
COMBINE_BWD, DISPATCH_BWD, ATTN_BWD, EMBED_BWD = "combine_bwd", "dispatch_bwd", "attn_bwd", "embed_bwd"
# MoE worker:
EXPERT_RECV, EXPERT_FWD, EXPERT_BWD = "expert_recv", "expert_fwd", "expert_bwd"


class Op(NamedTuple):
    kind: str
    micro: int
    layer: int = -1


# Attention ops that wait for the MoE pool, and the MoE ops that serve each attention request.
_WAITS_FOR_MOE = (COMBINE, DISPATCH_BWD)
_SERVED_BY = {DISPATCH: (EXPERT_RECV, EXPERT_FWD), COMBINE_BWD: (EXPERT_BWD,)}


def _micro_batch_ops(num_layers: int, mb: int) -> List[Op]:
    ops = [Op(EMBED, mb)]
    for layer in range(num_layers):
        ops += [Op(ATTN_FWD, mb, layer), Op(DISPATCH, mb, layer), Op(COMBINE, mb, layer)]
    ops.append(Op(HEAD, mb))
    for layer in reversed(range(num_layers)):
        ops += [Op(COMBINE_BWD, mb, layer), Op(DISPATCH_BWD, mb, layer), Op(ATTN_BWD, mb, layer)]
    ops.append(Op(EMBED_BWD, mb))
    return ops


def _pieces(ops: List[Op]) -> List[List[Op]]:
    """``ops`` cut before every op that waits for the MoE pool."""
    pieces: List[List[Op]] = [[]]
    for op in ops:
        if op.kind in _WAITS_FOR_MOE:
            pieces.append([])
        pieces[-1].append(op)
    return pieces


def attention_schedule(num_layers: int, micro_batches: int, in_flight: int = 1) -> List[Op]:
    ops: List[Op] = []
    for first in range(0, micro_batches, in_flight):
        group = [_pieces(_micro_batch_ops(num_layers, mb))
                 for mb in range(first, min(first + in_flight, micro_batches))]
        for i in range(len(group[0])):
            for pieces in group:
                ops += pieces[i]
    return ops


def moe_schedule(num_layers: int, micro_batches: int, in_flight: int = 1) -> List[Op]:
    return [Op(kind, op.micro, op.layer)
            for op in attention_schedule(num_layers, micro_batches, in_flight) if op.kind in _SERVED_BY
            for kind in _SERVED_BY[op.kind]]


def schedule_for(role: str, num_layers: int, micro_batches: int, in_flight: int = 1) -> List[Op]:
    build = attention_schedule if role == ATTENTION else moe_schedule
    return build(num_layers, micro_batches, max(1, in_flight))
