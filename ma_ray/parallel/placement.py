"""Placement: which GPU of the cluster does what for a given split of the GPUs between the pools.

From the topology (``num_nodes`` x ``gpus_per_node``) and a split (``k`` attention GPUs, the rest
MoE) this module computes, for every GPU, its global id, its physical slot (node, local GPU), its
role, and the heads (attention) or experts (MoE) it holds in every layer.

Which slots the MoE pool takes
    MoE GPUs are dealt round-robin over the nodes, each taking the highest free local index of
    its node: node 0 local G-1, node 1 local G-1, ..., then node 0 local G-2, and so on. Why:

    * every attention GPU talks to every MoE GPU at every layer; with the MoE pool spread evenly,
      each node carries the same share of that traffic on its inter-node link (and keeps the same
      share on its fast intra-node link), instead of one node's NIC carrying all of it;
    * the methodology's hierarchical all-reduce of the attention pool reduces inside each node first
      (``comm.hierarchical_allreduce``, ``parallel.hierarchy``); an even spread leaves every node with the same number of attention GPUs (or one fewer), so such
      intra-node groups are equal as far as the split allows and no node's group is the straggler;
    * the choice is nested: the MoE slots of a pool of ``m`` GPUs are the first ``m`` of one fixed
      order, so moving one GPU between the pools (k -> k +/- 1) changes the role of exactly one
      slot and leaves every other GPU on its side;
    * the highest local indices go to MoE so attention GPUs keep the low local indices, as in the
      methodology (local GPU 3 of each 4-GPU node is the MoE GPU).

Global numbering
    Attention GPUs first, ordered by (node, local GPU), then MoE GPUs in the round-robin order
    above. For the paper's 4 x 4 with 12 attention GPUs that is exactly the methodology's: GPUs 0-11 are
    local 0-2 of nodes 0-3, and MoE GPU 12 + j is local GPU 3 of node j. Ordering the MoE pool by
    deal order (not by slot) also keeps every MoE GPU's rank in its pool when the pool grows.
    A GPU's position in its pool (``rank``) is its rank in that pool's collective group.

Heads and experts
    Balanced contiguous ranges in global order (``shares.balanced_ranges``): counts differ by at
    most one and larger shares come first (32 heads over 12 GPUs: 3 x 8 then 2 x 4).

``place`` is the pure function of the numbers; ``make_plan`` places a config at its split,
which the config's validation checked; ``plan_of_move`` places a live move's target. All apply
the one rule of ``ma_ray.parallel.split``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Tuple

from ma_ray.config import Config, check_split
from ma_ray.errors import is_int
from ma_ray.parallel.shares import balanced_ranges
from ma_ray.parallel.split import split_error

ATTENTION = "attention"
MOE = "moe"


class Slot(NamedTuple):
    """A physical GPU: the node and the GPU's index on it. A GPU keeps its slot across plans."""

    node: int
    local_gpu: int


@dataclass(frozen=True)
class GpuAssignment:
    gpu: int  # global id in this plan
    node: int
    local_gpu: int
    role: str  # ATTENTION or MOE
    rank: int  # position in its pool: its rank in the pool's collective group
    heads: Tuple[int, ...] = ()  # attention GPUs: the heads it holds in every layer
    experts: Tuple[int, ...] = ()  # MoE GPUs: the experts it holds in every layer

    @property
    def slot(self) -> Slot:
        return Slot(self.node, self.local_gpu)

    @property
    def is_attention(self) -> bool:
        return self.role == ATTENTION

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "node": self.node, "local_gpu": self.local_gpu, "role": self.role,
                "rank": self.rank, "heads": list(self.heads), "experts": list(self.experts)}


