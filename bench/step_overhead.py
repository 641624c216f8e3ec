"""Step overhead of MA separation on one machine: distributed step time / reference step time.

Same model, same batches, same step indices, same machine, one run. The reference is the
single-process ``ReferenceTrainer`` (the oracle of ``ma-ray verify``); the distributed step is
one ``WorkerSet`` step on an emulated Ray cluster (attention and MoE pools on disjoint
emulated GPUs, tensors between workers over the CPU gloo backend). Both do the same arithmetic,
so on the same cores the physical limit of the ratio is 1.0; what is above it is the cost of
the distributed runtime (transfers, pool collectives, idle pools, Python per op, Ray calls).

Cores and threads. ``--cores N`` (default: all) confines this process, and with it Ray and
every worker, to N cores. ``--threads fair`` (default) gives the reference N torch threads in
its one process and every worker 1: the pools take turns (a layer's experts wait for its
attention), so with pools of at most N workers both sides compute on the same N cores.
``--threads single`` gives everyone 1 thread (with N > 1 the reference then uses one core and
the workers several: it flatters the distributed side). ``--ref-threads`` / ``--worker-threads``
set them by hand. Ray starts workers at niceness 15; the reference runs here at 0, so the
benchmark sets ``RAY_worker_niceness=0`` to give both the same priority on a shared machine.

Measurement: warm-up steps on both, then ``--reps`` repetitions; each repetition times one
reference step and one distributed step in alternating order (reference first on even reps,
distributed first on odd ones), so slow phases of a shared, noisy machine hit both sides alike.
Medians are reported, and the ratio of the medians. The reference shares the machine with the
(idle) Ray processes while it is timed; ``--ref-alone K`` also times K reference steps before
Ray starts and K after it stops, and reports the ratio against those as a stricter second
figure. ``--op-times`` adds each worker's wall time per schedule op (where it waits).

    /work/venv/bin/python bench/step_overhead.py                     # the RESULTS.md run
    /work/venv/bin/python bench/step_overhead.py --cores 1 --threads single
    /work/venv/bin/python bench/step_overhead.py --set schedule.micro_batches_in_flight=1 --op-times
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

# Ray starts worker processes at niceness 15 (its default ``worker_niceness``; ``ray job submit``
# sets 0). The reference runs in this process at niceness 0, so on a machine with any other load
# the workers would get a fraction of the CPU the reference gets: give them the same priority.
os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from ma_ray import config as config_mod  # noqa: E402
from ma_ray.data import build_dataset  # noqa: E402
from ma_ray.verify.reference_trainer import ReferenceTrainer  # noqa: E402
from ma_ray.runtime.cluster import init_ray  # noqa: E402
from ma_ray.runtime.worker_set import WorkerSet  # noqa: E402
from ma_ray.runtime.step_metrics import summarize  # noqa: E402

# The configuration: compute-dominated (hidden 256, 4 layers, seq 256), 2 + 2 emulated GPUs.
BENCH_SETTINGS = {
    "cluster.num_nodes": 1,
    "cluster.gpus_per_node": 4,
    "cluster.attention_gpus": 2,
    "cluster.fake_gpus": True,
    "balance.min_attention_gpus": 1,
    "balance.max_attention_gpus": 3,
    "model.num_layers": 4,
    "model.hidden_size": 256,
    "model.num_attention_heads": 8,
    "model.attention_head_size": 32,
    "model.intermediate_size": 1024,
    "model.max_position_embeddings": 256,
    "model.vocab_size": 256,
    "model.hidden_dropout_prob": 0.0,
    "model.attention_probs_dropout_prob": 0.0,
    "moe.num_experts": 4,
    "moe.top_k": 2,
    "train.seq_length": 256,
    "train.micro_batch_size": 4,
    "train.gradient_accumulation_steps": 2,
    "train.batch_size": 8,
    "train.mixed_precision": "fp32",
    "train.activation_checkpointing": False,
    "train.num_train_steps": 1000,
    "train.warmup_steps": 10,
    "data.kind": "synthetic",
    # Two micro-batches in flight: one's attention runs while the other's experts do.
    "schedule.micro_batches_in_flight": 2,
}


def build_config(overrides):
    cfg = config_mod.load(None).replace(**BENCH_SETTINGS)
    if overrides:
        cfg = config_mod.load(None, [f"{k}={v}" for k, v in BENCH_SETTINGS.items()] + list(overrides))
    return cfg


def summary_line(cfg) -> str:
    m, t, c = cfg.model, cfg.train, cfg.cluster
    return (f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads x "
            f"{m.attention_head_size}, {cfg.moe.num_experts} experts top-{cfg.moe.top_k} "
            f"(inner {m.intermediate_size}, capacity factor {cfg.moe.capacity_factor}), vocab {m.vocab_size}\n"
            f"batch: seq {t.seq_length} x micro {t.micro_batch_size} x accum {t.gradient_accumulation_steps}"
            f" = {t.seq_length * t.batch_size} tokens/step, {t.mixed_precision}, dropout "
            f"{m.hidden_dropout_prob}/{m.attention_probs_dropout_prob}, data {cfg.data.kind}\n"
            f"cluster: {c.num_nodes} node x {c.gpus_per_node} emulated GPUs, {c.attention_gpus} attention + "
            f"{cfg.moe_gpus} MoE")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _install_op_timing() -> None:
    """Worker setup hook of ``--op-times``: each step's result also carries the wall seconds of
    every op kind of the schedule (``op:<kind>``), and of the whole step (``step_wall``) beside its
    CPU seconds in the worker process, all threads (``step_cpu``). The runtime's own labels are
    thread CPU time, so they show compute, not waiting; wall time per op shows where a worker
    waits (the op that waits for the other pool, or the pool collectives inside attn_fwd/bwd)."""
    import time as _time

    from ma_ray.runtime import role as _role

    if getattr(_role.Role, "_bench_op_timing", False):
        return
    plain_step = _role.Role.train_step

    def train_step(self, step):
        walls = defaultdict(float)
        handlers = dict(self._handlers)
        for kind, handler in handlers.items():
            def timed(mb, layer, _f=handler, _k=kind):
                t = _time.perf_counter()
                _f(mb, layer)
                walls[_k] += _time.perf_counter() - t
            self._handlers[kind] = timed
        t, c = _time.perf_counter(), _time.process_time()
        try:
            out = plain_step(self, step)
        finally:
            self._handlers.update(handlers)
        out.timings.update({f"op:{k}": v for k, v in walls.items()},
                           step_wall=_time.perf_counter() - t, step_cpu=_time.process_time() - c)
        return out

    _role.Role.train_step = train_step
    _role.Role._bench_op_timing = True


def distributed_step(job: WorkerSet, step: int):
    """``job.step`` with the workers' raw results kept (their per-label timings)."""
    by_slot = job.workers.train_step(step)
    results = [by_slot[g.slot] for g in job.plan.gpus]
    return summarize(job.cfg, job.plan, results), results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each side first (default 2)")
    ap.add_argument("--cores", type=int, default=None,
                    help="run everything (this process, Ray and its workers) on the first N cores of "
                         "this process's affinity (default: all of them)")
    ap.add_argument("--threads", choices=["fair", "single"], default="fair",
                    help="fair: reference N threads (N cores), workers 1 each; single: all 1")
    ap.add_argument("--ref-threads", type=int, default=None)
    ap.add_argument("--worker-threads", type=int, default=None)
    ap.add_argument("--ref-alone", type=int, default=3, metavar="K",
                    help="reference steps timed before Ray starts and after it stops (default 3 each)")
    ap.add_argument("--op-times", action="store_true",
                    help="also report each worker's wall time per op kind (a worker setup hook)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the benchmark's settings")
    args = ap.parse_args(argv)

    allowed = sorted(os.sched_getaffinity(0))
    if args.cores:
        allowed = allowed[:args.cores]
        os.sched_setaffinity(0, allowed)  # inherited by Ray's processes, started below
    cores = len(allowed)
    ref_threads = args.ref_threads or (cores if args.threads == "fair" else 1)
    worker_threads = args.worker_threads or 1

    cfg = build_config(args.set)
    print(summary_line(cfg))
    print(f"in flight: {cfg.schedule.micro_batches_in_flight} micro-batch(es); machine: {cores} core(s) "
          f"{allowed}, torch {torch.__version__}, ray {ray.__version__}; threads: reference {ref_threads}, "
          f"each worker {worker_threads}")
    print(f"warm-up {args.warmup} step(s) each, {args.reps} timed repetitions, order alternating; "
          f"worker niceness {os.environ['RAY_worker_niceness']}, load average {_load()}", flush=True)

    dataset = build_dataset(cfg)
    torch.set_num_threads(ref_threads)
    reference = ReferenceTrainer(cfg)

    def run_reference(step):
        batches = [dataset.micro_batch(step, i) for i in range(dataset.grad_accum)]
        t = time.perf_counter()
        out = reference.step(batches)
        return time.perf_counter() - t, out["total"]

    # Before Ray: warm up, then the reference alone on the machine. These steps advance the
    # reference's optimizer, so the losses of the interleaved reps differ slightly from the job's
    # (the timing does not depend on the parameter values); a fresh trainer is used for those.
    alone = []
    if args.ref_alone:
        for step in range(args.warmup):
            run_reference(step)
        alone = [run_reference(args.warmup + i)[0] for i in range(args.ref_alone)]
        print(f"reference alone before Ray: {' '.join(f'{t:.3f}' for t in alone)} s", flush=True)
        reference = ReferenceTrainer(cfg)
    t0 = time.perf_counter()
    if args.op_times:
        bench_dir = os.path.dirname(os.path.abspath(__file__))
        ray.init(num_cpus=cores, num_gpus=cfg.total_gpus, include_dashboard=False, logging_level="warning",
                 runtime_env={"worker_process_setup_hook": _install_op_timing,
                              "env_vars": {"PYTHONPATH": bench_dir}})
    else:
        init_ray(cfg.cluster, num_cpus=cores)
    job = WorkerSet(cfg, dataset, torch_threads=worker_threads)
    print(f"job up in {time.perf_counter() - t0:.1f} s", flush=True)

    def run_distributed(step):
        t = time.perf_counter()
        metrics, results = distributed_step(job, step)
        return time.perf_counter() - t, metrics, results

    try:
        for step in range(args.warmup):
            run_reference(step)
            run_distributed(step)
        ref_times, dist_times = [], []
        labels = defaultdict(list)  # (gpu, label) -> seconds per timed step
        print(f"\n{'rep':>3} {'order':>9} {'ref s':>7} {'dist s':>7} {'ratio':>6} {'ref loss':>9} {'dist loss':>9}"
              f" {'t_attention_s':>13} {'t_moe_s':>9}")
        for rep in range(args.reps):
            step = args.warmup + rep
            if rep % 2 == 0:
                tr, ref_loss = run_reference(step)
                td, metrics, results = run_distributed(step)
            else:
                td, metrics, results = run_distributed(step)
                tr, ref_loss = run_reference(step)
            ref_times.append(tr)
            dist_times.append(td)
            for g, r in zip(job.plan.gpus, results):
                for label, sec in r.timings.items():
                    labels[g.gpu, label].append(sec)
            print(f"{rep:>3} {'ref,dist' if rep % 2 == 0 else 'dist,ref':>9} {tr:7.3f} {td:7.3f} {td / tr:6.3f}"
                  f" {ref_loss:9.5f} {metrics.loss:9.5f} {metrics.t_attention_s * 1e3:11.2f}ms"
                  f" {metrics.t_moe_s * 1e3:7.2f}ms", flush=True)
        med_ref, med_dist = statistics.median(ref_times), statistics.median(dist_times)
        print(f"\nmedian reference step:   {med_ref:.4f} s  (min {min(ref_times):.4f}, max {max(ref_times):.4f})")
        print(f"median distributed step: {med_dist:.4f} s  (min {min(dist_times):.4f}, max {max(dist_times):.4f})")
        print(f"ratio of medians (distributed / reference): {med_dist / med_ref:.3f}   (load average {_load()})")
        print(f"median of per-rep ratios: {statistics.median(d / r for d, r in zip(dist_times, ref_times)):.3f}")
        print_breakdown(job.plan, labels, med_dist)
    finally:
        job.shutdown()
    if args.ref_alone:
        ray.shutdown()
        after = [run_reference(args.warmup + args.reps + i)[0] for i in range(args.ref_alone)]
        med_alone = statistics.median(alone + after)
        print(f"\nreference alone after Ray:  {' '.join(f'{t:.3f}' for t in after)} s")
        print(f"median reference step with no Ray running: {med_alone:.4f} s; distributed / that: "
              f"{med_dist / med_alone:.3f}   (load average {_load()})")
    return 0


def print_breakdown(plan, labels, med_dist: float) -> None:
    """Median seconds per step of every worker's timing labels, by pool."""
    print(f"\nper-worker timings, median seconds per step (distributed step {med_dist:.4f} s wall);")
    print("runtime labels (attention, moe, optimizer) are the worker thread's CPU time, waits (grad_sync, wait_*) wall time:")
    for is_attention, title in ((True, "attention pool"), (False, "MoE pool")):
        for g in (g for g in plan.gpus if g.is_attention == is_attention):
            mine = {lab: statistics.median(v) for (gpu, lab), v in labels.items() if gpu == g.gpu}
            plain = {k: v for k, v in mine.items() if not k.startswith("op:") and not k.startswith("step_")}
            line = ", ".join(f"{k} {v:.3f}" for k, v in sorted(plain.items()))
            print(f"  {title} gpu{g.gpu}: {line}; sum {sum(plain.values()):.3f}")
            ops = {k[3:]: v for k, v in mine.items() if k.startswith("op:")}
            if ops:
                print("      wall per op kind: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                           sorted(ops.items(), key=lambda kv: -kv[1]))
                      + f"; step wall {mine['step_wall']:.3f}, process CPU {mine['step_cpu']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
