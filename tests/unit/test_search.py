"""The layout search (``ma-ray plan --search``): its predictions are the controller's, replicas
share the micro-batches, rows over memory are counted and left out, a cluster too small is one line."""

from __future__ import annotations

import json
import math

import pytest

from ma_ray.cli import main
from ma_ray.comm.compression import CompressionSettings
from ma_ray.comm.cross_node import DenseCrossNode, every_reducer
from ma_ray.config import Config, ConfigError, load
from ma_ray.control.policy import BalancingPolicy
from ma_ray.control.predictor import StageTimePredictor
from ma_ray.parallel.emulation import stage_durations
from ma_ray.parallel.placement import make_plan, replicate
from ma_ray.parallel.search import layouts, search

REDUCERS = every_reducer(CompressionSettings())


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def on_seed_topology(result, replicas=1):
    return [p for p in result.rows if p.layout.replicas == replicas and p.layout.nodes_per_replica == 4]


def test_stage_times_are_the_controllers_predictor():
    # Every split, the ones that leave a MoE GPU all 16 experts (155 GB) or an attention GPU
    # every head and the whole micro-batch's LM head too.
    cfg = load(None, ["memory.moe_gpu_budget_gb=1e6", "memory.attention_gpu_budget_gb=1e6"])
    predictor = StageTimePredictor(cfg)
    result = search(cfg, REDUCERS)
    rows = on_seed_topology(result)
    assert {p.layout.attention_gpus for p in rows} == set(predictor.splits())
    for p in rows + [result.configured]:
        want = predictor.predict(p.layout.attention_gpus)
        assert p.t_attention_s == pytest.approx(want.t_attention_s, rel=1e-12)
        assert p.t_moe_s == pytest.approx(want.t_moe_s, rel=1e-12)


def test_step_time_is_the_policys_when_communication_is_free():
    # With links and kernels too fast to matter, what is left of the planner's step is the
    # policy's own score of the split.
    cfg = load(None, ["emulation.intra_node_gb_per_s=1e12", "emulation.inter_node_gb_per_s=1e12",
                      "emulation.compression_gb_per_s=1e12", "balance.settle_steps=0"])
    predictor = StageTimePredictor(cfg)
    decision = BalancingPolicy.from_config(cfg).decide(100, 12, predictor, force=True)
    scored = {c.attention_gpus: c.step_s for c in decision.candidates}
    assert set(scored) == set(range(8, 15))
    rows = {p.layout.attention_gpus: p for p in on_seed_topology(search(cfg, REDUCERS))
            if p.layout.in_flight == cfg.schedule.micro_batches_in_flight and not p.layout.hierarchical}
    for k, step_s in scored.items():
        assert rows[k].step_s == pytest.approx(step_s, rel=1e-6)
        assert rows[k].grad_sync_s < 1e-6 * step_s


def test_replicas_divide_the_micro_batches():
    twelve_nodes = search(Config(), REDUCERS, nodes=12)
    assert {p.layout.replicas for p in twelve_nodes.rows} <= {1, 2, 4}  # 3, 6, 12 do not divide 16
    # 12 micro-batches a step: 3 copies of 4 nodes each run 4 of them.
    cfg = load(None, ["train.gradient_accumulation_steps=12", "train.batch_size=768"])
    every = layouts(cfg, 12, tuple(REDUCERS))
    assert {lay.replicas for lay in every} == {1, 2, 3, 4, 6, 12}
    for lay in every:
        assert 12 % lay.replicas == 0 and 1 <= lay.in_flight <= 12 // lay.replicas
        assert lay.nodes_per_replica * lay.replicas == 12
    three = [p for p in search(cfg, REDUCERS, nodes=12).rows if p.layout.replicas == 3]
    assert three and all(p.passes_s > 0 for p in three)


