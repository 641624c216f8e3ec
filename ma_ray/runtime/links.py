"""A worker's collective groups, built from the plan, and the few operations the roles use.

Groups of one generation of the plan, with ``{p}`` = ``{job}-g{gen}`` (one replica) or
``{job}-g{gen}-r{r}`` (replica ``r`` of several, ``cluster.replicas``):
  ``{p}-world``: every worker of the replica, rank = global GPU id. Carries the point-to-point
      traffic between its attention and MoE pools, and the global gradient-norm all-reduce
      when there is one replica.
  ``{p}-attn``: the replica's attention pool, rank = pool rank. Carries its collectives in one
      level (``comm.hierarchical_allreduce: false``).
  ``{p}-attn-node{n}`` and ``{p}-attn-x{j}``: with two levels, node ``n``'s attention GPUs and
      the cross-node group of piece ``j`` (``parallel.hierarchy``), in place of ``-attn``.
With several replicas, groups across them, named ``{job}-g{gen}-...``:
  ``-grads`` (one level) or ``-grads-node{n}`` and ``-grads-x{j}`` (two levels): the attention
      GPUs of every replica, for the all-reduce of the replicated gradients, which sums every
      replica's at once (its cross-node groups span every replica's nodes);
  ``-dp{i}``: global GPU id ``i`` of every replica, its counterparts, which hold the same heads
      or experts: the all-reduce of the sharded gradients (``counterpart_reducer``);
  ``-all``: every worker, for the gradient norm.
A rebalance tears a generation down and builds the next one. The attention pool's collectives
are ``self.aggregation`` and the replicated gradients' ``self.gradients`` (``comm.aggregation``;
the same object with one replica), chosen here once.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ma_ray.comm import groups
from ma_ray.comm.aggregation import FlatAggregation, TwoLevelAggregation
from ma_ray.comm.cross_node import DenseCrossNode
from ma_ray.parallel.hierarchy import TwoLevelLayout
from ma_ray.parallel.placement import replicate


def worker_name(node: int, local_gpu: int) -> str:
    return f"node{node}-gpu{local_gpu}"


def _prefix(job: str, generation: int, plan) -> str:
    """The prefix of the groups of ``plan``'s replica."""
    return f"{job}-g{generation}" + (f"-r{plan.replica}" if plan.replicas > 1 else "")


def _pool_groups(prefix: str, plan, hierarchical: bool) -> Dict[str, int]:
    if not hierarchical:
        return {prefix: plan.attention_gpus}
    return {f"{prefix}-{suffix}": size for suffix, size in TwoLevelLayout.of_plan(plan).group_sizes().items()}


def generation_groups(job: str, generation: int, plan, hierarchical: bool) -> Dict[str, int]:
    """Every group of one generation (of every replica of ``plan``), by name, with its size."""
    out: Dict[str, int] = {}
    for copy in plan.replica_plans():
        prefix = _prefix(job, generation, copy)
        out[f"{prefix}-world"] = copy.total_gpus
        out.update(_pool_groups(f"{prefix}-attn", copy, hierarchical))
    if plan.replicas > 1:
        prefix = f"{job}-g{generation}"
        out.update(_pool_groups(f"{prefix}-grads", _union(plan), hierarchical))
        out.update({f"{prefix}-dp{g.gpu}": plan.replicas for g in plan.gpus})
        out[f"{prefix}-all"] = plan.replicas * plan.total_gpus
    return out


def _union(plan):
    """Every replica of ``plan`` as one plan, pool ranks running replica by replica."""
    return replicate(plan.for_replica(0), plan.replicas)