@dataclass(frozen=True)
class Plan:
    num_nodes: int
    gpus_per_node: int
    num_heads: int
    num_experts: int
    gpus: Tuple[GpuAssignment, ...]  # indexed by global id
    # Data-parallel copies (``cluster.replicas``): this plan is copy ``replica`` of ``replicas``,
    # on nodes ``replica * num_nodes`` onwards; global ids, pool ranks, heads
    # and experts are the same in every copy, so a GPU's counterparts share its global id.
    replica: int = 0
    replicas: int = 1

    def for_replica(self, replica: int) -> "Plan":
        """Copy ``replica`` of this plan: the same GPUs, each on its node shifted to that copy's."""
        if not 0 <= replica < self.replicas:
            raise ValueError(f"replica {replica} is not one of the plan's {self.replicas}")
        shift = (replica - self.replica) * self.num_nodes
        gpus = tuple(dataclasses.replace(g, node=g.node + shift) for g in self.gpus)
        return dataclasses.replace(self, gpus=gpus, replica=replica)

    def replica_at(self, slot: Tuple[int, int]) -> "Plan":
        """The plan of the replica whose nodes hold ``slot`` (node, local GPU)."""
        return self.for_replica(slot[0] // self.num_nodes)

    def replica_plans(self) -> Tuple["Plan", ...]:
        """Every copy's plan, copy 0 first."""
        return tuple(self.for_replica(r) for r in range(self.replicas))

    @property
    def total_gpus(self) -> int:
        return len(self.gpus)

    @property
    def attention_gpus(self) -> int:
        """How many GPUs the attention pool has (``k``)."""
        return sum(1 for g in self.gpus if g.role == ATTENTION)

    @property
    def moe_gpus(self) -> int:
        """How many GPUs the MoE pool has."""
        return self.total_gpus - self.attention_gpus

    def attention_workers(self) -> Tuple[GpuAssignment, ...]:
        return tuple(g for g in self.gpus if g.role == ATTENTION)

    def moe_workers(self) -> Tuple[GpuAssignment, ...]:
        return tuple(g for g in self.gpus if g.role == MOE)

    def attention_ranks(self) -> List[int]:
        """Global ids of the attention pool, in pool-rank order."""
        return [g.gpu for g in self.attention_workers()]

    def moe_ranks(self) -> List[int]:
        """Global ids of the MoE pool, in pool-rank order."""
        return [g.gpu for g in self.moe_workers()]

    def attention_ranks_by_node(self) -> Dict[int, List[int]]:
        """Global ids of the attention GPUs of each node (the intra-node groups a hierarchical
        all-reduce would use; today's collectives are flat); nodes without attention GPUs are
        left out."""
        groups: Dict[int, List[int]] = {}
        for g in self.attention_workers():
            groups.setdefault(g.node, []).append(g.gpu)
        return groups

    def at_slot(self, slot: Tuple[int, int]) -> GpuAssignment:
        node, local_gpu = slot
        for g in self.gpus:
            if g.node == node and g.local_gpu == local_gpu:
                return g
        raise KeyError(f"no GPU at node {node}, local GPU {local_gpu}")

    def owner_of_head(self, head: int) -> GpuAssignment:
        for g in self.gpus:
            if head in g.heads:
                return g
        raise KeyError(f"head {head} is not in this plan (0..{self.num_heads - 1})")

    def owner_of_expert(self, expert: int) -> GpuAssignment:
        for g in self.gpus:
            if expert in g.experts:
                return g
        raise KeyError(f"expert {expert} is not in this plan (0..{self.num_experts - 1})")

    def to_dict(self) -> dict:
        return {"num_nodes": self.num_nodes, "gpus_per_node": self.gpus_per_node,
                "num_heads": self.num_heads, "num_experts": self.num_experts,
                "attention_gpus": self.attention_gpus, "moe_gpus": self.moe_gpus,
                "replica": self.replica, "replicas": self.replicas,
                "gpus": [g.to_dict() for g in self.gpus]}


def moe_slots(num_nodes: int, gpus_per_node: int, moe_gpus: int) -> List[Slot]:
    """The slots of a MoE pool of ``moe_gpus`` GPUs, in deal order (see the module docstring).

    Pick ``i`` lands on node ``i % num_nodes`` at local index ``gpus_per_node - 1 - i // num_nodes``:
    nodes are all the same size, so round-robin never meets a full node before every slot is taken.
    """
    if not 0 <= moe_gpus <= num_nodes * gpus_per_node:
        raise ValueError(f"{moe_gpus} MoE GPUs do not fit {num_nodes} x {gpus_per_node} GPUs")
    return [Slot(i % num_nodes, gpus_per_node - 1 - i // num_nodes) for i in range(moe_gpus)]


def place(num_nodes: int, gpus_per_node: int, attention_gpus: int, num_heads: int,
          num_experts: int) -> Plan:
    """The plan for ``attention_gpus`` attention GPUs out of ``num_nodes * gpus_per_node``.

    Raises ValueError when the split leaves a pool empty or a GPU without a head or an expert;
    the policy range (min/max attention GPUs) is the config's or the caller's business.
    """
    total = num_nodes * gpus_per_node
    moe_gpus = total - attention_gpus
    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"topology must have at least one node and one GPU per node, "
                         f"got {num_nodes} x {gpus_per_node}")
    problem = split_error(attention_gpus, total, num_heads, num_experts)
    if problem is not None:
        raise ValueError(problem)

    moe_order = moe_slots(num_nodes, gpus_per_node, moe_gpus)
    taken = set(moe_order)
    attention_order = [Slot(n, l) for n in range(num_nodes) for l in range(gpus_per_node)
                       if Slot(n, l) not in taken]

    gpus: List[GpuAssignment] = []
    for rank, (slot, heads) in enumerate(zip(attention_order, balanced_ranges(num_heads, attention_gpus))):
        gpus.append(GpuAssignment(len(gpus), slot.node, slot.local_gpu, ATTENTION, rank, heads=tuple(heads)))
    for rank, (slot, experts) in enumerate(zip(moe_order, balanced_ranges(num_experts, moe_gpus))):
        gpus.append(GpuAssignment(len(gpus), slot.node, slot.local_gpu, MOE, rank, experts=tuple(experts)))
    return Plan(num_nodes, gpus_per_node, num_heads, num_experts, tuple(gpus))


def make_plan(cfg: Config) -> Plan:
    """The plan of ``cfg`` at its split, ``cluster.attention_gpus`` (validated with the config)."""
    return _placed(cfg, cfg.cluster.attention_gpus)


def plan_of_move(cfg: Config, target: int) -> Plan:
    """The plan a live move of ``cfg``'s job goes to: ``target`` attention GPUs on the same
    topology. ConfigError (one line) when the topology and model cannot hold it; the policy
    range is the caller's to check (the live policy's may differ from the config's)."""
    check_split(cfg, target, within_policy=False)
    return _placed(cfg, target)


def _placed(cfg: Config, attention_gpus: int) -> Plan:
    c = cfg.cluster
    plan = place(c.num_nodes, c.gpus_per_node, attention_gpus, cfg.model.num_attention_heads, cfg.moe.num_experts)
    return dataclasses.replace(plan, replicas=c.replicas)


def replicate(plan: Plan, replicas: int) -> Plan:
    """``replicas`` data-parallel copies of ``plan`` side by side, copy ``r`` on nodes
    ``r * num_nodes`` onwards, each keeping its slots, roles, heads and experts; global ids run
    copy by copy, and a GPU's ``rank`` is its rank in its pool across all copies. It stands for
    the groups that all-reduce gradients between the copies (a GPU with its counterparts), for
    the communication model (``parallel.emulation``); no job runs such a plan as one (a job
    runs ``Plan.replica_plans``)."""
    if not is_int(replicas) or replicas < 1:
        raise ValueError(f"replicas: must be an integer >= 1, got {replicas!r}")
    pools = [plan.attention_workers(), plan.moe_workers()]
    gpus: List[GpuAssignment] = []
    for pool in pools:  # attention GPUs of every copy first, as in one plan
        for r in range(replicas):
            for g in pool:
                gpus.append(GpuAssignment(len(gpus), g.node + r * plan.num_nodes, g.local_gpu, g.role,
                                          g.rank + r * len(pool), g.heads, g.experts))
    return Plan(plan.num_nodes * replicas, plan.gpus_per_node, plan.num_heads, plan.num_experts, tuple(gpus))
