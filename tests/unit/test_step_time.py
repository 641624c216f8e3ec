"""The one module of step-time arithmetic (``parallel.step_time``) and the step record made with
it (``runtime.step_metrics``): pure, no Ray."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from ma_ray.config import Config
from ma_ray.parallel.step_time import (FORWARD_SHARE, PipelineShape, ideal_pass_s, ideal_step_s, imbalance,
                                       overlap_efficiency, step_time_s)
from ma_ray.runtime import timing
from ma_ray.runtime.step_metrics import StepMetrics, WorkerStepResult, summarize


def test_imbalance_is_relative_to_the_slower_pool():
    assert imbalance(3.0, 1.0) == pytest.approx(2 / 3) == imbalance(1.0, 3.0)
    assert imbalance(0.5, 0.5) == 0.0
    assert imbalance(0.0, 0.0) == 0.0  # nothing timed: balanced, not a division by zero
    assert imbalance(0.0, 2.0) == 1.0
    assert imbalance(1e-300, 3e-300) == pytest.approx(2 / 3)  # no epsilon that swamps tiny times


def test_overlap_efficiency_from_taking_turns_to_fully_hidden():
    assert overlap_efficiency(2.0, 3.0, 5.0) == 0.0  # the pools took turns
    assert overlap_efficiency(2.0, 3.0, 6.0) == 0.0  # exposed transfers: worse, clipped at 0
    assert overlap_efficiency(2.0, 3.0, 3.0) == 1.0  # the lighter pool entirely hidden
    assert overlap_efficiency(2.0, 3.0, 4.0) == pytest.approx(0.5)
    assert overlap_efficiency(0.0, 3.0, 3.0) == 0.0  # a pool that did nothing has nothing to hide
    # The ideal overlap efficiency is the same figure at the ideal pass time: 1 - 1 / (m L) for
    # a MoE-bound pass of m = 4 micro-batches over L = 4 layers with free transfers.
    assert overlap_efficiency(16.0, 48.0, ideal_pass_s(1.0, 3.0, 0.0, 4, 4)) == pytest.approx(15 / 16)


def test_pipeline_shape_from_config():
    cfg = Config().replace(**{"schedule.micro_batches_in_flight": 4})
    shape = PipelineShape.from_config(cfg)
    assert shape == PipelineShape(micro_batches=16, layers=4, in_flight=4) and shape.stages == 64


def test_one_in_flight_the_pools_take_turns():
    shape = PipelineShape(micro_batches=5, layers=3, in_flight=1)
    # Free transfers: every stage of either pool runs alone, stages x (T_a + T_m).
    assert step_time_s(0.2, 0.7, shape) == pytest.approx(15 * (0.2 + 0.7))
    assert ideal_step_s((0.2, 0.7), (0.4, 1.4), 0.0, 5, 1, 3) == pytest.approx(15 * (0.6 + 2.1))
    # A transfer before and after every stage of the other pool, in each of the two passes.
    assert step_time_s(0.2, 0.7, shape, t_transfer_s=0.01) == pytest.approx(15 * (0.9 + 2 * 2 * 0.01))


def test_deep_pipelines_follow_the_slower_pool():
    # MoE-bound, 4 groups of 4 micro-batches over 4 layers: per group the MoE pool's 16 stages and
    # the attention pool's first (forward) and last (backward) stage, a third and two thirds of one.
    t_a, t_m = 0.3, 1.0
    assert step_time_s(t_a, t_m, PipelineShape(16, 4, 4)) == pytest.approx(4 * (16 * t_m + t_a))
    # Attention-bound, groups of 2, 2 and a last one alone, where the pools take turns.
    t_a, t_m = 1.0, 0.9
    assert step_time_s(t_a, t_m, PipelineShape(5, 4, 2)) == pytest.approx(2 * (8 * t_a + t_m) + 4 * (t_a + t_m))
    # The rebalance preset's shape (2 micro-batches, both in flight, 4 layers) at its first split.
    assert step_time_s(0.594, 0.207, PipelineShape(2, 4, 2)) == pytest.approx(8 * 0.594 + 0.207)


def test_step_time_is_the_ideal_pipeline_split_forward_and_backward():
    t_a, t_m, t_c = 0.6, 0.2, 0.05
    fwd = (FORWARD_SHARE * t_a, FORWARD_SHARE * t_m)
    bwd = ((1 - FORWARD_SHARE) * t_a, (1 - FORWARD_SHARE) * t_m)
    for shape in (PipelineShape(2, 4, 2), PipelineShape(10, 2, 4), PipelineShape(3, 4, 8)):
        want = ideal_step_s(fwd, bwd, t_c, shape.micro_batches, shape.in_flight, shape.layers)
        assert step_time_s(t_a, t_m, shape, t_c) == pytest.approx(want)
        # With free transfers the split cancels: each group's two passes add up to one pass of
        # whole stages.
        groups = [min(shape.in_flight, shape.micro_batches - i) for i in range(0, shape.micro_batches, shape.in_flight)]
        assert step_time_s(t_a, t_m, shape) == pytest.approx(
            sum(ideal_pass_s(t_a, t_m, 0.0, m, shape.layers) for m in groups))


def test_step_time_between_the_slower_pool_and_the_sum_and_never_slower_deeper():
    rnd = random.Random(0)
    for _ in range(500):
        t_a, t_m = rnd.uniform(0.01, 1.0), rnd.uniform(0.01, 1.0)
        micro, layers = rnd.choice([1, 2, 4, 8, 16]), rnd.choice([1, 2, 4])
        previous = None
        for m in (d for d in range(1, micro + 1) if micro % d == 0):
            s = step_time_s(t_a, t_m, PipelineShape(micro, layers, m))
            stages = micro * layers
            assert stages * max(t_a, t_m) - 1e-9 <= s <= stages * (t_a + t_m) + 1e-9
            assert previous is None or s <= previous + 1e-9
            previous = s


def test_free_transfers_closed_form():
    """``step_time_s``'s docstring: at m >= 2 a pass is ``m L hi + lo``, the chain never binds."""
    rnd = random.Random(1)
    for _ in range(500):
        t_a, t_m = rnd.uniform(0.01, 1.0), rnd.uniform(0.01, 1.0)
        m, layers = rnd.randint(2, 8), rnd.randint(1, 8)
        hi, lo = max(t_a, t_m), min(t_a, t_m)
        assert ideal_pass_s(t_a, t_m, 0.0, m, layers) == pytest.approx(m * layers * hi + lo)
        assert ideal_pass_s(t_a, t_m, 0.0, 1, layers) == pytest.approx(layers * (t_a + t_m))


