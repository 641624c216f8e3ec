"""Pure parts of fault handling: the step deadline, the failure record, metrics.jsonl's rewind on
resume (real files), and the new config keys."""

import json

import pytest

from ma_ray.config import ConfigError, load
from ma_ray.control.elastic import shrunk
from ma_ray.control.faults import DEADLINE_FACTOR, Failure, step_deadline_s
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
    f.recovered(5, 12.34)
    assert (f.resumed_from, f.steps_lost, f.recover_s) == (5, 3, 12.34)  # steps 6, 7, 8 again
    assert f.line().endswith("; recovered from the checkpoint of step 5 in 12.3 s, 3 finished step(s) redone")
    assert Failure(**json.loads(json.dumps(f.to_dict()))) == f
    assert Failure(2, "train step", {}, 0.0).recovered(-1, 1.0).steps_lost == 2  # no checkpoint: from the start


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


@pytest.mark.parametrize("override, message", [
    ("train.max_failures=-1", "train.max_failures: must not be negative"),
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
