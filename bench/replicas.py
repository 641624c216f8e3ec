"""Data-parallel replicas of the emulated paper preset, and the planner's predictions against the
emulator.

    python bench/replicas.py [--micro-batches 4] [--steps 3] [--gpus 16,32] [--skip-seed]

Two parts, each job under ``emulation.modelled_compute`` on this machine's cores, ``--steps``
steps a job (the first dropped; the median of the rest):

* **The seed's layout, one and two replicas** (16 and 32 workers): the configured 4 x 4 at 12/4,
  ``--micro-batches`` micro-batches a step in all (each replica runs its share). Printed: the
  step on the modelled device clock (``emulation.device_clock``: what the step takes on the
  modelled GPUs, without this host's time; its wall time beside it); the gradient
  synchronisation as the step records it (an emulated collective is recorded as the time it
  stands for) beside ``StageDurations.replicas_allreduce_s``, the analytic figure; and the
  planner's predicted step for the same layout. The ratio of the two steps is the check of the
  replicas' cost: with R replicas each runs 1/R of the passes, and pays the synchronisation
  across replicas.
* **The planner against the emulator**: at each ``--gpus`` count, the layout ``ma-ray plan
  --search`` ranks first (``parallel.search``), run as it is (replicas, split, micro-batches in
  flight, hierarchical, compression), its measured step beside the predicted one.

The last line is the JSON of every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402

from ma_ray.comm.compression import CompressionSettings  # noqa: E402
from ma_ray.comm.cross_node import every_reducer  # noqa: E402
from ma_ray.parallel.search import layout_config, predict, search  # noqa: E402
from ma_ray.runtime.cluster import init_ray  # noqa: E402
from comm import emulated_paper, measure  # noqa: E402  (bench/, this script's folder)


def row(label: str, cfg, steps: int, reducers) -> dict:
    predicted = predict(cfg, reducers)
    got = measure(cfg, steps)
    out = {"label": label, "replicas": cfg.cluster.replicas, "workers": cfg.cluster.replicas * cfg.total_gpus,
           "split": f"{cfg.cluster.attention_gpus}/{cfg.moe_gpus}", "in_flight": cfg.schedule.micro_batches_in_flight,
           "hierarchical": cfg.comm.hierarchical_allreduce, "compression": cfg.comm.gradient_compression,
           "measured": got, "predicted": predicted.to_dict(),
           "step_measured_over_predicted": got["device_step_s"] / predicted.step_s}
    print(f"{label:>22} {out['workers']:>7} {out['split']:>6} {out['in_flight']:>4} "
          f"{'on' if out['hierarchical'] else 'off':>5} {out['compression']:>5} "
          f"{got['grad_sync_s'] * 1e3:>9.1f} / {predicted.grad_sync_s * 1e3:<9.1f} "
          f"{got['device_step_s']:>7.2f} / {predicted.step_s:<7.2f} {out['step_measured_over_predicted']:>6.3f} "
          f"{got['wall_step_s']:>7.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches a step, over all replicas")
    ap.add_argument("--steps", type=int, default=3, help="steps per job, the first dropped")
    ap.add_argument("--gpus", default="16,32", help="GPU counts whose planner pick is run ('' for none)")
    ap.add_argument("--skip-seed", action="store_true", help="leave out the seed's layout at one and two replicas")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    mb = args.micro_batches
    base = emulated_paper(mb, args.overrides)
    reducers = every_reducer(CompressionSettings.of(base.comm))
    counts = [int(n) for n in args.gpus.split(",") if n]
    largest = max([2 * base.total_gpus] * (not args.skip_seed) + counts)
    # One emulated cluster for every job: as many fake GPUs as the largest needs.
    init_ray(dataclasses.replace(base.cluster, num_nodes=largest // base.cluster.gpus_per_node),
             num_cpus=os.cpu_count())
    print(f"emulated paper preset, {mb} micro-batches a step in all, {args.steps} steps a job (first dropped)")
    print(f"{'layout':>22} {'workers':>7} {'split':>6} {'m':>4} {'hier':>5} {'comp':>5} "
          f"{'grad sync ms: recorded / analytic':>33} {'step s: device clock / pred.':>17} {'ratio':>6} "
          f"{'wall s':>7}")
    out = []
    if not args.skip_seed:
        for r in (1, 2):
            out.append(row(f"seed layout x {r}", base.replace(**{"cluster.replicas": r}), args.steps, reducers))
        one, two = out[-2], out[-1]
        measured = two["measured"]["device_step_s"] / one["measured"]["device_step_s"]
        predicted = two["predicted"]["step_s"] / one["predicted"]["step_s"]
        print(f"two replicas' step / one's: measured {measured:.3f}, predicted {predicted:.3f}")
    for gpus in counts:
        result = search(base, reducers, nodes=gpus // base.cluster.gpus_per_node, gpus=gpus)
        pick = result.rows[0].layout
        out.append(row(f"planner's pick at {gpus}", layout_config(base, pick), args.steps, reducers))
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
