"""Planning: placement for any split, plan diffs, memory formulas, the seed's time model."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from ma_ray.config import Config, ConfigError, check_split, load
from ma_ray.parallel import ATTENTION, MOE, Slot, diff_plans, make_plan, place, plan_of_move, predict_stage_times
from ma_ray.parallel import memory as M
from ma_ray.parallel.shares import balanced_ranges, share_counts
from ma_ray.parallel.split import feasible as split_feasible, split_error
from ma_ray.parallel.workload import Workload
from ma_ray.parallel.time_model import attention_time, moe_time

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster" / "local-cpu.yaml"


def tiny(num_nodes, gpus_per_node, heads, experts, attention_gpus, lo, hi):
    """A tiny model on a given topology, with the policy range [lo, hi] of attention GPUs."""
    head_size = 4
    return Config().replace(**{
        "cluster.num_nodes": num_nodes, "cluster.gpus_per_node": gpus_per_node,
        "cluster.attention_gpus": attention_gpus,
        "balance.min_attention_gpus": lo, "balance.max_attention_gpus": hi,
        "model.num_attention_heads": heads, "model.attention_head_size": head_size,
        "model.hidden_size": heads * head_size, "model.intermediate_size": 32,
        "model.vocab_size": 64, "model.max_position_embeddings": 16, "train.seq_length": 16,
        "moe.num_experts": experts, "balance.time_coef_layout": None,
    })


TOPOLOGIES = {
    "paper 4x4": Config(),
    "2x8": tiny(2, 8, heads=32, experts=16, attention_gpus=12, lo=8, hi=14),
    "3x4": tiny(3, 4, heads=16, experts=8, attention_gpus=8, lo=4, hi=11),
    "1x6": tiny(1, 6, heads=8, experts=6, attention_gpus=4, lo=1, hi=5),
    "8x2": tiny(8, 2, heads=20, experts=12, attention_gpus=10, lo=4, hi=15),
}


def every_split():
    return [pytest.param(cfg, k, id=f"{name}-k{k}") for name, cfg in TOPOLOGIES.items()
            for k in range(cfg.balance.min_attention_gpus, cfg.balance.max_attention_gpus + 1)]


# --- the seed's layout --------------------------------------------------------------------------

def test_methodology_layout_4x4_k12():
    plan = make_plan(Config())
    assert plan.attention_gpus == 12 and plan.moe_gpus == 4
    assert [len(g.heads) for g in plan.attention_workers()] == [3] * 8 + [2] * 4
    assert plan.attention_workers()[0].heads == (0, 1, 2)
    assert plan.attention_workers()[1].heads == (3, 4, 5)
    assert plan.attention_workers()[8].heads == (24, 25)
    assert plan.attention_workers()[11].heads == (30, 31)
    assert plan.attention_ranks() == list(range(12))
    assert plan.moe_ranks() == [12, 13, 14, 15]
    for g in plan.attention_workers():
        assert (g.node, g.local_gpu) == (g.gpu // 3, g.gpu % 3) and g.experts == ()
    for j, g in enumerate(plan.moe_workers()):
        assert g.gpu == 12 + j and (g.node, g.local_gpu) == (j, 3)
        assert g.experts == tuple(range(4 * j, 4 * j + 4)) and g.heads == () and g.rank == j
    assert plan.attention_ranks_by_node() == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8], 3: [9, 10, 11]}


def test_plan_lookups():
    plan = make_plan(Config())
    assert plan.owner_of_head(0).gpu == 0 and plan.owner_of_head(31).gpu == 11
    assert plan.owner_of_head(24).gpu == 8
    assert plan.owner_of_expert(5).gpu == 13 and plan.owner_of_expert(5).slot == Slot(1, 3)
    assert plan.at_slot((2, 3)).gpu == 14 and plan.at_slot(Slot(0, 1)).gpu == 1
    with pytest.raises(KeyError):
        plan.owner_of_head(32)
    with pytest.raises(KeyError):
        plan.owner_of_expert(16)
    with pytest.raises(KeyError):
        plan.at_slot((4, 0))


def test_replica_plans_are_the_same_split_on_nodes_of_their_own():
    plan = make_plan(Config().replace(**{"cluster.replicas": 4}))
    assert (plan.replica, plan.replicas, {g.node for g in plan.gpus}) == (0, 4, set(range(0, 4)))
    copies = plan.replica_plans()
    assert [c.replica for c in copies] == [0, 1, 2, 3] and copies[0] == plan
    for c in copies:
        assert {g.node for g in c.gpus} == set(range(4 * c.replica, 4 * c.replica + 4))
        for g, g0 in zip(c.gpus, plan.gpus):
            # The counterpart of a GPU: the same id, rank, heads and experts, 4 nodes on per copy.
            assert (g.gpu, g.rank, g.role, g.heads, g.experts, g.local_gpu) == \
                (g0.gpu, g0.rank, g0.role, g0.heads, g0.experts, g0.local_gpu)
            assert g.node == g0.node + 4 * c.replica and c.at_slot(g.slot) == g
    assert copies[2].for_replica(1) == copies[1]
    assert plan.replica_at((9, 3)) == copies[2] and copies[3].replica_at((0, 0)) == plan
    with pytest.raises(ValueError, match="replica 4 is not one of the plan's 4"):
        plan.for_replica(4)


def test_groups_of_a_generation_with_replicas():
    from ma_ray.runtime.links import generation_groups

    plan = make_plan(Config().replace(**{"cluster.replicas": 2}))
    flat = generation_groups("j", 5, plan, hierarchical=False)
    assert flat == {"j-g5-r0-world": 16, "j-g5-r0-attn": 12, "j-g5-r1-world": 16, "j-g5-r1-attn": 12,
                    "j-g5-grads": 24, **{f"j-g5-dp{i}": 2 for i in range(16)}, "j-g5-all": 32}
    two = generation_groups("j", 5, plan, hierarchical=True)
    # The replicated gradients' cross-node groups span both replicas' 8 nodes.
    assert {two[f"j-g5-grads-x{j}"] for j in range(3)} == {8}
    assert {two[f"j-g5-grads-node{n}"] for n in range(8)} == {3}
    assert {two[f"j-g5-r1-attn-x{j}"] for j in range(3)} == {4} and "j-g5-r1-attn-node4" in two
    one = generation_groups("j", 5, make_plan(Config()), hierarchical=False)
    assert one == {"j-g5-world": 16, "j-g5-attn": 12}


def test_shares():
    assert share_counts(32, 12) == [3] * 8 + [2] * 4
    assert share_counts(16, 4) == [4] * 4
    assert balanced_ranges(16, 3) == [range(0, 6), range(6, 11), range(11, 16)]
    with pytest.raises(ValueError):
        share_counts(4, 0)


# --- every split, several topologies -------------------------------------------------------------

@pytest.mark.parametrize("cfg, k", every_split())
def test_balanced_contiguous_and_complete(cfg, k):
    plan = plan_of_move(cfg, k)
    c = cfg.cluster
    assert plan.total_gpus == c.num_nodes * c.gpus_per_node
    assert plan.attention_gpus == k and plan.moe_gpus == plan.total_gpus - k
    assert [g.gpu for g in plan.gpus] == list(range(plan.total_gpus))
    assert sorted(g.slot for g in plan.gpus) == [Slot(n, l) for n in range(c.num_nodes) for l in range(c.gpus_per_node)]
    # attention first, ordered by slot; ranks are positions in the pool
    attention, moe = plan.attention_workers(), plan.moe_workers()
    assert [g.role for g in plan.gpus] == [ATTENTION] * k + [MOE] * (plan.total_gpus - k)
    assert [g.slot for g in attention] == sorted(g.slot for g in attention)
    assert [g.rank for g in attention] == list(range(k)) and [g.rank for g in moe] == list(range(len(moe)))
    for items, pool, total in ((lambda g: g.heads, attention, cfg.model.num_attention_heads),
                               (lambda g: g.experts, moe, cfg.moe.num_experts)):
        counts = [len(items(g)) for g in pool]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1
        assert counts == sorted(counts, reverse=True)  # larger shares first
        for g in pool:
            assert list(items(g)) == list(range(items(g)[0], items(g)[-1] + 1))  # contiguous
        flat = [i for g in pool for i in items(g)]
        assert flat == list(range(total))  # every item exactly once, in order
    assert all(g.experts == () for g in attention) and all(g.heads == () for g in moe)


@pytest.mark.parametrize("cfg, k", every_split())
def test_moe_gpus_spread_over_nodes(cfg, k):
    plan = plan_of_move(cfg, k)
    c = cfg.cluster
    per_node = Counter(g.node for g in plan.moe_workers())
    counts = [per_node.get(n, 0) for n in range(c.num_nodes)]
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # the extra ones on the first nodes
    for node in range(c.num_nodes):  # each node's MoE GPUs are its highest local indices
        locals_ = {g.local_gpu for g in plan.moe_workers() if g.node == node}
        assert locals_ == set(range(c.gpus_per_node - counts[node], c.gpus_per_node))
    groups = plan.attention_ranks_by_node()  # intra-node groups of the hierarchical all-reduce
    sizes = [len(v) for v in groups.values()]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("cfg, k", [p for p in every_split() if p.values[1] > p.values[0].balance.min_attention_gpus])
def test_one_gpu_step_changes_one_role(cfg, k):
    d = diff_plans(plan_of_move(cfg, k - 1), plan_of_move(cfg, k))
    assert len(d.role_changes) == 1 and d.role_changes[0].new_role == ATTENTION


def test_a_config_at_another_split_is_checked():
    with pytest.raises(ConfigError, match="outside"):
        Config().with_split(15)
    with pytest.raises(ConfigError, match="leaves 0 MoE GPUs"):
        Config().replace(**{"balance.max_attention_gpus": 16}).with_split(16)
    with pytest.raises(ConfigError, match="^attention GPUs: 16 leaves 0 MoE GPUs"):
        plan_of_move(Config(), 16)  # a move's target: the topology's rule, the policy is the caller's
    assert plan_of_move(Config(), 15).attention_gpus == 15


@pytest.mark.parametrize("args, match", [
    ((4, 4, 16, 32, 16), "attention GPUs: 16 leaves 0 MoE GPUs of the 16 in the topology"),
    ((4, 4, 17, 32, 16), "attention GPUs: 17 is more than the 16 GPUs of the topology"),
    ((4, 4, 0, 32, 16), "attention GPUs: must be at least 1, got 0"),
    ((4, 4, 12, 8, 16), r"attention GPUs: 12 attention GPUs exceed the 8 heads \(model.num_attention_heads\)"),
    ((4, 4, 8, 32, 4), r"attention GPUs: 8 leaves 8 MoE GPUs for only 4 experts \(moe.num_experts\)"),
    ((0, 4, 2, 32, 16), "at least one node"),
])
def test_place_rejects_impossible_splits(args, match):
    with pytest.raises(ValueError, match=match):
        place(*args)


# --- the one split rule ---------------------------------------------------------------------------

def test_split_rule_by_hand():
    # 2 x 4 GPUs, 5 heads, 6 experts: k needs k <= 5 heads, 8 - k <= 6 experts, both pools non-empty.
    assert [k for k in range(-1, 11) if split_feasible(k, 8, 5, 6)] == [2, 3, 4, 5]
    assert split_error(3, 8, 5, 6) is None
    assert split_error(4, 8, 5, 6, key="K", policy_range=(2, 3)) == (
        "K: 4 is outside the policy's range [2, 3] of attention GPUs "
        "(balance.min_attention_gpus, balance.max_attention_gpus)")
    assert split_error(6, 8, 5, 6, key="K") == "K: 6 attention GPUs exceed the 5 heads (model.num_attention_heads)"
    assert split_error(1, 8, 5, 6, key="K") == "K: 1 leaves 7 MoE GPUs for only 6 experts (moe.num_experts)"


def _error_of(call):
    try:
        call()
    except ValueError as exc:  # ConfigError is a ValueError
        return str(exc)
    return None


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_config_planner_and_workload_ask_the_same_rule(name):
    """check_split, make_plan, place and Workload.feasible accept exactly the same splits, with
    the same message for the others; make_plan adds the policy range."""
    cfg = TOPOLOGIES[name]
    c, heads, experts = cfg.cluster, cfg.model.num_attention_heads, cfg.moe.num_experts
    lo, hi = cfg.balance.min_attention_gpus, cfg.balance.max_attention_gpus
    work = Workload(cfg)
    accepted = []
    for k in range(-1, cfg.total_gpus + 2):
        want = split_error(k, cfg.total_gpus, heads, experts)
        assert work.feasible(k) == (want is None), k
        assert _error_of(lambda: check_split(cfg, k, within_policy=False)) == want, k
        assert _error_of(lambda: plan_of_move(cfg, k)) == want, k
        assert _error_of(lambda: place(c.num_nodes, c.gpus_per_node, k, heads, experts)) == want, k
        if _error_of(lambda: cfg.with_split(k)) is None:
            accepted.append(k)
    assert accepted == [k for k in work.splits() if lo <= k <= hi] == list(range(lo, hi + 1))


# --- plan diff ------------------------------------------------------------------------------------

def apply(old, d):
    """Owners (by slot) after applying a diff's moves to ``old``."""
    heads = {h: g.slot for g in old.gpus for h in g.heads}
    experts = {e: g.slot for g in old.gpus for e in g.experts}
    for owners, moves in ((heads, d.head_moves), (experts, d.expert_moves)):
        for m in moves:
            assert owners[m.item] == m.src
            owners[m.item] = m.dst
    return heads, experts