def test_the_model_ranks_splits_by_sum_in_turns_and_by_balance_when_pipelined():
    balanced, lopsided = (1.0, 1.0), (0.5, 1.3)  # the second has the smaller sum
    turns, pipelined = PipelineShape(16, 4, 1), PipelineShape(16, 4, 4)
    assert step_time_s(*lopsided, turns) < step_time_s(*balanced, turns)
    assert step_time_s(*balanced, pipelined) < step_time_s(*lopsided, pipelined)


# --- the step record ------------------------------------------------------------------------------

def _job(layers=2, micro_batches=2, in_flight=1, replicas=1):
    """Micro-batches per replica: each replica runs ``micro_batches`` of the step's."""
    cfg = SimpleNamespace(micro_batches_per_replica=micro_batches, model=SimpleNamespace(num_layers=layers),
                          schedule=SimpleNamespace(micro_batches_in_flight=in_flight))
    gpus = [SimpleNamespace(is_attention=a) for a in (True, True, False)]
    return cfg, SimpleNamespace(gpus=gpus, attention_gpus=2, replicas=replicas)


def _results():
    def worker(compute_label, compute, collectives, passes, **shares):
        return WorkerStepResult(grad_norm=0.5, lr=1e-4, dropped_fraction=0.1, **shares,
                                timings={compute_label: compute, timing.ATTENTION_COLLECTIVES: collectives,
                                         timing.PASSES: passes})
    return [worker(timing.ATTENTION_COMPUTE, 2.0, 0.4, 5.0, loss_share=1.0, ce_share=0.9, aux_share=0.06,
                   z_share=0.04),
            worker(timing.ATTENTION_COMPUTE, 1.6, 0.2, 5.2, loss_share=1.5, ce_share=1.4, aux_share=0.06,
                   z_share=0.04),
            worker(timing.MOE_COMPUTE, 3.2, 0.0, 5.1)]


