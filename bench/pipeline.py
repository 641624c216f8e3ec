"""What the ping-pong pipeline buys: achieved step passes against the analytic ideal, m = 1, 2, 4.

For each number ``m`` of micro-batches in flight, one job runs ``--steps`` steps (the first is
dropped as warm-up) and the medians of its passes' wall time ``P`` and overlap efficiency are
printed with the ideal of the same schedule (``ma_ray.parallel.step_time``) and the ratio
achieved / ideal. Every figure is measured in this run; the ideal comes from the stage times.

* ``--mode emulated`` (default): the paper preset under ``emulation.modelled_compute`` with
  ``--micro-batches`` micro-batches per step. Stage times of the ideal are the device times the
  run measured (the time model at each worker's actual routed rows; the busiest worker of each pool),
  plus the attention stage's modelled ring collectives (two per pass, and the recompute's gather); ``T_c`` is the busiest MoE
  GPU's inbound rows over its links at a uniform router. Goals at m = 4: efficiency
  >= ``comm.overlap_efficiency_target`` (0.85; the last line says whether it is met),
  achieved / ideal <= 1.10.
* ``--mode real``: the local CPU preset computing for real; stage times of the ideal are the
  measured ones of the same run (``T_c`` = 0: not measurable apart), so the ratio says what the
  schedule buys on this machine's shared cores.

    /work/venv/bin/python bench/pipeline.py                    # emulated paper preset
    /work/venv/bin/python bench/pipeline.py --mode real
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_worker_niceness", "0")  # same priority as this process

import ray  # noqa: E402

from ma_ray import config as C  # noqa: E402
from ma_ray.data import build_dataset  # noqa: E402
from ma_ray.parallel.emulation import compute_setup, stage_durations  # noqa: E402
from ma_ray.parallel.step_time import FORWARD_SHARE, PipelineShape, overlap_efficiency, step_time_s  # noqa: E402
from ma_ray.parallel.placement import make_plan  # noqa: E402
from ma_ray.parallel.search import aggregation_ops_per_stage  # noqa: E402
from ma_ray.parallel.shares import share_counts  # noqa: E402
from ma_ray.parallel.workload import Workload  # noqa: E402
from ma_ray.runtime.cluster import init_ray  # noqa: E402
from ma_ray.runtime.worker_set import WorkerSet  # noqa: E402


def emulated_stage_times(cfg):
    """(T_a, T_m, T_c, rings) of one stage, forward + backward, at the plan's busiest GPUs and a
    uniform router; ``rings``: the attention stage's share spent in its collectives."""
    d = stage_durations(cfg)
    plan = make_plan(cfg)
    shape = Workload(cfg).shape(plan.attention_gpus)
    tokens = cfg.train.micro_batch_size * cfg.train.seq_length
    full = tokens * cfg.model.hidden_size * d.activation_bytes
    ring = d.pool_collective_s(plan, full, False, cfg.comm.hierarchical_allreduce,
                               share_counts(tokens, plan.attention_gpus))
    rings = aggregation_ops_per_stage(cfg) * ring  # gather + scatter each pass, the recompute's gather
    t_a = d.attention_stage_s(shape.heads, shape.tokens) + rings
    t_m = d.moe_stage_s(shape.experts, shape.rows)
    t_c = d.moe_inbound_s(plan, shape.rows)
    return t_a, t_m, t_c, rings


def run(cfg, steps):
    dataset = build_dataset(compute_setup(cfg)[0])
    job = WorkerSet(cfg, dataset, torch_threads=1)
    try:
        rows = []
        for step in range(steps):
            t0 = time.perf_counter()
            rows.append({**job.step(step).to_dict(), "wall": time.perf_counter() - t0})
        return rows[1:]
    finally:
        job.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["emulated", "real"], default="emulated")
    ap.add_argument("--steps", type=int, default=3, help="steps per m, the first dropped (default 3)")
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step, emulated (default 4)")
    ap.add_argument("--in-flight", default="1,2,4")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    emulated = args.mode == "emulated"
    if emulated:
        mb = args.micro_batches
        base = C.load("cluster/paper-16gpu.yaml", ["emulation.modelled_compute=true", "cluster.fake_gpus=true",
                                                   f"train.gradient_accumulation_steps={mb}",
                                                   f"train.batch_size={64 * mb}", *args.overrides])
    else:
        base = C.load("cluster/local-cpu.yaml", ["data.kind=synthetic", *args.overrides])
    init_ray(base.cluster, num_cpus=os.cpu_count())
    layers, micro = base.model.num_layers, base.train.gradient_accumulation_steps
    stages = layers * micro
    print(f"mode={args.mode} layers={layers} micro_batches={micro} steps={args.steps} (first dropped)")
    rings, t_c = 0.0, 0.0
    if emulated:
        t_a, t_m, t_c, rings = emulated_stage_times(base)
        print(f"time model at a uniform router (s): T_a={t_a:.4f} (rings {rings:.4f}) T_m={t_m:.4f} "
              f"T_c={t_c:.4f} (forward share {FORWARD_SHARE:.3f}); the ideal uses the measured T_a, T_m")
    print(f"{'m':>2} {'achieved P (s)':>15} {'ideal (s)':>10} {'achieved/ideal':>15} "
          f"{'overlap eff.':>13} {'ideal eff.':>11} {'step wall (s)':>14}")
    for m in [int(x) for x in args.in_flight.split(",")]:
        cfg = base.replace(**{"schedule.micro_batches_in_flight": m})
        rows = run(cfg, args.steps)
        p = statistics.median(r["t_passes_s"] for r in rows)
        eff = statistics.median(r["overlap_efficiency"] for r in rows)
        # The ideal of the stage times this run held: measured, as the router's drops change the
        # MoE rows from step to step (under emulation: device time; plus the modelled rings).
        t_a = statistics.median(r["t_attention_s"] for r in rows) + (rings if emulated else 0.0)
        t_m = statistics.median(r["t_moe_s"] for r in rows)
        ideal = step_time_s(t_a, t_m, PipelineShape(micro, layers, m), t_c)
        ideal_eff = overlap_efficiency(t_a * stages, t_m * stages, ideal)
        wall = statistics.median(r["wall"] for r in rows)
        print(f"{m:>2} {p:>15.3f} {ideal:>10.3f} {p / ideal:>15.3f} {eff:>13.3f} {ideal_eff:>11.3f} {wall:>14.3f}",
              flush=True)
    target = base.comm.overlap_efficiency_target
    print(f"goal (comm.overlap_efficiency_target): overlap efficiency >= {target:.2f} at the largest m: "
          f"{'met' if eff >= target else 'not met'} ({eff:.3f})")
    ray.shutdown()


if __name__ == "__main__":
    main()