def test_rows_over_memory_are_counted_and_left_out(capsys):
    everything = search(load(None, ["memory.attention_gpu_budget_gb=1e6", "memory.moe_gpu_budget_gb=1e6"]), REDUCERS)
    assert everything.over_memory == 0 and len(everything.rows) == everything.candidates
    tight = search(load(None, ["memory.moe_gpu_budget_gb=40"]), REDUCERS)
    over = [p for p in everything.rows if p.peak_moe_gb > 40 or p.peak_attention_gb > 123.7]
    assert tight.candidates == everything.candidates
    assert tight.over_memory == len(over) > 0
    assert len(tight.rows) == tight.candidates - tight.over_memory
    assert all(p.peak_moe_gb <= 40 for p in tight.rows)
    # The configured layout's MoE GPUs need 46.2 GB: still shown, for comparison, marked.
    assert tight.configured is not None and not tight.configured.fits
    code, out, err = run(capsys, "plan", "--search", "--set", "memory.moe_gpu_budget_gb=40")
    assert code == 0 and err == ""
    assert f"{tight.over_memory} left out: over the memory budget" in out
    seed_line = next(line for line in out.splitlines() if line.lstrip().startswith("seed "))
    assert "12/4" in seed_line and "OVER" in seed_line
    assert "seed: the configured layout" in out and "over the memory budget" in out.splitlines()[-1]


def test_cluster_too_small_is_one_line_naming_what_is_missing(capsys):
    code, out, err = run(capsys, "plan", "--search", "--nodes", "1", "--set", "cluster.gpus_per_node=2",
                         "--set", "cluster.num_nodes=8")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("ma-ray: error: no layout of 2 GPUs (1 node x 2)")
    assert "at least 4 GPUs (2 attention + 2 MoE); 2 GPUs missing" in err
    code, out, err = run(capsys, "plan", "--search", "--set", "memory.moe_gpu_budget_gb=1")
    assert code == 2 and err.count("\n") == 1
    assert "even one expert per MoE GPU needs" in err and "more memory per GPU is missing" in err
    code, out, err = run(capsys, "plan", "--search", "--nodes", "15")  # 60 GPUs: > 48 a copy, 15 nodes
    assert code == 2 and "a copy holds at most 48 GPUs (32 heads + 16 experts)" in err
    code, out, err = run(capsys, "plan", "--search", "--gpus", "6")
    assert (code, err) == (2, "ma-ray: error: --gpus: 6 is not a whole number of nodes of 4 GPUs "
                              "(cluster.gpus_per_node): replicas and pools take whole nodes\n")
    with pytest.raises(ConfigError, match="--gpus: 20 is more than the cluster's 16 GPUs"):
        search(Config(), REDUCERS, gpus=20)
    for argv in (["--search", "--attention-gpus", "12"], ["--gpus", "8"]):
        code, out, err = run(capsys, "plan", *argv)
        assert code == 2 and err.count("\n") == 1 and out == ""


def test_json_has_every_fitting_row_best_first_and_the_seed(capsys):
    code, out, err = run(capsys, "plan", "--search", "--json", "--gpus", "8")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["cluster"] == {"nodes": 2, "gpus_per_node": 4, "gpus": 8, "intra_node_gb_per_s": 450.0,
                               "inter_node_gb_per_s": 50.0, "attention_gpu_budget_gb": 123.7,
                               "moe_gpu_budget_gb": 123.7}
    rows = data["rows"]
    assert len(rows) + data["over_memory"] == data["candidates"]
    assert [r["step_s"] for r in rows] == sorted(r["step_s"] for r in rows)
    for r in rows:
        assert r["fits"] and r["gpus"] == 8
        assert r["tokens_per_s_per_gpu"] == pytest.approx(1024 * 2048 / r["step_s"] / 8)
        assert r["step_s"] == pytest.approx(r["passes_s"] + r["grad_sync_s"])
    # 8 GPUs are half the configured 4 x 4: no whole copy of it.
    assert data["seed"] is None and "do not divide the 2 used" in data["seed_note"]


