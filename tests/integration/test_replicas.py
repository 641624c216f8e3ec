"""Data-parallel replicas (``cluster.replicas``) on the shared emulated cluster: every replica
holds the reference's gradients and parameters, with micro-batches in flight and rebalances that
move every replica at once, in one level and two; and a checkpoint of R replicas resumes with
another R on another split, continuing the run. Each replica is 2 nodes x 2 GPUs, so R = 3 is
12 of the cluster's 16 GPUs."""

from __future__ import annotations

import pytest

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.runtime import checkpoint
from ma_ray.runtime.worker_set import WorkerSet
from ma_ray.verify import TOLERANCE, exact_settings, verify
from ma_ray.verify.compare import gradient_error, parameter_error
from ma_ray.verify.reference_trainer import ReferenceTrainer

LOCAL = "cluster/local-cpu.yaml"

pytestmark = pytest.mark.usefixtures("ray_cluster")  # tests/integration/conftest.py: 16 emulated GPUs


def replicated(replicas: int, micro_batches: int, **over):
    """``replicas`` copies of 2 nodes x 2 GPUs, ``micro_batches`` micro-batches of 3 sequences a
    step; 6 heads and 5 experts, so most splits are uneven."""
    base = {
        "cluster.num_nodes": 2, "cluster.gpus_per_node": 2, "cluster.attention_gpus": 2,
        "cluster.replicas": replicas, "balance.min_attention_gpus": 1, "balance.max_attention_gpus": 3,
        "model.num_layers": 2, "model.hidden_size": 24, "model.num_attention_heads": 6,
        "model.attention_head_size": 4, "model.intermediate_size": 32, "model.max_position_embeddings": 16,
        "moe.num_experts": 5, "moe.capacity_factor": 0.75, "train.seq_length": 16, "train.micro_batch_size": 3,
        "train.batch_size": 3 * micro_batches, "train.gradient_accumulation_steps": micro_batches,
        "data.kind": "synthetic",
    }
    base.update(over)
    return C.load(LOCAL).replace(**base)


@pytest.mark.parametrize("replicas, hierarchical", [(2, False), (3, True)])
def test_every_replica_matches_the_reference_across_a_rebalance(replicas, hierarchical):
    # Two micro-batches per replica, both in flight; before step 1 every replica goes from 2
    # attention GPUs (one per node) to 3 (a MoE GPU becomes an attention GPU).
    cfg = replicated(replicas, 2 * replicas, **{"schedule.micro_batches_in_flight": 2,
                                                "comm.hierarchical_allreduce": hierarchical})
    report = verify(cfg, steps=2, rebalances={1: 3})
    assert report["ok"] and report["replicas"] == replicas, report
    assert report["initial_param_rel_err"] == 0.0
    for key in ("loss_rel_err", "grad_rel_err", "param_rel_err"):
        assert report[key] <= TOLERANCE, (key, report)
    (move,) = report["migrations"]
    assert move["role_changes"] == 1 and move["shipped_bytes"] > 0, move


def test_a_checkpoint_resumes_with_other_replicas_on_another_split(tmp_path):
    """Saved by 2 replicas at 2 attention GPUs each; resumed by 1 at 3 and by 3 at 1, both
    continue the uninterrupted run: the checkpoint is replica 0's shards, by global name."""
    def config(replicas):
        return exact_settings(replicated(replicas, 6, **{"train.warmup_steps": 1}), "fp64")

    dataset = build_dataset(config(2))
    straight = WorkerSet(config(2).with_split(2), dataset, torch_threads=1)
    try:
        for step in range(2):
            straight.step(step)
        folder = checkpoint.save(straight, tmp_path, 1)
        losses = [straight.step(step).loss for step in range(2, 4)]
        want = straight.export()
    finally:
        straight.shutdown()
    assert sorted(checkpoint.verify(folder)["shards"]) == ["node0-gpu0.pt", "node0-gpu1.pt", "node1-gpu0.pt",
                                                           "node1-gpu1.pt"]  # replica 0's only

    for replicas, k in ((1, 3), (3, 1)):
        resumed = WorkerSet(config(replicas).with_split(k), dataset, torch_threads=1, checkpoint=str(folder))
        try:
            got_losses = [resumed.step(step).loss for step in range(2, 4)]
            got = resumed.export_replicas()
        finally:
            resumed.shutdown()
        assert len(got) == replicas
        assert max(abs(a - b) / abs(b) for a, b in zip(got_losses, losses)) < TOLERANCE, (replicas, got_losses)
        for params in got:
            assert parameter_error(params, want, 0.02)[0] < TOLERANCE, replicas


