"""The per-worker step schedule: the order in which a worker runs the layer-stages of each
micro-batch and the pool-to-pool exchanges between them.

A schedule is a plain list of ``Op(kind, micro, layer)``; the worker executes it in order and
never loops over layers or micro-batches itself. Pipelining (several micro-batches in flight)
and chunked transfers change only this list.

Attention worker, per micro-batch:
  embed; per layer: attn_fwd (heads, pool all-gather / reduce-scatter, routing), dispatch (send
  routed rows to the MoE workers), combine (receive expert outputs, add to the residual);
  head (final norm, LM head, loss, start of backward); per layer in reverse: combine_bwd (send
  the gradient of the expert outputs), dispatch_bwd (receive the gradient of the routed rows),
  attn_bwd; embed_bwd.
MoE worker: the attention schedule's exchanges, in the attention schedule's order, each served
by its own op: a dispatch by expert_recv (row counts) and expert_fwd (receive the rows and
compute); a combine by expert_return (send the outputs back); a combine_bwd by expert_bwd
(receive the output gradients and compute backward); a dispatch_bwd by expert_return_bwd (send
the input gradients back). Results wait on the MoE worker until the attention pool's schedule
reaches the exchange that takes them.

Micro-batches in flight (``schedule.micro_batches_in_flight`` = k): the micro-batches of a step go in
groups of k. Within a group, each micro-batch's list above is cut before every op that waits
for the MoE pool (combine, dispatch_bwd), and the pieces are taken round-robin: micro-batch 1's
attention runs while the MoE pool computes micro-batch 0's experts, and the other way round.
Every parameter still receives its micro-batches' gradients in micro-batch order, so the sums
are the same as with k = 1.

Why the exchanges cannot deadlock, even where every operation blocks until its peer reaches the
matching one, in issue order, with nothing buffered (NCCL's point-to-point calls on Ray's
blocking streams; the CPU backend's strict mode enforces exactly that):

1. Every worker's communication is a subsequence of one global sequence of steps: the
   attention schedule's op list. An attention worker runs all of it (its pool's collectives and
   every exchange); a MoE worker runs its exchanges, in the same order (``moe_schedule`` is
   derived from it). No worker skips ahead of a step it takes part in.
2. Within one exchange, each (attention worker ``i``, MoE worker ``j``) pair's messages (row
   counts, then the chunks) are contiguous on both sides; senders go through their receivers in
   rank order and receivers through their senders in rank order (``runtime.transport``). A
   message of pair ``(i, j)`` then waits only for messages of pairs with a smaller ``i`` (on
   ``j``) or a smaller ``j`` (on ``i``); for the counts-then-rows dispatch, order pair messages by
   (``j``, counts before rows, ``i``): each waits only for ones earlier in that order, so the
   exchange completes once every participant has reached it.
3. By induction over the global sequence, every step completes: a worker reaches step ``s`` after
   completing its earlier steps, which complete by (2) and the induction hypothesis, and
   collectives are reached by every member of their pool in the same order.

What the order costs: a MoE worker sends micro-batch 0's outputs only after it has received
micro-batch 1's rows (the attention pool dispatches micro-batch 1 before it combines
micro-batch 0). When the MoE pool is the slower one, as at the paper preset, those rows are
there by the time it has computed micro-batch 0. Where it is not, the attention pool waits
that transfer longer than with fused (grouped) calls, which Ray's NCCL group does not offer.
"""

from __future__ import annotations

from typing import List, NamedTuple

from ma_ray.parallel.placement import ATTENTION


# Op kinds. Attention worker:
EMBED, ATTN_FWD, DISPATCH, COMBINE, HEAD = "embed", "attn_fwd", "dispatch", "combine", "head"
COMBINE_BWD, DISPATCH_BWD, ATTN_BWD, EMBED_BWD = "combine_bwd", "dispatch_bwd", "attn_bwd", "embed_bwd"
# MoE worker:
EXPERT_RECV, EXPERT_FWD, EXPERT_RETURN = "expert_recv", "expert_fwd", "expert_return"
EXPERT_BWD, EXPERT_RETURN_BWD = "expert_bwd", "expert_return_bwd"


class Op(NamedTuple):
    kind: str
    micro: int
    layer: int = -1


# Attention ops that wait for the MoE pool, and the MoE ops that serve each exchange.
_WAITS_FOR_MOE = (COMBINE, DISPATCH_BWD)
_SERVED_BY = {DISPATCH: (EXPERT_RECV, EXPERT_FWD), COMBINE: (EXPERT_RETURN,),
              COMBINE_BWD: (EXPERT_BWD,), DISPATCH_BWD: (EXPERT_RETURN_BWD,)}


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