def check_diff(old, new):
    d = diff_plans(old, new)
    heads, experts = apply(old, d)
    assert heads == {h: g.slot for g in new.gpus for h in g.heads}
    assert experts == {e: g.slot for g in new.gpus for e in g.experts}
    assert sorted(heads) == list(range(new.num_heads)) and sorted(experts) == list(range(new.num_experts))
    assert all(m.src != m.dst for m in d.head_moves + d.expert_moves)
    # heads live only on attention GPUs and experts only on MoE GPUs of the new plan
    assert all(new.at_slot(s).role == ATTENTION for s in heads.values())
    assert all(new.at_slot(s).role == MOE for s in experts.values())
    return d


def test_diff_12_to_13():
    old, new = plan_of_move(Config(), 12), plan_of_move(Config(), 13)
    d = check_diff(old, new)
    assert [(r.slot, r.old_role, r.new_role) for r in d.role_changes] == [(Slot(3, 3), MOE, ATTENTION)]
    # heads over 13 GPUs: 0-17 stay on the first six; (2,0) keeps 18-19, (2,1) 20-21, ...
    assert {m.item for m in d.head_moves} == {20} | set(range(22, 32))
    assert {(m.item, m.dst) for m in d.head_moves if m.dst == Slot(3, 3)} == {(30, Slot(3, 3)), (31, Slot(3, 3))}
    # experts over 3 MoE GPUs: 0-5 on (0,3), 6-10 on (1,3), 11-15 on (2,3)
    moved = {(m.item, m.src, m.dst) for m in d.expert_moves}
    assert moved == {(4, Slot(1, 3), Slot(0, 3)), (5, Slot(1, 3), Slot(0, 3)),
                     (8, Slot(2, 3), Slot(1, 3)), (9, Slot(2, 3), Slot(1, 3)), (10, Slot(2, 3), Slot(1, 3)),
                     *((e, Slot(3, 3), Slot(2, 3)) for e in range(12, 16))}
    renumbered = {r.slot: (r.old_gpu, r.new_gpu) for r in d.renumbered}
    assert renumbered == {Slot(0, 3): (12, 13), Slot(1, 3): (13, 14), Slot(2, 3): (14, 15), Slot(3, 3): (15, 12)}
    transfers = d.transfers()
    assert transfers[(Slot(3, 3), Slot(2, 3))] == {"heads": [], "experts": [12, 13, 14, 15]}
    assert transfers[(Slot(3, 2), Slot(3, 3))] == {"heads": [30, 31], "experts": []}