def test_bf16_sums_the_sharded_gradients_across_replicas_in_bf16():
    """Under comm.gradient_compression bf16 the experts' gradients cross between replicas as a
    bf16 copy: off the fp64 reference by bf16's rounding, where the dense sum is exact (above).
    Nothing else reduces them, so the error is the counterparts' all-reduce's alone."""
    cfg = exact_settings(replicated(2, 2, **{"comm.hierarchical_allreduce": True,
                                             "comm.gradient_compression": "bf16"}), "fp64")
    dataset = build_dataset(cfg)
    job = WorkerSet(cfg.with_split(2), dataset, torch_threads=1)
    try:
        job.step(0)
        got = job.export("grad")
    finally:
        job.shutdown()
    reference = ReferenceTrainer(cfg)
    reference.step([dataset.micro_batch(0, i) for i in range(dataset.grad_accum)])
    want = reference.gradients_by_name()
    experts = {n for n in want if ".experts." in n}
    assert experts
    err, name = gradient_error({n: got[n] for n in experts}, {n: want[n] for n in experts})
    assert 1e-6 < err < 1e-2, (err, name)


def test_topk_residuals_across_replicas_move_with_their_heads_and_experts(tmp_path):
    """Under top-k each worker keeps what it has not yet sent its counterparts, by global name,
    per replica. A rebalance moves it with the heads and experts; a checkpoint keeps every
    replica's, so a resume on the same layout continues the run exactly; a resume with fewer
    replicas adds the missing replicas' into replica 0's, so nothing unsent is lost."""
    def config(replicas):
        return exact_settings(replicated(replicas, 4, **{"comm.gradient_compression": "topk",
                                                         "comm.hierarchical_allreduce": True,
                                                         "comm.compression_warmup_steps": 0}), "fp64")

    dataset = build_dataset(config(2))
    straight = WorkerSet(config(2).with_split(2), dataset, torch_threads=1)
    try:
        for step in range(2):
            straight.step(step)
        before = straight.export_replicas("shard_residual")
        straight.move_to(3)
        after = straight.export_replicas("shard_residual")
        folder = checkpoint.save(straight, tmp_path, 1)
        losses = [straight.step(step).loss for step in range(2, 4)]
        params = straight.export_replicas()
    finally:
        straight.shutdown()
    # Every name of every head and expert has one, each replica's its own, moved as it was.
    names = {n for n in params[0] if ".experts." in n or ".heads." in n}
    assert names and all(set(r) == names for r in before), (sorted(names)[:4], sorted(before[0])[:4])
    assert any(t.abs().max() > 0 for t in before[0].values())
    assert any((before[0][n] - before[1][n]).abs().max() > 0 for n in names)
    for was, now in zip(before, after):
        assert all(now[n].equal(was[n]) for n in names)
    # Counterparts decode the same messages: every replica holds the same parameters.
    assert all(params[1][n].equal(t) for n, t in params[0].items())
    saved = {f for f in checkpoint.verify(folder)["shards"] if f.startswith("residuals/replica")}
    assert {f.split("/")[1] for f in saved} == {"replica0", "replica1"}

    def same(got, want):
        return len(got) == len(want) and all(set(g) == set(w) and all(g[n].equal(w[n]) for n in w)
                                             for g, w in zip(got, want))

    resumed = WorkerSet(config(2).with_split(3), dataset, torch_threads=1, checkpoint=str(folder))
    try:
        assert same(resumed.export_replicas("shard_residual"), after)
        assert [resumed.step(step).loss for step in range(2, 4)] == losses
    finally:
        resumed.shutdown()

    # One replica has no counterparts: both replicas' residuals go with its next gradients.
    fewer = WorkerSet(config(1).with_split(3), dataset, torch_threads=1, checkpoint=str(folder))
    try:
        assert same(fewer.export_replicas("shard_residual"), [{n: after[0][n] + after[1][n] for n in names}])
        fewer.step(2)
        assert fewer.export_replicas("shard_residual") == [{}]
    finally:
        fewer.shutdown()
