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
MoE worker, per micro-batch: per layer: expert_recv, expert_fwd, expert_send; per layer in
reverse: expert_grad_recv, expert_bwd, expert_grad_send.
"""

from __future__ import annotations

from typing import List, NamedTuple

from ma_ray.parallel.placement import ATTENTION


class Op(NamedTuple):
    kind: str
    micro: int
    layer: int = -1


def attention_schedule(num_layers: int, micro_batches: int) -> List[Op]:
    ops: List[Op] = []
    for mb in range(micro_batches):
        ops.append(Op("embed", mb))
        for layer in range(num_layers):
            ops += [Op("attn_fwd", mb, layer), Op("dispatch", mb, layer), Op("combine", mb, layer)]
        ops.append(Op("head", mb))
        for layer in reversed(range(num_layers)):
            ops += [Op("combine_bwd", mb, layer), Op("dispatch_bwd", mb, layer), Op("attn_bwd", mb, layer)]
        ops.append(Op("embed_bwd", mb))
    return ops


def moe_schedule(num_layers: int, micro_batches: int) -> List[Op]:
    ops: List[Op] = []
    for mb in range(micro_batches):
        for layer in range(num_layers):
            ops += [Op("expert_recv", mb, layer), Op("expert_fwd", mb, layer), Op("expert_send", mb, layer)]
        for layer in reversed(range(num_layers)):
            ops += [Op("expert_grad_recv", mb, layer), Op("expert_bwd", mb, layer), Op("expert_grad_send", mb, layer)]
    return ops


def schedule_for(role: str, num_layers: int, micro_batches: int) -> List[Op]:
    return attention_schedule(num_layers, micro_batches) if role == ATTENTION else moe_schedule(num_layers, micro_batches)