def test_diff_12_to_10():
    old, new = plan_of_move(Config(), 12), plan_of_move(Config(), 10)
    d = check_diff(old, new)
    assert [(r.slot, r.old_role, r.new_role) for r in d.role_changes] == [
        (Slot(0, 2), ATTENTION, MOE), (Slot(1, 2), ATTENTION, MOE)]
    assert new.moe_workers()[4].slot == Slot(0, 2) and new.moe_workers()[5].slot == Slot(1, 2)
    # the old MoE GPUs keep their pool rank (the pool grows at its end)
    assert all(r.old_rank == r.new_rank for r in d.renumbered if new.at_slot(r.slot).role == MOE
               and old.at_slot(r.slot).role == MOE)
    # heads of the two GPUs that became MoE GPUs all leave them
    leaving = {m.item for m in d.head_moves if m.src in (Slot(0, 2), Slot(1, 2))}
    assert leaving == set(old.at_slot((0, 2)).heads) | set(old.at_slot((1, 2)).heads)


@pytest.mark.parametrize("a, b", [(k1, k2) for k1 in range(8, 15) for k2 in range(8, 15)])
def test_diff_any_pair(a, b):
    d = check_diff(plan_of_move(Config(), a), plan_of_move(Config(), b))
    assert len(d.role_changes) == abs(a - b)
    assert d.is_empty == (a == b)


