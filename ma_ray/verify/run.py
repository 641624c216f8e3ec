"""``ma-ray verify``: the distributed layout against the single-process reference.

Both start from the same layout-independent initial parameters and see the same batches. After
every step the loss, every gradient and every updated parameter are gathered by global name and
compared (``ma_ray.verify.compare``). Equivalence is a property of fp32 without dropout, so verify
forces those two settings and says so in its report.
"""

from __future__ import annotations

from typing import Dict, Optional

from ma_ray.config import Config, ConfigError, check_split
from ma_ray.data import build_dataset
from ma_ray.verify.compare import gradient_error, parameter_error, scalar_relative_error
from ma_ray.verify.reference_trainer import ReferenceTrainer
from ma_ray.runtime.cluster import init_ray
from ma_ray.runtime.worker_set import WorkerSet

TOLERANCE = 1e-5  # fp64 and fp32: every figure, the initial parameters included

# bf16 autocast, judged on the loss and the gradients only. Each gradient element passes through
# a few bf16 roundings (activations crossing the pools and stored for backward, matmul outputs),
# in another order in a distributed layout than in the reference; each costs up to the unit
# roundoff 2^-8 = 3.9e-3 of the element's scale, and four layers of about three roundings each
# bound the gradients' error by about 12 x 3.9e-3 = 0.047. The loss is a mean over every token in
# fp32, where the roundings average out (7e-6 measured against 1e-3). Measured on 2 x 3 GPUs,
# m = 2: gradients 0.019, against 1e-3 or more for a real error (a missing term is O(1)).
# Parameters are reported, not judged: AdamW's first steps move a weight by about
# lr * sign(gradient), so a near-zero gradient whose sign differs by rounding puts its weight
# 2 lr apart (0.3 of the initial scale at the local preset's lr), in any two runs.
BF16_TOLERANCE = {"loss_rel_err": 1e-3, "grad_rel_err": 5e-2}


def exact_settings(cfg: Config, precision: str) -> Config:
    """``cfg`` with the settings under which the layouts must agree to rounding."""
    return cfg.replace(**{"train.mixed_precision": precision, "model.hidden_dropout_prob": 0.0,
                          "model.attention_probs_dropout_prob": 0.0})


def parse_rebalances(text: Optional[str]) -> Dict[int, int]:
    """``"2:10,4:13"`` -> {2: 10, 4: 13}: before step 2 move to 10 attention GPUs, before 4 to 13."""
    out: Dict[int, int] = {}
    for item in filter(None, (text or "").split(",")):
        step, sep, k = item.partition(":")
        if not sep or not step.strip().isdigit() or not k.strip().isdigit():
            raise ConfigError(f"--rebalance: expected STEP:K[,STEP:K...], got {item!r}")
        out[int(step)] = int(k)
    return out


def steps_to_verify(steps: Optional[int], rebalances: Dict[int, int]) -> int:
    """``--steps`` when given; else 2, or one past the last rebalance."""
    return steps or max([2, *(step + 1 for step in rebalances)])


def verify(cfg: Config, steps: int = 2, precision: str = "fp64",
           torch_threads: Optional[int] = 1, rebalances: Optional[Dict[int, int]] = None) -> dict:
    """Run ``steps`` steps both ways, at ``cfg``'s split; the report's ``ok`` holds when every error is within TOLERANCE
    (bf16: the loss and gradient errors within BF16_TOLERANCE); it is None, with the reason, when
    gradient compression makes the run inexact by design.

    ``precision`` fp64 is the default because it is the one in which the comparison can be sharp:
    in fp32, AdamW's update ``lr * m / (sqrt(v) + eps)`` turns a gradient element near ``eps``
    (1e-8) into an update whose size depends on that element's *own* relative rounding error,
    so parameters of any two layouts (or of the reference on another thread count) drift apart
    by more than 1e-5 in places after one step, while losses and gradients agree to ~1e-6.
    """
    if cfg.emulation.modelled_compute:
        raise ConfigError("emulation.modelled_compute: verify compares real arithmetic; turn emulation off")
    cfg = exact_settings(cfg, precision)
    rebalances = rebalances or {}
    for step, k in rebalances.items():
        if not 1 <= step < steps:
            raise ConfigError(f"--rebalance: step {step} is not between 1 and --steps - 1 ({steps - 1})")
        check_split(cfg, k, key=f"--rebalance {step}:{k}")
    dataset = build_dataset(cfg)
    init_ray(cfg.cluster)
    job = WorkerSet(cfg, dataset, torch_threads=torch_threads)
    try:
        reference = ReferenceTrainer(cfg)
        init_std = cfg.model.initializer_range
        init_err, _ = max(parameter_error(p, reference.parameters_by_name(), init_std) for p in job.export_replicas())
        per_step, migrations = [], []
        for step in range(steps):
            if step in rebalances:
                migrations.append({"before_step": step, **job.move_to(rebalances[step])})
            got = job.step(step)
            want = reference.step([dataset.micro_batch(step, i) for i in range(dataset.grad_accum)])
            # Every replica against the reference: each must hold the whole step's gradients.
            grad, grad_name = max(gradient_error(g, reference.gradients_by_name())
                                  for g in job.export_replicas("grad"))
            param, param_name = max(parameter_error(p, reference.parameters_by_name(), init_std)
                                    for p in job.export_replicas())
            per_step.append({"loss": got.loss, "reference_loss": want["total"],
                             "loss_rel_err": scalar_relative_error(got.loss, want["total"]),
                             "grad_rel_err": grad, "worst_grad": grad_name,
                             "param_rel_err": param, "worst_param": param_name})
    finally:
        job.shutdown()
    worst = {key: max(s[key] for s in per_step) for key in ("loss_rel_err", "grad_rel_err", "param_rel_err")}
    if precision == "bf16":
        tolerance = BF16_TOLERANCE
        ok = init_err <= TOLERANCE and all(worst[key] <= tol for key, tol in tolerance.items())
    else:
        tolerance = TOLERANCE
        ok = max(init_err, *worst.values()) <= TOLERANCE
    inexact = {}
    if cfg.comm.gradient_compression != "none":
        # Compression is inexact by design: the errors are reported, and judged by convergence.
        ok = None
        inexact = {"inexact_by_design": f"comm.gradient_compression={cfg.comm.gradient_compression} changes the "
                                        f"gradients on purpose; it is judged by convergence against the exact "
                                        f"run (docs/communication.md), not by this comparison"}
        if cfg.comm.gradient_compression == "topk" and cfg.comm.compression_warmup_steps >= steps:
            inexact["compression_warmup"] = (f"comm.compression_warmup_steps={cfg.comm.compression_warmup_steps}: "
                                             f"all {steps} steps crossed dense; set it to 0 to compare compressed steps")
    return {
        "ok": ok, **inexact, "precision": precision, "dropout": 0.0, "steps": steps, "tolerance": tolerance,
        "attention_gpus": job.plan.attention_gpus, "moe_gpus": job.plan.moe_gpus, "replicas": job.plan.replicas,
        "initial_param_rel_err": init_err, **worst, "migrations": migrations, "per_step": per_step,
    }
