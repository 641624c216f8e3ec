"""A step's metrics: what each worker reports (``WorkerStepResult``) and the job-wide record made
from them (``StepMetrics``), the one record the controller, the predictor, the gauges, the
progress bar and ``metrics.jsonl`` read. No Ray here (pure code imports it; the timer labels'
module brings torch); the figures themselves are ``parallel.step_time``'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ma_ray.parallel.step_time import PipelineShape, imbalance, overlap_efficiency
from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE
from ma_ray.runtime.timing import (ATTENTION_COLLECTIVES, ATTENTION_COMPUTE, COMPRESSION, DEVICE_CLOCK, GRAD_SYNC,
                                   MOE_COMPUTE, PASSES)


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
    level_bytes: Dict[str, float] = field(default_factory=dict)  # bytes sent by level (parallel.hierarchy)
    skipped: bool = False  # the loss or the gradient norm was not finite: nothing was applied


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
    t_aggregation_s: float  # the attention pool's per-layer collectives, per stage, slowest attention GPU
    imbalance: float  # step_time.imbalance(t_attention_s, t_moe_s)
    t_passes_s: float  # wall seconds of the forward and backward passes (slowest worker)
    overlap_efficiency: float  # step_time.overlap_efficiency of the step's work and passes
    attention_gpus: int
    bytes_intra_node: float  # bytes the collectives sent over NVLink this step, all GPUs of every replica
    bytes_inter_node: float  # the same over the network
    t_grad_sync_s: float  # the gradients' synchronisation (replicated, and across replicas), slowest GPU
    t_compression_s: float  # of which gradient compression's kernels
    step_time_s: Optional[float] = None  # wall seconds of the whole step, as its caller timed it
    tokens_per_s: Optional[float] = None  # tokens per step / step_time_s
    skipped: bool = False  # not applied: the loss or the gradient norm was not finite (train.on_nonfinite)
    # Under emulation.device_clock: the step on the modelled GPUs, to the end of the gradient
    # synchronisation, without the host's time (the slowest worker's clock; runtime.device).
    device_step_s: Optional[float] = None

    def with_wall_clock(self, step_time_s: float, tokens_per_step: int) -> "StepMetrics":
        """A copy with the step's wall time and the throughput it gives."""
        return dataclasses.replace(self, step_time_s=step_time_s, tokens_per_s=tokens_per_step / step_time_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(cfg, plan, results: List[WorkerStepResult]) -> StepMetrics:
    """The job's metrics of a step from the workers' results, listed in global-id order replica
    after replica. The replicas run at once, so a pool is as slow as its slowest worker in any
    of them; the loss parts add up over the replicas' shares of the micro-batches."""
    roles = [g for _ in range(plan.replicas) for g in plan.gpus]
    attn = [r for g, r in zip(roles, results) if g.is_attention]
    moe = [r for g, r in zip(roles, results) if not g.is_attention]
    firsts = attn[::plan.attention_gpus]  # each replica's attention rank 0
    clocks = [r.timings[DEVICE_CLOCK] for r in results if DEVICE_CLOCK in r.timings]
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
        dropped_fraction=sum(r.dropped_fraction for r in firsts) / len(firsts),
        lr=attn[0].lr,
        t_attention_s=t_attn,
        t_moe_s=t_moe,
        t_aggregation_s=max(r.timings.get(ATTENTION_COLLECTIVES, 0.0) for r in attn) / stages,
        imbalance=imbalance(t_attn, t_moe),
        t_passes_s=passes,
        overlap_efficiency=overlap_efficiency(busy_attn, t_moe * stages, passes),
        attention_gpus=plan.attention_gpus,
        bytes_intra_node=sum(r.level_bytes.get(INTRA_NODE, 0.0) for r in results),
        bytes_inter_node=sum(r.level_bytes.get(INTER_NODE, 0.0) for r in results),
        t_grad_sync_s=max(r.timings.get(GRAD_SYNC, 0.0) for r in results),
        t_compression_s=max(r.timings.get(COMPRESSION, 0.0) for r in attn),
        skipped=attn[0].skipped,
        device_step_s=max(clocks) if clocks else None,
    )