class Links:
    def __init__(self, job: str, generation: int, plan, me, timeout_ms: int, init_timeout_ms: int,
                 backend: Optional[str] = None, strict: bool = False, hierarchical: bool = False,
                 reducer: Optional[DenseCrossNode] = None, counterpart_reducer: Optional[DenseCrossNode] = None,
                 listen_host: Optional[str] = None):
        """``plan``: this worker's replica's; ``strict``: gloo groups' strict NCCL mode
        (``comm.torch_backend``); ``listen_host``: where the groups' stores listen
        (``comm.torch_backend.GroupOptions``); ``hierarchical``: the attention pool's collectives
        in two levels, whose cross-node level sums the gradients with ``reducer``
        (``comm.cross_node``; dense by default); ``counterpart_reducer``: how the sharded
        gradients are summed across replicas (another instance of the same kind: each keeps
        the residuals of what it sums)."""
        prefix = _prefix(job, generation, plan)
        self.world = f"{prefix}-world"
        self.everyone = self.world  # the gradient norm's group
        self.counterparts: Optional[str] = None  # the sharded gradients' group across replicas
        # How they are summed: a reducer of the same kind, of their own (top-k's residuals are
        # this worker's sharded gradients', by global name in ``Role.shard_residuals``).
        self.counterpart_reducer = counterpart_reducer if counterpart_reducer is not None else DenseCrossNode()
        self._names = []
        self.aggregation = self.gradients = None

        def join(name, members, rank):
            groups.create_group(name, members, rank, timeout_ms=timeout_ms, init_timeout_ms=init_timeout_ms,
                                generation=generation, backend=backend, strict=strict, listen_host=listen_host)
            self._names.append(name)
            return name

        def pool(pool_prefix, pool_plan, rank, pool_reducer):
            """Join the groups of ``pool_plan``'s attention GPUs; their aggregation."""
            members = [worker_name(g.node, g.local_gpu) for g in pool_plan.attention_workers()]
            if not hierarchical:
                return FlatAggregation(join(pool_prefix, members, rank), len(members),
                                       one_node=len({g.node for g in pool_plan.attention_workers()}) == 1)
            layout = TwoLevelLayout.of_plan(pool_plan)
            for suffix, ranks, rank_in in layout.groups_to_join(rank):
                join(f"{pool_prefix}-{suffix}", [members[r] for r in ranks], rank_in)
            return TwoLevelAggregation(layout, rank, pool_prefix, pool_reducer)

        # Every member creates the groups in the same order: its replica's world, then its
        # pool's (with two levels: its node's, then its pieces' in increasing order, see
        # parallel.hierarchy); then the groups across replicas, whose members have all made
        # their replica's groups first, so no two workers wait on each other in opposite orders.
        join(self.world, [worker_name(g.node, g.local_gpu) for g in plan.gpus], me.gpu)
        if me.is_attention:
            # With replicas the replicated gradients take their own groups (below), and the
            # reducer, whose residuals are theirs, goes with them.
            self.aggregation = pool(f"{prefix}-attn", plan, me.rank, reducer if plan.replicas == 1 else None)
            self.gradients = self.aggregation
            self.pool_size = plan.attention_gpus
        if plan.replicas == 1:
            return
        base = f"{job}-g{generation}"
        if me.is_attention:
            self.gradients = pool(f"{base}-grads", _union(plan), plan.replica * plan.attention_gpus + me.rank, reducer)
        copies = plan.replica_plans()
        self.counterparts = join(f"{base}-dp{me.gpu}", [worker_name(c.gpus[me.gpu].node, me.local_gpu) for c in copies],
                                 plan.replica)
        self.everyone = join(f"{base}-all", [worker_name(g.node, g.local_gpu) for c in copies for g in c.gpus],
                             plan.replica * plan.total_gpus + me.gpu)

    def reducers(self) -> list:
        """Every reducer of this worker's gradients, once: the counterparts' and the pool's
        cross-node level (what keeps error-feedback residuals)."""
        found = [self.counterpart_reducer] + ([self.gradients.reducer] if self.gradients is not None else [])
        return list({id(r): r for r in found}.values())

    def close(self) -> None:
        for name in reversed(self._names):
            groups.destroy_group(name)

    def pool_max(self, value: float, device) -> float:
        """The largest of the attention workers' ``value``s, through the pool's collectives'
        own groups (an all-gather of one float64 each, on ``device``), counted in no level's
        bytes: the modelled device clock's exchange (``runtime.device``)."""
        counts = dict(self.aggregation.level_bytes)
        everyone = self.aggregation.gather_tokens(torch.tensor([[value]], dtype=torch.float64, device=device),
                                                  [1] * self.pool_size)
        self.aggregation.level_bytes.update(counts)
        return float(everyone.max())

    # -- whole job --------------------------------------------------------------------------

    def allreduce_everyone(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over every worker of every replica."""
        groups.allreduce(tensor, self.everyone)

    def allreduce_counterparts(self, tensor: torch.Tensor, segments=()) -> None:
        """Sum ``tensor`` over this worker and its counterparts in the other replicas, in place
        (``segments``: the lengths of the tensors it concatenates)."""
        self.counterpart_reducer.reduce(0, tensor, self.counterparts, segments)

    def isend(self, tensor: torch.Tensor, dst_gpu: int):
        return groups.isend(tensor, dst_gpu, self.world)

    def irecv(self, tensor: torch.Tensor, src_gpu: int):
        return groups.irecv(tensor, src_gpu, self.world)