def test_summarize_makes_the_step_record_with_the_one_definitions():
    cfg, plan = _job()
    m = summarize(cfg, plan, _results())
    assert isinstance(m, StepMetrics)
    assert (m.loss, m.ce, m.aux, m.z) == pytest.approx((2.5, 2.3, 0.12, 0.08))
    assert (m.grad_norm, m.lr, m.dropped_fraction, m.attention_gpus) == (0.5, 1e-4, 0.1, 2)
    # 4 stages a step: the slowest worker of each pool, per stage.
    assert (m.t_attention_s, m.t_moe_s, m.t_passes_s) == pytest.approx((0.5, 0.8, 5.2))
    assert m.t_aggregation_s == pytest.approx(0.1)  # the slowest attention GPU's 0.4 s over 4 stages
    assert m.imbalance == pytest.approx(imbalance(0.5, 0.8))
    # The attention pool's work counts its collectives: 2.4 s against the MoE pool's 3.2 s.
    assert m.overlap_efficiency == overlap_efficiency(2.4, 3.2, 5.2) == pytest.approx(0.4 / 2.4)
    assert m.step_time_s is None and m.tokens_per_s is None


def test_the_record_as_plain_data_keeps_the_metrics_keys():
    cfg, plan = _job()
    m = summarize(cfg, plan, _results()).with_wall_clock(2.0, tokens_per_step=1000)
    assert (m.step_time_s, m.tokens_per_s) == (2.0, 500.0)
    row = json.loads(json.dumps(m.to_dict()))
    assert list(row) == ["loss", "ce", "aux", "z", "grad_norm", "dropped_fraction", "lr", "t_attention_s",
                         "t_moe_s", "t_aggregation_s", "imbalance", "t_passes_s", "overlap_efficiency", "attention_gpus",
                         "bytes_intra_node", "bytes_inter_node", "t_grad_sync_s", "t_compression_s",
                         "step_time_s", "tokens_per_s", "skipped", "device_step_s"]
    assert StepMetrics(**row) == m


def test_the_record_sums_each_levels_bytes_and_takes_the_slowest_gradient_synchronisation():
    cfg, plan = _job()
    results = _results()
    # The third worker is a MoE worker: its bytes and sync are its experts' all-reduce with its
    # counterparts in other replicas; its compression timer is the attention pool's, so 9 s
    # there would be a bug the record must not show.
    for r, (intra, inter, sync, kernels) in zip(results, [(10.0, 4.0, 0.3, 0.1), (6.0, 2.0, 0.5, 0.05),
                                                          (0.0, 3.0, 0.7, 9.0)]):
        r.level_bytes = {"intra_node": intra, "inter_node": inter}
        r.timings.update({timing.GRAD_SYNC: sync, timing.COMPRESSION: kernels})
    m = summarize(cfg, plan, results)
    assert (m.bytes_intra_node, m.bytes_inter_node) == (16.0, 9.0)
    assert (m.t_grad_sync_s, m.t_compression_s) == (0.7, 0.1)


def test_replicas_add_their_loss_shares_and_the_slowest_of_any_sets_the_pace():
    cfg, plan = _job(replicas=2)
    first, second = _results(), _results()
    second[1].timings[timing.ATTENTION_COMPUTE] = 2.8  # replica 1's second attention GPU is the slowest
    second[2].timings[timing.MOE_COMPUTE] = 2.0
    for r in second[:2]:
        r.dropped_fraction = 0.3
    m = summarize(cfg, plan, first + second)
    assert (m.loss, m.ce) == pytest.approx((5.0, 4.6))  # each replica's share of the micro-batches
    assert (m.t_attention_s, m.t_moe_s) == pytest.approx((0.7, 0.8))
    assert m.dropped_fraction == pytest.approx(0.2)  # the mean of the replicas' fractions
    assert m.attention_gpus == 2  # one replica's split: every replica has it
    assert m.device_step_s is None  # no worker kept the modelled device clock
    for r, clock in zip(first + second, [3.0, 3.1, 2.9, 3.4, 3.2, 3.3]):
        r.timings[timing.DEVICE_CLOCK] = clock
    assert summarize(cfg, plan, first + second).device_step_s == 3.4  # the slowest worker's