def test_diff_rejects_other_topologies():
    with pytest.raises(ValueError, match="topology"):
        diff_plans(make_plan(Config()), make_plan(TOPOLOGIES["2x8"]))


# --- memory: formulas ------------------------------------------------------------------------------

def test_parameter_formulas_paper():
    cfg = Config()
    assert M.head_params(cfg.model) == 3 * 128 * 4096 + 2 * 128 + 4096 * 128  # Q and V biases, no K bias
    assert M.expert_params(cfg.model) == 2 * 16384 * 4096 + 16384 + 4096
    v, h = cfg.model.vocab_size, cfg.model.hidden_size
    assert M.attention_replicated_params(cfg) == 2 * v * h + 2048 * h + 4 * (5 * h + 16 * h) + 2 * h
    plan = make_plan(cfg)
    total = sum(M.estimate_gpu(cfg, plan, g).parameters for g in plan.gpus)
    # every attention GPU holds the replicated pieces once; the rest is sharded exactly once
    assert total == M.model_params(cfg) + 11 * M.attention_replicated_params(cfg)


def test_precision_accounting():
    # bf16 autocasts over fp32 master weights: its bf16 copies are per-op activations, not state
    assert M.precision_of(Config()).bytes_per_param == 4 + 4 + 8
    assert M.precision_of(Config().replace(**{"train.mixed_precision": "fp32"})).bytes_per_param == 16
    cfg = Config()
    plan = make_plan(cfg)
    e = M.estimate_gpu(cfg, plan, plan.gpus[12])
    assert e.params_bytes == 4 * e.parameters and e.grads_bytes == 4 * e.parameters
    assert e.optimizer_bytes == 8 * e.parameters


