"""Pure planning (no Ray, no torch): which GPU holds which heads or experts for a split of the
cluster between the attention and MoE pools, what moves when the split changes, how much memory
each GPU needs, and the methodology's stage-time model.

Modules: ``shares`` (balanced contiguous partition), ``placement`` (the plan), ``diff`` (plan to
plan), ``memory`` (per-GPU estimate), ``time_model`` (predicted stage times), ``report`` (what
``ma-ray plan`` prints), ``search`` (the layouts ``ma-ray plan --search`` scores).
"""

from ma_ray.parallel.diff import Move, PlanDiff, Renumbering, RoleChange, diff_plans
from ma_ray.parallel.memory import MemoryEstimate, estimate_gpu, estimate_plan
from ma_ray.parallel.placement import ATTENTION, MOE, GpuAssignment, Plan, Slot, make_plan, place, plan_of_move
from ma_ray.parallel.report import PlanReport, plan_report
from ma_ray.parallel.shares import balanced_ranges, share_counts
from ma_ray.parallel.time_model import StageTimes, predict_stage_times

__all__ = [
    "ATTENTION", "MOE", "GpuAssignment", "Plan", "Slot", "make_plan", "place", "plan_of_move",
    "Move", "PlanDiff", "Renumbering", "RoleChange", "diff_plans",
    "MemoryEstimate", "estimate_gpu", "estimate_plan",
    "StageTimes", "predict_stage_times", "PlanReport", "plan_report",
    "balanced_ranges", "share_counts",
]
