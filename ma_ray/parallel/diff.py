"""Plan diff: what has to move when the cluster switches from one plan (split) to another.

GPUs are identified by their physical slot (node, local GPU): the worker pinned to a slot stays
there when its role changes, while its global id and pool rank may change. The diff lists

* each head and each expert whose owner changes, from which slot to which slot (its parameters,
  fp32 master weights and AdamW moments, in every layer, travel along);
* each slot whose role changes (it drops its old shard and builds the other kind);
* each slot whose global id or pool rank changes (collective groups must be rebuilt).

It is pure data; the runtime decides how to carry it out (see ``PlanDiff.transfers`` for the
moves grouped by source and destination, one message per pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from ma_ray.parallel.placement import Plan, Slot


@dataclass(frozen=True)
class Move:
    item: int  # head id or expert id
    src: Slot
    dst: Slot


@dataclass(frozen=True)
class RoleChange:
    slot: Slot
    old_role: str
    new_role: str


@dataclass(frozen=True)
class Renumbering:
    slot: Slot
    old_gpu: int
    new_gpu: int
    old_rank: int
    new_rank: int


@dataclass(frozen=True)
class PlanDiff:
    head_moves: Tuple[Move, ...]
    expert_moves: Tuple[Move, ...]
    role_changes: Tuple[RoleChange, ...]
    renumbered: Tuple[Renumbering, ...]

    @property
    def is_empty(self) -> bool:
        return not (self.head_moves or self.expert_moves or self.role_changes or self.renumbered)

    def transfers(self) -> Dict[Tuple[Slot, Slot], Dict[str, List[int]]]:
        """Moves grouped by (source slot, destination slot): ``{"heads": [...], "experts": [...]}``."""
        grouped: Dict[Tuple[Slot, Slot], Dict[str, List[int]]] = {}
        for kind, moves in (("heads", self.head_moves), ("experts", self.expert_moves)):
            for m in moves:
                entry = grouped.setdefault((m.src, m.dst), {"heads": [], "experts": []})
                entry[kind].append(m.item)
        return grouped

    def to_dict(self) -> dict:
        return {
            "head_moves": [{"head": m.item, "src": list(m.src), "dst": list(m.dst)} for m in self.head_moves],
            "expert_moves": [{"expert": m.item, "src": list(m.src), "dst": list(m.dst)} for m in self.expert_moves],
            "role_changes": [{"slot": list(r.slot), "old_role": r.old_role, "new_role": r.new_role}
                             for r in self.role_changes],
            "renumbered": [{"slot": list(r.slot), "old_gpu": r.old_gpu, "new_gpu": r.new_gpu,
                            "old_rank": r.old_rank, "new_rank": r.new_rank} for r in self.renumbered],
        }


def _owners(plan: Plan, attribute: str) -> Dict[int, Slot]:
    return {item: g.slot for g in plan.gpus for item in getattr(g, attribute)}


def _moves(old: Plan, new: Plan, attribute: str) -> Tuple[Move, ...]:
    before, after = _owners(old, attribute), _owners(new, attribute)
    return tuple(Move(item, before[item], after[item]) for item in sorted(after) if before[item] != after[item])


def diff_plans(old: Plan, new: Plan) -> PlanDiff:
    """What changes from ``old`` to ``new``; both must describe the same cluster and model."""
    same = (old.num_nodes, old.gpus_per_node, old.num_heads, old.num_experts) == \
           (new.num_nodes, new.gpus_per_node, new.num_heads, new.num_experts)
    if not same:
        raise ValueError("plans differ in topology or model (nodes, GPUs per node, heads, experts); "
                         "only the split can change at run time")
    role_changes, renumbered = [], []
    for g_new in new.gpus:
        g_old = old.at_slot(g_new.slot)
        if g_old.role != g_new.role:
            role_changes.append(RoleChange(g_new.slot, g_old.role, g_new.role))
        if (g_old.gpu, g_old.rank) != (g_new.gpu, g_new.rank):
            renumbered.append(Renumbering(g_new.slot, g_old.gpu, g_new.gpu, g_old.rank, g_new.rank))
    return PlanDiff(_moves(old, new, "heads"), _moves(old, new, "experts"),
                    tuple(sorted(role_changes, key=lambda r: r.slot)),
                    tuple(sorted(renumbered, key=lambda r: r.slot)))