def test_capacity_matches_the_router():
    from ma_ray.model import router
    for overrides in ({}, {"moe.capacity_factor": 1.25}, {"moe.top_k": 1}, {"moe.expert_capacity": 2048}):
        cfg = Config().replace(**overrides)
        tokens = cfg.train.micro_batch_size * cfg.train.seq_length
        assert M.expert_capacity(cfg) == router.capacity(tokens, cfg.moe.top_k, cfg.moe.num_experts,
                                                         cfg.moe.capacity_factor, cfg.moe.expert_capacity)
    assert M.expert_capacity(Config()) == 16384


def test_paper_memory_estimate():
    cfg = Config()
    plan = make_plan(cfg)
    est = M.estimate_plan(cfg, plan)
    attention, moe = est[0], est[12]
    assert attention.parameters == 445_615_104 and moe.parameters == 2_147_811_328
    # the figures quoted in ma_ray/parallel/memory.py's docstring
    assert round(attention.total_gb, 1) == 20.6 and round(moe.total_gb, 1) == 44.6
    assert round(attention.kept_bytes / M.GB, 1) == 11.5 and round(moe.kept_bytes / M.GB, 1) == 37.1
    off = cfg.replace(**{"train.activation_checkpointing": False})
    assert round(M.estimate_gpu(off, plan, plan.gpus[0]).total_gb, 1) == 42.6
    assert round(M.estimate_gpu(off, plan, plan.gpus[12]).total_gb, 1) == 176.6
    assert round(M.estimate_gpu(cfg, plan, plan.gpus[0], fused_attention=False).total_gb, 1) == 24.6
    assert round(M.estimate_gpu(off, plan, plan.gpus[0], fused_attention=False).total_gb, 1) == 58.7
    budget = cfg.memory.attention_gpu_budget_gb
    assert max(e.total_gb for e in est) < budget
    # without fused attention the (64, 3, 2048, 2048) probabilities are among the largest terms,
    # after the gathered input of the heads (fp32 and three bf16 copies, kept without checkpointing)
    unfused = M.activation_model(cfg, plan, plan.gpus[0], fused_attention=False)
    largest = dict(unfused.largest_terms(3))
    assert largest["attention probabilities (softmax output)"] == 4 * 64 * 3 * 2048 * 2048 * 2
    assert unfused.largest_terms(1)[0][1] == 4 * 64 * 2048 * 4096 * (4 + 3 * 2)
    fused = M.activation_model(cfg, plan, plan.gpus[0], fused_attention=True)
    assert fused.full_bytes() < unfused.full_bytes() - 4 * 64 * 3 * 2048 * 2048 * 4
    assert "gathered LN1 output" in fused.largest_terms(1)[0][0] or "LM-head" in fused.largest_terms(1)[0][0]


