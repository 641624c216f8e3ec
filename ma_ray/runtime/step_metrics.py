"""A step's metrics: what each worker reports and the job-wide record made from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass
class WorkerStepResult:
    """What one worker reports of a step. The loss parts are this worker's share (attention
    workers: their token slice; zero on MoE workers); ``timings`` are seconds per timer label
    (``runtime.timing``)."""

    grad_norm: float
    lr: float
    timings: Dict[str, float] = field(default_factory=dict)
    loss_share: float = 0.0
    ce_share: float = 0.0
    aux_share: float = 0.0
    z_share: float = 0.0
    dropped_fraction: float = 0.0


def summarize(cfg, plan, results: List[WorkerStepResult]) -> dict:
    """Per-step metrics from the workers' results (listed in global-id order)."""
    attn = [r for g, r in zip(plan.gpus, results) if g.is_attention]
    moe = [r for g, r in zip(plan.gpus, results) if not g.is_attention]
    stages = cfg.train.gradient_accumulation_steps * cfg.model.num_layers
    # A pool is as slow as its slowest worker; a stage is one layer of one micro-batch, fwd + bwd.
    t_attn = max(r.timings.get("attention", 0.0) for r in attn) / stages
    t_moe = max(r.timings.get("moe", 0.0) for r in moe) / stages
    # The attention pool's work includes its own all-gathers and reduce-scatters.
    busy_attn = max(r.timings.get("attention", 0.0) + r.timings.get("comm_attention", 0.0) for r in attn)
    passes = max(r.timings.get("pipeline", 0.0) for r in results)
    return {
        "loss": sum(r.loss_share for r in attn),
        "ce": sum(r.ce_share for r in attn),
        "aux": sum(r.aux_share for r in attn),
        "z": sum(r.z_share for r in attn),
        "grad_norm": attn[0].grad_norm,
        "dropped_fraction": attn[0].dropped_fraction,
        "lr": attn[0].lr,
        "t_attention_s": t_attn,
        "t_moe_s": t_moe,
        "imbalance": abs(t_attn - t_moe) / max(t_attn, t_moe, 1e-12),
        "t_passes_s": passes,
        "overlap_efficiency": overlap_efficiency(busy_attn, t_moe * stages, passes),
        "attention_gpus": plan.attention_gpus,
    }


def overlap_efficiency(compute_attention_s: float, compute_moe_s: float, passes_s: float) -> float:
    """The share of the lighter pool's work that ran while the heavier pool worked too:
    ``(C_a + C_m - P) / min(C_a, C_m)``, with ``C`` a pool's busiest worker's seconds of work in
    the step (compute, and for the attention pool its own collectives) and ``P`` the wall time
    of the step's forward and backward passes. 0 when the pools
    take turns (or worse: exposed transfers count against it), 1 when the lighter pool hides
    entirely; see README, Pipelining, for why this one and its ideal value."""
    lighter = min(compute_attention_s, compute_moe_s)
    if lighter <= 0:
        return 0.0
    return max(0.0, (compute_attention_s + compute_moe_s - passes_s) / lighter)
