"""The attention pool's communication in one level, in two, and in two with gradient compression,
on the emulated paper preset, against the analytic figures of ``parallel.hierarchy``.

    python bench/comm.py [--splits 12,8] [--slow-splits 12] [--micro-batches 2] [--steps 2]

For each split and each setting (``flat``: ``comm.hierarchical_allreduce=false``; ``two-level``;
``two-level+bf16`` and ``two-level+topk``: also ``comm.gradient_compression`` bf16 or topk) one
job runs ``--steps`` steps under ``emulation.modelled_compute`` (the first dropped; the median
of the rest) and prints:

* the analytic time of one per-layer aggregation op (an all-gather or reduce-scatter of a
  64 x 2048 x 4096 bf16 micro-batch) and of the replicated gradients' synchronisation (with
  compression: its kernels' modelled time too). Under emulation a collective is recorded as the
  time it stands for, so these are what the step records too;
* the step's length on the modelled GPUs, measured on the workers' modelled device clocks
  (``emulation.device_clock``, ``runtime.device``: the longest clock at the gradient
  synchronisation's end), and its difference from the flat setting's against the analytic
  difference: with one micro-batch in flight the pools take turns, so a setting saves in the
  step what its collectives save, ``32 ops a step x the op's time`` plus the gradient
  synchronisation's. This is the measured check of the model. A difference is the median over
  the kept steps of each step's against flat's same step (the same data: the steps' routing,
  and so the MoE pool's modelled work, differ from step to step);
* the step's host wall time beside it, and its difference from flat's: on this machine it also
  holds the host's time that a GPU does not wait for (the stand-ins' gloo calls on cores shared
  by every emulated GPU, the host work between a collective and the next launch, and the
  device clock's own exchange, an all-gather of a float per collective), so it is not the
  figure the analytic model predicts;
* the bytes each level sent in the step, summed over the attention GPUs, counted and analytic.

``--slow-splits`` repeats the settings at ``emulation.inter_node_gb_per_s=12.5`` (100 Gb
Ethernet), where compression should matter more. The compression kernels' share of the step is
checked against ``comm.compression_overhead``. The last line is the JSON of every row.

``--bytes-splits`` (default 9,14: nodes of 2, 2, 2, 3 and 3, 3, 4, 4) first checks the bytes
sent against the bytes modelled on real two-level groups of the CPU backend: one actor per
attention GPU runs one all-gather and one reduce-scatter of a micro-batch's token slices (the
preset's 64 x 2048 rows, one fp32 column) and the all-reduce of a flat vector, and reports, per
op and level, the most any GPU sent (``comm.uneven``'s count, scaled to the preset's bytes like
the model), the most the model gives any GPU, their ratio, and what padding every chunk to the
largest sent before. ``--bytes-only`` stops there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_worker_niceness", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from ma_ray import config as C  # noqa: E402
from ma_ray.comm.compression import CompressionSettings  # noqa: E402
from ma_ray.comm.cross_node import cross_node_reducer  # noqa: E402
from ma_ray.data import build_dataset  # noqa: E402
from ma_ray.parallel.emulation import compute_setup, stage_durations  # noqa: E402
from ma_ray.parallel.hierarchy import INTER_NODE, INTRA_NODE, TwoLevelLayout  # noqa: E402
from ma_ray.parallel.placement import make_plan  # noqa: E402
from ma_ray.parallel.shares import share_counts  # noqa: E402
from ma_ray.runtime.cluster import init_ray  # noqa: E402
from ma_ray.runtime.worker_set import WorkerSet  # noqa: E402

SETTINGS = {
    "flat": {"comm.hierarchical_allreduce": False, "comm.gradient_compression": "none"},
    "two-level": {"comm.hierarchical_allreduce": True, "comm.gradient_compression": "none"},
    "two-level+bf16": {"comm.hierarchical_allreduce": True, "comm.gradient_compression": "bf16"},
    "two-level+topk": {"comm.hierarchical_allreduce": True, "comm.gradient_compression": "topk",
                       "comm.compression_warmup_steps": 0},  # compressed from its first step
}
OPS_PER_STAGE = 4  # forward: all-gather, reduce-scatter; backward: the same


def analytic(cfg) -> dict:
    """Per-op aggregation seconds, gradient synchronisation seconds, and bytes per level per step."""
    d, plan = stage_durations(cfg), make_plan(cfg)
    c = cfg.comm
    hierarchical = c.hierarchical_allreduce
    tokens = cfg.train.micro_batch_size * cfg.train.seq_length
    sizes = share_counts(tokens, plan.attention_gpus)
    rows_bytes = tokens * cfg.model.hidden_size * d.activation_bytes
    index_bytes = tokens * cfg.moe.top_k * 8
    reducer = cross_node_reducer(c.gradient_compression,
                                 CompressionSettings.of(c))
    layout = TwoLevelLayout.of_plan(plan)
    pieces = layout.pieces if hierarchical else 1
    piece_numel = int(d.replicated_grad_bytes / d.grad_bytes / pieces)

    def cross_factor(members):
        return reducer.wire_factor(members, piece_numel, d.grad_bytes)

    aggregation = d.pool_collective_s(plan, rows_bytes, False, hierarchical, sizes)
    grad_sync, kernels = d.replicated_allreduce_s(plan, hierarchical, reducer.wire_factor, reducer.compresses)
    stages = cfg.model.num_layers * cfg.train.gradient_accumulation_steps
    level_bytes = {INTRA_NODE: 0.0, INTER_NODE: 0.0}
    k = plan.attention_gpus
    one_node = len(layout.nodes) == 1
    for rank in range(k):
        # Per stage the hidden states' all-gather and reduce-scatter forward, the reverse
        # backward; with unequal nodes a GPU sends different amounts in each.
        tokens_shares, parts = layout.token_piece_shares(sizes), layout.token_part_shares(sizes)
        ops = [(rows_bytes, False, True, tokens_shares, OPS_PER_STAGE // 2 * stages, None),
               (rows_bytes, False, False, tokens_shares, OPS_PER_STAGE // 2 * stages, None),
               (index_bytes, False, True, tokens_shares, stages, None),
               (d.replicated_grad_bytes, True, True, [1 / pieces] * pieces, 1, cross_factor)]
        for full, all_reduce, gather, shares, count, factor in ops:
            if hierarchical:
                for level, (fraction, _) in layout.level_fractions(
                        rank, shares, all_reduce, factor, None if all_reduce else parts, gather).items():
                    level_bytes[level] += count * fraction * full
            else:
                level_bytes[INTRA_NODE if one_node else INTER_NODE] += count * (2 if all_reduce else 1) * (k - 1) / k * full
    return {"aggregation_op_s": aggregation, "grad_sync_s": grad_sync, "compression_s": kernels,
            "bytes_intra_node": level_bytes[INTRA_NODE], "bytes_inter_node": level_bytes[INTER_NODE]}


def measure(cfg, steps: int) -> dict:
    """Each kept step's device-clock and wall seconds, and the medians of the step's gradient
    synchronisation and bytes (also ``bench/replicas.py``'s)."""
    job = WorkerSet(cfg, build_dataset(compute_setup(cfg)[0]), torch_threads=1)
    try:
        rows = []
        for step in range(steps):
            t0 = time.perf_counter()
            m = job.step(step)
            rows.append((m, time.perf_counter() - t0))
    finally:
        job.shutdown()
    rows = rows[1:]
    return {"device_steps_s": [m.device_step_s for m, _ in rows], "wall_steps_s": [wall for _, wall in rows],
            "device_step_s": statistics.median(m.device_step_s for m, _ in rows),
            "wall_step_s": statistics.median(wall for _, wall in rows),
            "grad_sync_s": statistics.median(m.t_grad_sync_s for m, _ in rows),
            "bytes_intra_node": statistics.median(m.bytes_intra_node for m, _ in rows),
            "bytes_inter_node": statistics.median(m.bytes_inter_node for m, _ in rows)}


def emulated_paper(micro_batches: int, overrides=()):
    """The paper preset under emulation, on the device clock, with ``micro_batches`` micro-batches
    of 64 sequences a step (also ``bench/replicas.py``'s)."""
    return C.load("cluster/paper-16gpu.yaml", [
        "emulation.modelled_compute=true", "emulation.device_clock=true", "cluster.fake_gpus=true",
        f"train.gradient_accumulation_steps={micro_batches}", f"train.batch_size={64 * micro_batches}", *overrides])


def paired_saving(steps: list, flat_steps: list) -> float:
    """The median over the kept steps of each step's seconds minus flat's same step."""
    return statistics.median(a - b for a, b in zip(steps, flat_steps))


@ray.remote(num_cpus=0)
class _Gpu:
    def run(self, fn, *args):
        return fn(*args)


def _padded(layout, rank: int, shares, parts, all_reduce: bool) -> dict:
    """What ``rank`` sent per level when every chunk was padded to its group's largest."""
    ranks = layout.nodes[layout.node_of(rank)]
    held = [sum(shares[j] for j in layout.pieces_of(r)) for r in ranks]
    n_nodes = len(layout.nodes)
    intra = (2 if all_reduce else 1) * (len(ranks) - 1) * max(held)
    inter = 0.0
    if n_nodes > 1:
        for j in layout.pieces_of(rank):
            inter += (2 * (n_nodes - 1) / n_nodes * shares[j] if all_reduce
                      else (n_nodes - 1) * max(parts[j]))
    return {INTRA_NODE: intra, INTER_NODE: inter}


def _uniform_model(layout, rank: int, shares, all_reduce: bool) -> dict:
    """The model before it counted real chunks: ``(k_n - 1) / k_n`` of the tensor inside a node
    and ``(N - 1) / N`` of each held piece across nodes, whatever the chunks."""
    k_n, n_nodes = len(layout.nodes[layout.node_of(rank)]), len(layout.nodes)
    twice = 2.0 if all_reduce else 1.0
    inter = sum(twice * (n_nodes - 1) / n_nodes * shares[j] for j in layout.pieces_of(rank)) if n_nodes > 1 else 0.0
    return {INTRA_NODE: twice * (k_n - 1) / k_n, INTER_NODE: inter}


def _one_gpu(rank, layout, prefix, sizes, numel, rows_bytes, grad_bytes):
    from ma_ray.comm.aggregation import TwoLevelAggregation

    agg = TwoLevelAggregation(layout, rank, prefix)
    out = {}
    local = torch.ones(sizes[rank], 1)
    full = torch.ones(sum(sizes), 1)
    flat = torch.ones(numel)
    for op, run in (("all-gather", lambda: agg.gather_tokens(local, sizes, rows_bytes)),
                    ("reduce-scatter", lambda: agg.scatter_tokens(full, sizes, rows_bytes)),
                    ("all-reduce", lambda: agg.allreduce(flat, grad_bytes))):
        agg.reset_counts()
        run()
        out[op] = (dict(agg.sent_bytes), dict(agg.level_bytes))
    return out


def bytes_check(base, splits) -> list:
    """Per split, op and level: the most any GPU sent and the most the model gives any GPU."""
    d = stage_durations(base)
    tokens = base.train.micro_batch_size * base.train.seq_length
    rows_bytes = tokens * base.model.hidden_size * d.activation_bytes
    numel = 1_000_003  # a stand-in for the replicated gradients; its pieces' shares are theirs
    rows = []
    for k in splits:
        cfg = base.replace(**{"cluster.attention_gpus": k})
        layout = TwoLevelLayout.of_plan(make_plan(cfg))
        sizes = share_counts(tokens, k)
        prefix = f"bytes{k}"
        gpus = [_Gpu.remote() for _ in range(k)]

        def join(rank, specs, prefix):
            from ma_ray.comm import create_group
            for suffix, ranks, me in specs:
                create_group(f"{prefix}-{suffix}", [f"{prefix}-{r}" for r in ranks], me, backend="gloo")
            return True

        ray.get([g.run.remote(join, r, layout.groups_to_join(r), prefix) for r, g in enumerate(gpus)])
        got = ray.get([g.run.remote(_one_gpu, r, layout, prefix, sizes, numel, rows_bytes, d.replicated_grad_bytes)
                       for r, g in enumerate(gpus)])
        for g in gpus:
            ray.kill(g)
        token_shares, parts = layout.token_piece_shares(sizes), layout.token_part_shares(sizes)
        flat_shares = layout.flat_piece_shares(numel)
        for op, full in (("all-gather", rows_bytes), ("reduce-scatter", rows_bytes),
                         ("all-reduce", d.replicated_grad_bytes)):
            all_reduce = op == "all-reduce"
            for level in (INTRA_NODE, INTER_NODE):
                sent = [got[r][op][0][level] for r in range(k)]
                modelled = [got[r][op][1][level] for r in range(k)]
                shares = flat_shares if all_reduce else token_shares
                padded = [_padded(layout, r, shares, parts, all_reduce)[level] * full for r in range(k)]
                uniform = [_uniform_model(layout, r, shares, all_reduce)[level] * full for r in range(k)]
                exact = all(abs(a - b) <= 1e-9 * max(b, 1.0) for a, b in zip(sent, modelled))
                rows.append({"split": k, "per_node": [len(n) for n in layout.nodes], "op": op, "level": level,
                             "max_sent_bytes": max(sent), "max_modelled_bytes": max(modelled),
                             "sum_sent_bytes": sum(sent), "sum_modelled_bytes": sum(modelled),
                             "max_padded_bytes": max(padded), "sum_padded_bytes": sum(padded),
                             "max_uniform_model_bytes": max(uniform), "every_gpu_equal": exact})
    return rows


def print_bytes(rows) -> None:
    print("bytes sent against bytes modelled, per op and level, GB at the preset's shapes: the most any GPU "
          "sends (its link paces the level) and the sum over GPUs; 'padded': every chunk padded to the largest, "
          "as before; 'old model': (k_n - 1) / k_n and (N - 1) / N whatever the chunks")
    print(f"{'split':>5} {'nodes':>8} {'op':>14} {'level':>10} {'max sent':>9} {'model':>7} {'ratio':>6} "
          f"{'per GPU':>8} {'padded':>7} {'old model':>9} {'sum sent':>9} {'model':>7} {'padded':>7}")
    for r in rows:
        m = r["max_modelled_bytes"]
        ratio = r["max_sent_bytes"] / m if m else float("nan")
        print(f"{r['split']:>5} {','.join(map(str, r['per_node'])):>8} {r['op']:>14} {r['level']:>10} "
              f"{r['max_sent_bytes'] / 1e9:>9.3f} {m / 1e9:>7.3f} {ratio:>6.3f} "
              f"{'equal' if r['every_gpu_equal'] else 'DIFFER':>8} {r['max_padded_bytes'] / 1e9:>7.3f} "
              f"{r['max_uniform_model_bytes'] / 1e9:>9.3f} {r['sum_sent_bytes'] / 1e9:>9.3f} "
              f"{r['sum_modelled_bytes'] / 1e9:>7.3f} {r['sum_padded_bytes'] / 1e9:>7.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", default="12,8", help="attention GPUs of each split at the preset's network")
    ap.add_argument("--slow-splits", default="12", help="splits repeated at 12.5 GB/s between nodes ('' for none)")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="steps per run, the first dropped")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--bytes-splits", default="9,14", help="splits whose bytes sent are checked against the model ('' for none)")
    ap.add_argument("--bytes-only", action="store_true", help="only the bytes check")
    args = ap.parse_args()
    mb = args.micro_batches
    base = emulated_paper(mb, args.overrides)
    init_ray(base.cluster, num_cpus=os.cpu_count())
    byte_rows = bytes_check(base, [int(k) for k in args.bytes_splits.split(",") if k])
    if byte_rows:
        print_bytes(byte_rows)
    if args.bytes_only:
        print(json.dumps(byte_rows))
        ray.shutdown()
        return
    runs = [(int(k), base.emulation.inter_node_gb_per_s) for k in args.splits.split(",") if k]
    runs += [(int(k), 12.5) for k in args.slow_splits.split(",") if k]
    print(f"emulated paper preset, {mb} micro-batches a step, {args.steps} steps a run (first dropped); "
          f"step: on the modelled device clock, host wall time beside it")
    print(f"{'split':>5} {'net GB/s':>8} {'setting':>15} {'agg op ms':>10} {'grad sync ms':>13} {'kernels ms':>11} "
          f"{'step s':>7} {'step - flat s (analytic)':>25} {'ratio':>6} {'wall s':>7} {'wall - flat s':>13} "
          f"{'intra GB/step':>15} {'inter GB/step':>15}")
    out = []
    stages = base.model.num_layers * base.train.gradient_accumulation_steps
    for k, net in runs:
        flat = None
        for name, over in SETTINGS.items():
            cfg = base.replace(**{"cluster.attention_gpus": k, "emulation.inter_node_gb_per_s": net, **over})
            want, got = analytic(cfg), measure(cfg, args.steps)
            comm_s = OPS_PER_STAGE * stages * want["aggregation_op_s"] + want["grad_sync_s"]
            flat = flat or (got, comm_s)
            saved = paired_saving(got["device_steps_s"], flat[0]["device_steps_s"])
            saved_wall = paired_saving(got["wall_steps_s"], flat[0]["wall_steps_s"])
            saved_analytic = comm_s - flat[1]
            ratio = saved / saved_analytic if saved_analytic else None
            out.append({"split": k, "inter_node_gb_per_s": net, "setting": name, "measured": got, "analytic": want,
                        "step_minus_flat_s": saved, "step_minus_flat_analytic_s": saved_analytic,
                        "measured_over_analytic": ratio, "wall_minus_flat_s": saved_wall})
            print(f"{k:>5} {net:>8.1f} {name:>15} {want['aggregation_op_s'] * 1e3:>10.2f} "
                  f"{want['grad_sync_s'] * 1e3:>13.2f} {want['compression_s'] * 1e3:>11.2f} "
                  f"{got['device_step_s']:>7.3f} {saved:>+12.3f} ({saved_analytic:>+8.3f})   "
                  f"{'-' if ratio is None else f'{ratio:.3f}':>6} {got['wall_step_s']:>7.2f} {saved_wall:>+13.3f} "
                  f"{got['bytes_intra_node'] / 1e9:>6.2f} / {want['bytes_intra_node'] / 1e9:<6.2f} "
                  f"{got['bytes_inter_node'] / 1e9:>6.2f} / {want['bytes_inter_node'] / 1e9:<6.2f}", flush=True)
    budget = base.comm.compression_overhead
    for row in out:
        got = row["measured"]
        if row["analytic"]["compression_s"]:
            share = row["analytic"]["compression_s"] / got["device_step_s"]
            print(f"compression kernels at {row['split']} / {row['inter_node_gb_per_s']} GB/s: {share:.3%} of the step, "
                  f"{'within' if share <= budget else 'OVER'} comm.compression_overhead ({budget:.0%})")
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