def test_checkpointing_and_scaling():
    cfg = Config()
    plan = make_plan(cfg)
    for g in (plan.gpus[0], plan.gpus[12]):
        e = M.estimate_gpu(cfg, plan, g)
        assert e.checkpointing and e.activations_checkpointed_bytes < e.activations_full_bytes
        off = M.estimate_gpu(cfg.replace(**{"train.activation_checkpointing": False}), plan, g)
        assert off.activations_bytes == e.activations_full_bytes
    # a MoE GPU's activations scale with its experts; an attention GPU's with micro-batch size
    plan9 = plan_of_move(cfg, 9)
    three, two = M.moe_activations(cfg, 3, 12), M.moe_activations(cfg, 2, 12)
    assert three.checkpointed_bytes() * 2 == two.checkpointed_bytes() * 3
    assert M.estimate_gpu(cfg, plan9, plan9.gpus[9]).total_bytes > M.estimate_gpu(cfg, plan9, plan9.gpus[15]).total_bytes
    half = cfg.replace(**{"train.micro_batch_size": 32, "train.gradient_accumulation_steps": 32})
    assert M.attention_activations(half, 3, 12).full_bytes() < M.attention_activations(cfg, 3, 12).full_bytes()


def test_micro_batches_in_flight_multiply_saved_activations():
    cfg = Config()
    two = cfg.replace(**{"schedule.micro_batches_in_flight": 2})
    for make in (lambda c: M.attention_activations(c, 3, 12), lambda c: M.moe_activations(c, 4, 12)):
        one, both = make(cfg), make(two)
        assert both.full_bytes() == 2 * one.full_bytes()
        assert both.checkpointed_bytes() == 2 * one.checkpointed_bytes()
        assert both.workspace_bytes() == one.workspace_bytes()


