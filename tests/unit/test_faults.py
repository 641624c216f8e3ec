"""Pure parts of fault handling: the deadlines of a step, a save and a move, the failure record,
the skipped-step streak, metrics.jsonl's rewind on resume and its whole-or-nothing rows (real
files), and the config keys."""

import json

import pytest

from ma_ray.config import ConfigError, load
from ma_ray.control.elastic import shrunk
from ma_ray.control.faults import (CALL_OVERHEAD_S, DEADLINE_FACTOR, Failure, move_deadline_s, save_deadline_s,
                                   skipped_in_a_row, step_deadline_s)
from ma_ray.control.predictor import StageTimePredictor
from ma_ray.parallel.step_time import step_time_s
from ma_ray.control.metrics_log import GROW_EVENT, MetricsLog


def test_a_step_nothing_was_measured_for_gets_the_worker_timeout():
    assert step_deadline_s(0.5, [], 5000, 600.0) == 600.0


def test_the_deadline_is_the_expected_step_with_headroom_plus_the_sync_timeout():
    # The larger of prediction and the recent measurements is expected.
    assert step_deadline_s(0.2, [0.1, 0.4, 0.3], 5000, 600.0) == pytest.approx(DEADLINE_FACTOR * 0.4 + 5.0)
    assert step_deadline_s(2.0, [0.1], 2000, 600.0) == pytest.approx(DEADLINE_FACTOR * 2.0 + 2.0)
    # Only the last few measured steps count, and the worker timeout stays the cap.
    assert step_deadline_s(0.0, [100.0] + [0.1] * 5, 1000, 600.0) == pytest.approx(DEADLINE_FACTOR * 0.1 + 1.0)
    assert step_deadline_s(float("nan"), [0.1], 1000, 600.0) == pytest.approx(DEADLINE_FACTOR * 0.1 + 1.0)
    assert step_deadline_s(1000.0, [0.1], 1000, 60.0) == 60.0


def test_a_failure_counts_the_finished_steps_redone():
    f = Failure(9, "train step", {"node0-gpu1 (moe)": "no answer within 3 s (a stall)"}, 100.0)
    assert f.line() == "failure at step 9: train step failed on node0-gpu1 (moe): no answer within 3 s (a stall)"
    f.recovered(5, 12.34, 4)  # steps 6, 7, 8 and 9: a failed save after step 9 had finished it
    assert (f.resumed_from, f.steps_lost, f.recover_s) == (5, 4, 12.34)
    assert f.line().endswith("; recovered from the checkpoint of step 5 in 12.3 s, 4 finished step(s) redone")
    assert Failure(**json.loads(json.dumps(f.to_dict()))) == f


def test_a_save_is_bounded_by_its_bytes_over_the_measured_write_speed():
    assert save_deadline_s(200e6, 100e6, 600.0) == pytest.approx(DEADLINE_FACTOR * 2.0 + CALL_OVERHEAD_S)
    assert save_deadline_s(1e6, 1e9, 600.0) < 6  # a small state on a fast disk: seconds, not minutes
    assert save_deadline_s(100e9, 10e6, 600.0) == 600.0  # control.worker_timeout_s stays the cap
    assert save_deadline_s(1e6, 0.0, 600.0) == 600.0  # nothing measured: nothing to bound it by


def test_a_move_is_bounded_by_its_measured_pause_once_one_was_measured():
    assert move_deadline_s(None, 2000, 600.0) == 600.0
    assert move_deadline_s(4.0, 2000, 600.0) == pytest.approx(DEADLINE_FACTOR * 4.0 + CALL_OVERHEAD_S + 2.0)
    assert move_deadline_s(1e6, 2000, 600.0) == 600.0


def test_the_skip_streak_counts_the_last_steps_only():
    assert skipped_in_a_row([]) == 0
    assert skipped_in_a_row([True, True, False]) == 0
    assert skipped_in_a_row([False, True, False, True, True]) == 2
    assert skipped_in_a_row([True] * 4) == 4


def test_rewind_keeps_the_rows_up_to_the_checkpoint_and_every_event(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(4):
        log.append({"step": step, "loss": float(step)})
    log.append(Failure(4, "train step", {"w": "x"}, 1.0).to_dict())
    log.append({"step": 4, "loss": 4.0})
    log.append({"event": GROW_EVENT, "before_step": 5, "nodes": 2})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # a controller killed mid-write
    log.rewind(1)
    assert [r["failed_step"] for r in log.failures()] == [4]
    assert [r.get("step", r.get("event")) for r in log.rows()] == [0, 1, "failure", GROW_EVENT]
    log.append({"step": 2, "loss": 2.5})
    assert [r.get("step", r.get("event")) for r in log.rows()] == [0, 1, "failure", GROW_EVENT, 2]
    assert not list(tmp_path.glob(".*tmp"))


def test_the_write_speed_probe_leaves_nothing_behind(tmp_path):
    from ma_ray.storage import write_speed

    assert write_speed(tmp_path, 2 << 20) > 0
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("train.max_failures=-1", "train.max_failures: must not be negative"),
    ("train.max_consecutive_skips=0", "train.max_consecutive_skips: must be at least 1"),
    ("control.heartbeat_timeout_s=0", "control.heartbeat_timeout_s: must be a positive number of seconds"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be null or at least 1"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"),
])
def test_fault_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load(None, [override])


def test_fault_key_defaults():
    t = load(None, []).train
    assert (t.max_failures, t.keep_checkpoints, t.on_nonfinite, t.elastic) == (3, None, "stop", False)


def test_a_smaller_cluster_keeps_the_training_and_takes_the_predictors_split():
    cfg = load("tests/configs/live-job.yaml", ["cluster.attention_gpus=4"])  # 2 nodes x 3 GPUs
    smaller = shrunk(cfg, 1)
    assert (smaller.cluster.num_nodes, smaller.total_gpus) == (1, 3)
    assert 1 <= smaller.cluster.attention_gpus <= 2
    assert smaller.balance.max_attention_gpus == 2  # the policy's range fits the 3 GPUs left
    assert (smaller.train, smaller.model, smaller.moe, smaller.data) == (cfg.train, cfg.model, cfg.moe, cfg.data)
    predictor = StageTimePredictor(smaller)
    step_s = {k: step_time_s(predictor.predict(k).t_attention_s, predictor.predict(k).t_moe_s, predictor.pipeline)
              for k in (1, 2)}
    assert smaller.cluster.attention_gpus == min(step_s, key=step_s.get)
    assert shrunk(cfg, 2) is None and shrunk(cfg, 0) is None  # not smaller; nothing left
    # One GPU cannot be split between the pools.
    single = load("tests/configs/live-job.yaml", ["cluster.gpus_per_node=1", "cluster.attention_gpus=1",
                                                  "balance.min_attention_gpus=1", "balance.max_attention_gpus=1"])
    assert shrunk(single, 1) is None
