"""The plan report: a plan with its memory estimates, predicted stage times and memory budgets,
as a dict (for JSON) or a readable table. It is what ``ma-ray plan`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from ma_ray.config import Config
from ma_ray.parallel.memory import GB, MemoryEstimate, budget_gb, estimate_plan, precision_of
from ma_ray.parallel.placement import ATTENTION, MOE, Plan, make_plan
from ma_ray.parallel.time_model import StageTimes, predict_stage_times


@dataclass(frozen=True)
class PlanReport:
    cfg: Config
    plan: Plan
    memory: Tuple[MemoryEstimate, ...]  # indexed by global id, fused attention
    memory_unfused: Tuple[MemoryEstimate, ...]  # the same with unfused attention, for comparison
    predicted: StageTimes

    def peak(self, role: str, unfused: bool = False) -> MemoryEstimate:
        """The largest estimate among the GPUs of ``role`` (a plan never leaves a pool empty)."""
        pool = [e for e in (self.memory_unfused if unfused else self.memory) if e.role == role]
        return max(pool, key=lambda e: e.total_bytes)

    def to_dict(self) -> dict:
        c = self.cfg
        gpus = []  # every replica's, replica by replica (the same split and memory in each)
        for copy in self.plan.replica_plans():
            for g, mem in zip(copy.gpus, self.memory):
                gpus.append({**g.to_dict(), "replica": copy.replica, "memory_gb": mem.total_gb, "memory": mem.to_dict()})
        budgets = {}
        for role in (ATTENTION, MOE):
            peak, peak_unfused = self.peak(role), self.peak(role, unfused=True)
            budgets[role] = {"budget_gb": budget_gb(c, role), "peak_gb": peak.total_gb,
                             "peak_unfused_attention_gb": peak_unfused.total_gb,
                             "peak_without_checkpointing_gb": (peak.total_bytes - peak.activations_bytes
                                                               + peak.activations_full_bytes) / GB}
        return {
            "topology": {"num_nodes": self.plan.num_nodes, "gpus_per_node": self.plan.gpus_per_node,
                         "replicas": self.plan.replicas},
            "attention_gpus": self.plan.attention_gpus,
            "moe_gpus": self.plan.moe_gpus,
            "gpus": gpus,
            "predicted": self.predicted.to_dict(),
            "memory": {"precision": precision_of(c).name,
                       "activation_checkpointing": c.train.activation_checkpointing,
                       "micro_batch_tokens": c.train.micro_batch_size * c.train.seq_length,
                       **budgets},
        }

    def format_table(self) -> str:
        c, p = self.cfg, self.plan
        copies = (f"{p.replicas} replicas (data-parallel copies, each on nodes of its own) of "
                  if p.replicas > 1 else "")
        lines = [
            f"Plan: {copies}{p.num_nodes} nodes x {p.gpus_per_node} GPUs; {p.attention_gpus} attention GPUs "
            f"({p.num_heads} heads), {p.moe_gpus} MoE GPUs ({p.num_experts} experts)",
            "",
        ]
        # Tiny (test) models would read 0.0 GB everywhere: switch the column to MB for them.
        unit, scale = ("GB", GB) if max(m.total_bytes for m in self.memory) >= GB else ("MB", 1e6)
        rows = [("replica", "gpu", "node", "local gpu", "role", "heads", "experts", f"memory {unit}")]
        for copy in p.replica_plans():
            for g, mem in zip(copy.gpus, self.memory):
                rows.append((str(copy.replica), str(g.gpu), str(g.node), str(g.local_gpu), g.role, _span(g.heads),
                             _span(g.experts), f"{mem.total_bytes / scale:.1f}"))
        if p.replicas == 1:
            rows = [r[1:] for r in rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  ".join(cell.rjust(w) if cell[:1].isdigit() else cell.ljust(w)
                                   for cell, w in zip(r, widths)).rstrip())
        t = self.predicted
        lines += [
            "",
            f"Predicted stage times (seed time model): attention {t.t_attention_s:.4f} s, "
            f"MoE {t.t_moe_s:.4f} s ({t.active_experts} experts on the busiest MoE GPU); "
            f"slower / faster = {t.slower_over_faster:.2f}",
            f"Memory per GPU ({precision_of(c).name}, AdamW, activation checkpointing "
            f"{'on' if c.train.activation_checkpointing else 'off'}, fused attention, "
            f"micro-batch {c.train.micro_batch_size} x {c.train.seq_length}):",
        ]
        for role, key in ((ATTENTION, "memory.attention_gpu_budget_gb"), (MOE, "memory.moe_gpu_budget_gb")):
            peak, unfused = self.peak(role), self.peak(role, unfused=True)
            budget = budget_gb(c, role)
            verdict = "fits" if peak.total_gb <= budget else "OVER BUDGET"
            states = peak.params_bytes + peak.grads_bytes + peak.optimizer_bytes
            line = (f"  {role:<9} peak {peak.total_bytes / scale:7.1f} {unit} of {budget:.1f} GB budget ({key}): "
                    f"{verdict}; params+grads+AdamW {states / scale:.1f}, activations "
                    f"{peak.activations_bytes / scale:.1f}, workspace {peak.workspace_bytes / scale:.1f}")
            if role == ATTENTION:
                line += f"; with unfused attention {unfused.total_bytes / scale:.1f} {unit}"
            lines.append(line)
        return "\n".join(lines)


def _span(items: Sequence[int]) -> str:
    """A contiguous range as ``first-last`` (a single item as itself, none as ``-``)."""
    if not items:
        return "-"
    if len(items) == 1:
        return str(items[0])
    if list(items) == list(range(items[0], items[-1] + 1)):
        return f"{items[0]}-{items[-1]}"
    return ",".join(map(str, items))


def plan_report(cfg: Config) -> PlanReport:
    """The report for ``cfg`` at its split."""
    plan = make_plan(cfg)
    return PlanReport(cfg, plan, estimate_plan(cfg, plan, fused_attention=True),
                      estimate_plan(cfg, plan, fused_attention=False), predict_stage_times(cfg, plan))