def test_dropout_off_keeps_no_masks():
    cfg = Config().replace(**{"model.hidden_dropout_prob": 0.0, "model.attention_probs_dropout_prob": 0.0})
    terms = M.attention_activations(cfg, 3, 12, fused_attention=False)
    sizes = {t.name: t.bytes for t in terms.per_layer + terms.outside_layers}
    assert "attention dropout mask" not in sizes and sizes["residual dropout masks"] == 0


# --- memory: formulas against instantiated shards ---------------------------------------------------

def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def local_cfg():
    return load(LOCAL)


def test_attention_shard_matches_formula(local_cfg):
    from ma_ray.model import attention
    plan = make_plan(local_cfg)
    for g in plan.attention_workers():
        shard = attention.AttentionShard(local_cfg.model, list(g.heads))
        assert count(shard) == len(g.heads) * M.head_params(local_cfg.model)


def test_expert_group_matches_formula(local_cfg):
    from ma_ray.model import experts
    for n in (1, 3, 4):
        group = experts.ExpertGroup(local_cfg.model, list(range(n)))
        assert count(group) == n * M.expert_params(local_cfg.model)


def test_attention_side_matches_formula(local_cfg):
    from ma_ray.model import attention_side as side
    assert count(side.AttentionSideParams(local_cfg)) == M.attention_replicated_params(local_cfg)


@pytest.mark.parametrize("k", [8, 12, 14])
def test_reference_model_matches_the_sum_of_the_shards(local_cfg, k):
    from ma_ray.model import reference
    model = reference.MoETransformer(local_cfg)
    assert count(model) == M.model_params(local_cfg)
    plan = plan_of_move(local_cfg, k)
    sharded = sum(M.estimate_gpu(local_cfg, plan, g).parameters for g in plan.gpus)
    assert count(model) == sharded - (k - 1) * M.attention_replicated_params(local_cfg)


# --- the seed's time model ------------------------------------------------------------------------------

def test_time_model_seed_values():
    cfg = Config()
    t = predict_stage_times(cfg, make_plan(cfg))
    assert math.isclose(t.t_attention_s, 0.0012 + 0.000034 * 2048 + 0.0000087 * 4096)
    assert math.isclose(t.t_attention_s, 0.1064672)
    assert t.active_experts == 4
    assert math.isclose(t.t_moe_s, 0.0008 + 0.000045 * 16384 + 0.000012 * 4)
    assert math.isclose(t.t_moe_s, 0.738128)
    assert math.isclose(t.slower_over_faster, 0.738128 / 0.1064672)


def test_time_model_follows_the_split_and_config():
    cfg = Config()
    t9 = predict_stage_times(cfg, plan_of_move(cfg, 9))  # 7 MoE GPUs: 3,3,2,2,2,2,2 experts
    assert t9.active_experts == 3 and math.isclose(t9.t_moe_s, 0.0008 + 0.000045 * 16384 + 0.000012 * 3)
    assert attention_time([1.0, 0.5, 0.25], 2, 4) == 1.0 + 1.0 + 1.0
    assert moe_time([1.0, 0.5, 0.25], 2, 4) == 3.0
    short = cfg.replace(**{"train.seq_length": 1024})
    assert math.isclose(predict_stage_times(short, make_plan(short)).t_attention_s, 0.0012 + 0.000034 * 1024 + 0.0000087 * 4096)