def test_table_has_the_seed_on_its_own_row(capsys):
    code, out, err = run(capsys, "plan", "--search", "--top", "3")
    assert code == 0 and err == ""
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("rank"))
    for column in ("replicas", "attn/moe", "in flight", "hierarchical", "compression", "step s",
                   "tokens/s/GPU", "peak GB", "budget GB"):
        assert column in header
    ranked = [line.split() for line in lines if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert len(ranked) == 3
    seed = next(line.split() for line in lines if line.startswith("seed "))
    assert seed[:7] == ["seed", "1", "12/4", "4", "1", "on", "none"]


def test_replicas_gradient_sync():
    cfg = Config()
    d, plan, dense = stage_durations(cfg), make_plan(cfg), DenseCrossNode()
    union = replicate(plan, 3)
    assert (union.num_nodes, union.attention_gpus, union.moe_gpus) == (12, 36, 12)
    assert [g.node for g in union.moe_workers()] == list(range(12))
    assert union.attention_workers()[12].heads == plan.attention_workers()[0].heads
    # One copy: the replicated gradients' all-reduce of today's runtime, nothing else.
    one = d.replicas_allreduce_s(plan, 1, True, dense.wire_factor, False, 1e9, 1e10)
    assert one == d.replicated_allreduce_s(plan, True, dense.wire_factor, False)
    # Two copies: a MoE GPU's 10 GB cross to its counterpart in a ring of 2 at the network's speed.
    two, kernels = d.replicas_allreduce_s(plan, 2, True, dense.wire_factor, False, 1e9, 1e10)
    assert two == pytest.approx(2 * (2 - 1) / 2 * 1e10 / 50e9) and kernels == 0.0
    # The replicated gradients of every copy's attention pool: one two-level all-reduce of them all.
    rep, _ = d.replicas_allreduce_s(plan, 2, True, dense.wire_factor, False, 0.0, 0.0)
    assert rep == pytest.approx(d.replicated_allreduce_s(replicate(plan, 2), True, dense.wire_factor, False)[0])
    assert rep > one[0]
    assert math.isfinite(rep)
    # Top-k sums the shards between counterparts too: an all-gather of 2 messages, and the
    # kernels on all of a GPU's shard bytes.
    topk = REDUCERS["topk"]
    seconds, kernels = d.counterparts_allreduce_s(2, 1e10, topk.wire_factor, True)
    element = d.grad_bytes
    assert kernels == pytest.approx(d.compression_s(1e10))
    assert seconds - kernels == pytest.approx(topk.wire_factor(2, int(1e10 / element), element) * 1e10 / 50e9)
    assert seconds < d.counterparts_allreduce_s(2, 1e10, dense.wire_factor, False)[0]
    assert d.counterparts_allreduce_s(1, 1e10, topk.wire_factor, True) == (0.0, 0.0)


@pytest.mark.parametrize("gpus", [16, 32])
def test_a_run_of_the_pick_is_predicted_and_emulated_as_the_planner_scored_it(gpus):
    """The planner prices every layout from the seed's coefficients at the seed's 4 x 4 at 12
    (balance.time_coef_layout); the config of its pick keeps that reference, so the controller's
    prior and the emulation's stage durations of a run of the pick are what the planner said."""
    from ma_ray.parallel.search import layout_config, predict

    base = load("cluster/paper-16gpu.yaml", ["train.gradient_accumulation_steps=4", "train.batch_size=256"])
    best = search(base, REDUCERS, nodes=gpus // 4, gpus=gpus).rows[0]
    run_cfg = layout_config(base, best.layout)
    assert predict(run_cfg, REDUCERS).step_s == pytest.approx(best.step_s, rel=1e-12)
    prior = StageTimePredictor(run_cfg).predict(best.layout.attention_gpus)
    assert (prior.t_attention_s, prior.t_moe_s) == pytest.approx((best.t_attention_s, best.t_moe_s), rel=1e-12)
    d, plan = stage_durations(run_cfg), make_plan(run_cfg)
    busiest_moe = max(len(g.experts) for g in plan.moe_workers())
    # A uniform router's rows (no capacity cut at this factor): the busiest MoE GPU's stage.
    rows = 64 * 2048 * 2 / 16 * busiest_moe
    assert d.moe_stage_s(busiest_moe, rows) == pytest.approx(best.t_moe_s, rel=1e-9)
    # Anchored at the pick itself instead, the seed's formula (nearly blind to the layout) would
    # price it as the seed's layout: the seed's T_m, whatever the pick's MoE GPUs hold.
    own = run_cfg.replace(**{"balance.time_coef_layout": None})
    seeds = StageTimePredictor(own).predict(best.layout.attention_gpus).t_moe_s
    assert seeds == pytest.approx(0.738128, rel=1e-4) and abs(seeds / best.t_moe_s - 1) > 0.2
