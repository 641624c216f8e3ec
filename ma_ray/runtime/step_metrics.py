"""A step's metrics: what each worker reports (``WorkerStepResult``) and the job-wide record made
from them (``StepMetrics``), the one record the controller, the predictor, the gauges, the
progress bar and ``metrics.jsonl`` read. No Ray here (pure code imports it; the timer labels'
module brings torch); the figures themselves are ``parallel.step_time``'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ma_ray.parallel.step_time import PipelineShape, imbalance, overlap_efficiency
from ma_ray.runtime.timing import ATTENTION_COLLECTIVES, ATTENTION_COMPUTE, MOE_COMPUTE, PASSES


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


@dataclass(frozen=True)
class StepMetrics:
    """One training step, job-wide. ``summarize`` makes it from the workers' results; the
    wall-clock part (``step_time_s``, ``tokens_per_s``) is None until whoever timed the step
    around the workers adds it (``with_wall_clock``: the controller does). ``to_dict()`` is its
    JSON form, the keys of ``metrics.jsonl`` and of the controller's history rows."""

    loss: float  # total loss: cross-entropy + aux + z, summed over the attention workers' token slices
    ce: float
    aux: float
    z: float
    grad_norm: float  # before clipping
    dropped_fraction: float  # routed token slots over expert capacity
    lr: float
    t_attention_s: float  # seconds per stage (one layer of one micro-batch, fwd + bwd), slowest attention GPU
    t_moe_s: float  # the same for the MoE pool
    imbalance: float  # step_time.imbalance(t_attention_s, t_moe_s)
    t_passes_s: float  # wall seconds of the forward and backward passes (slowest worker)
    overlap_efficiency: float  # step_time.overlap_efficiency of the step's work and passes
    attention_gpus: int
    step_time_s: Optional[float] = None  # wall seconds of the whole step, as its caller timed it
    tokens_per_s: Optional[float] = None  # tokens per step / step_time_s

    def with_wall_clock(self, step_time_s: float, tokens_per_step: int) -> "StepMetrics":
        """A copy with the step's wall time and the throughput it gives."""
        return dataclasses.replace(self, step_time_s=step_time_s, tokens_per_s=tokens_per_step / step_time_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(cfg, plan, results: List[WorkerStepResult]) -> StepMetrics:
    """The job's metrics of a step from the workers' results (listed in global-id order)."""
    attn = [r for g, r in zip(plan.gpus, results) if g.is_attention]
    moe = [r for g, r in zip(plan.gpus, results) if not g.is_attention]
    stages = PipelineShape.from_config(cfg).stages
    # A pool is as slow as its slowest worker; a stage is one layer of one micro-batch, fwd + bwd.
    t_attn = max(r.timings.get(ATTENTION_COMPUTE, 0.0) for r in attn) / stages
    t_moe = max(r.timings.get(MOE_COMPUTE, 0.0) for r in moe) / stages
    # The attention pool's work includes its own all-gathers and reduce-scatters.
    busy_attn = max(r.timings.get(ATTENTION_COMPUTE, 0.0) + r.timings.get(ATTENTION_COLLECTIVES, 0.0)
                    for r in attn)
    passes = max(r.timings.get(PASSES, 0.0) for r in results)
    return StepMetrics(
        loss=sum(r.loss_share for r in attn),
        ce=sum(r.ce_share for r in attn),
        aux=sum(r.aux_share for r in attn),
        z=sum(r.z_share for r in attn),
        grad_norm=attn[0].grad_norm,
        dropped_fraction=attn[0].dropped_fraction,
        lr=attn[0].lr,
        t_attention_s=t_attn,
        t_moe_s=t_moe,
        imbalance=imbalance(t_attn, t_moe),
        t_passes_s=passes,
        overlap_efficiency=overlap_efficiency(busy_attn, t_moe * stages, passes),
        attention_gpus=plan.attention_gpus,
    )
