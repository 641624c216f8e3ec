"""The controller actor: drives the training steps, measures and predicts each pool's stage time,
applies the balancing policy, writes checkpoints, and answers control calls while it trains.

It is a named, threaded Ray actor: ``run`` occupies one thread for the whole training, and every
control call (``status``, ``rebalance``, ``set_policy``, ``pause``, ...) runs on another thread
and only reads or queues under a lock, so none of them waits for the run to finish. Requests that
change the job (a rebalance, a stop) are carried out between two steps by the run thread.

The decisions themselves are pure code (``predictor.py``, ``policy.py``); this module only wires
them to the job, the checkpoints and ``ray.util.metrics``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import ray
from ray.util import metrics as ray_metrics

from ma_ray.config import Config, check_split
from ma_ray.control.migration_cost import MigrationCostModel
from ma_ray.control.policy import IDLE, BalancingPolicy, Decision
from ma_ray.control.predictor import PredictionError, StageTimePredictor
from ma_ray.runtime import checkpoint
from ma_ray.runtime.job import TrainingJob
from ma_ray.runtime.step_metrics import StepMetrics


@dataclass(frozen=True)
class HistoryRow:
    """One step of the run as the controller saw it: its metrics, what the predictor had
    predicted for it (before learning from it; None when a pool timed nothing), and the policy's
    decision after it (None when none was due)."""

    step: int
    metrics: StepMetrics
    prediction: Optional[PredictionError] = None
    decision: Optional[Decision] = None

    def to_dict(self) -> dict:
        """The plain row of ``metrics.jsonl`` and ``history()``: ``step``, the metrics' keys,
        ``predicted_t_attention_s`` / ``predicted_t_moe_s`` and ``decision`` when there are any."""
        row = {"step": self.step, **self.metrics.to_dict()}
        if self.prediction is not None:
            row.update(predicted_t_attention_s=self.prediction.predicted_attention_s,
                       predicted_t_moe_s=self.prediction.predicted_moe_s)
        if self.decision is not None:
            row["decision"] = self.decision.to_dict()
        return row


class _Gauges:
    """Per-step metrics for the Ray dashboard and Prometheus."""

    def __init__(self, job_name: str):
        tags = {"job": job_name}
        self.stage = ray_metrics.Gauge("ma_ray_stage_time_seconds", "measured stage time of a pool",
                                       tag_keys=("job", "pool"))
        self.imbalance = ray_metrics.Gauge("ma_ray_imbalance", "|T_a - T_m| / max(T_a, T_m)", tag_keys=("job",))
        self.attention_gpus = ray_metrics.Gauge("ma_ray_attention_gpus", "GPUs in the attention pool",
                                                tag_keys=("job",))
        self.loss = ray_metrics.Gauge("ma_ray_loss", "training loss", tag_keys=("job",))
        self.overlap = ray_metrics.Gauge("ma_ray_overlap_efficiency",
                                         "share of the lighter pool's compute hidden under the heavier's",
                                         tag_keys=("job",))
        for g in (self.stage, self.imbalance, self.attention_gpus, self.loss, self.overlap):
            g.set_default_tags(tags)

    def record(self, m: StepMetrics) -> None:
        self.stage.set(m.t_attention_s, tags={"pool": "attention"})
        self.stage.set(m.t_moe_s, tags={"pool": "moe"})
        self.imbalance.set(m.imbalance)
        self.attention_gpus.set(m.attention_gpus)
        self.loss.set(m.loss)
        self.overlap.set(m.overlap_efficiency)


@ray.remote(max_concurrency=8, num_cpus=0)
class Controller:
    def __init__(self, cfg: Config, dataset, out: str, steps: int, resume: Optional[str] = None,
                 attention_gpus: Optional[int] = None, torch_threads: Optional[int] = None):
        self.cfg = cfg
        self.out = Path(out)
        self.lock = threading.Lock()
        self.unpaused = threading.Event()
        self.unpaused.set()
        self.pending_split: Optional[int] = None
        self.stop_requested = False
        self.history: List[HistoryRow] = []
        self.migrations: List[dict] = []
        self.predictor = StageTimePredictor(cfg)
        self.policy = BalancingPolicy.from_config(cfg)
        self.migration_cost = MigrationCostModel(cfg)
        self.window: List[tuple] = []  # (T_a, T_m) measured since the last decision
        self.start_step = 0
        folder = None
        if resume is not None:
            folder = checkpoint.latest(Path(resume))
            meta = checkpoint.read_meta(folder)
            self.start_step = meta["step"] + 1
            self.predictor.load_state_dict(meta["predictor"])
            self.policy.load_state_dict(meta["policy"])
            self.migration_cost.load_state_dict(meta["migration_cost"])
            if attention_gpus is None:
                attention_gpus = meta["attention_gpus"]
        self.end_step = steps  # the run's total: a resumed run continues up to the same step
        self.job = TrainingJob(cfg, dataset, attention_gpus, name=cfg.control.name, torch_threads=torch_threads,
                               checkpoint=None if folder is None else str(folder))
        self.gauges = _Gauges(self.job.name)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_length
        self.state = "ready"
        self.step = self.start_step - 1
        self.last_checkpoint: Optional[str] = None if folder is None else str(folder)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train until the last step or a stop; returns the final status."""
        self.state = "running"
        try:
            for step in range(self.start_step, self.end_step):
                self.unpaused.wait()
                if self._apply_requests(step):
                    break
                t0 = time.perf_counter()
                metrics = self.job.step(step)
                self._after_step(step, metrics.with_wall_clock(time.perf_counter() - t0, self.tokens_per_step))
            self._checkpoint(self.step)
            self.state = "stopped" if self.stop_requested else "finished"
        except BaseException:
            self.state = "failed"
            raise
        finally:
            self.job.shutdown()
        return self.status()

    def _apply_requests(self, step: int) -> bool:
        """Between steps: carry out a queued rebalance; True when a stop was asked for."""
        with self.lock:
            target, self.pending_split = self.pending_split, None
            stop = self.stop_requested
        if stop:
            return True
        if target is not None and target != self.job.plan.attention_gpus:
            self._migrate(step, target, reason="requested")
        return False

    def _migrate(self, step: int, k: int, reason: str) -> None:
        before = self.job.plan.attention_gpus
        result = self.job.apply_split(k)
        record = {"before_step": step, "from": before, "to": k, "reason": reason, **result}
        with self.lock:
            self.migrations.append(record)
        self.migration_cost.observe(before, k, result["pause_s"])

    def _after_step(self, step: int, metrics: StepMetrics) -> None:
        k = self.job.plan.attention_gpus
        seen = None
        if metrics.t_attention_s > 0 and metrics.t_moe_s > 0:  # a pool that timed nothing teaches nothing
            # Predicted before this step is learnt from: the error on steps the model did not fit.
            seen = self.predictor.observe_metrics(metrics, step=step)
        self.window.append((metrics.t_attention_s, metrics.t_moe_s))
        with self.lock:
            decision = self.policy.decide(step + 1, k, self.predictor, measured=_mean(self.window),
                                          migration_cost=self.migration_cost.estimate)
        taken = decision.reason not in IDLE
        if taken:
            self.window.clear()
        with self.lock:
            self.history.append(HistoryRow(step, metrics, seen, decision if taken else None))
            self.step = step
        self.gauges.record(metrics)
        if (step + 1) % self.cfg.train.checkpoint_interval == 0:
            self._checkpoint(step)
        if decision.move:
            self._migrate(step + 1, decision.new_k, reason=decision.detail)

    def _checkpoint(self, step: int) -> None:
        if step < 0 or (self.last_checkpoint or "").endswith(f"step-{step:08d}"):
            return
        folder = checkpoint.save(self.job, self.out / "checkpoints", step,
                                 {"predictor": self.predictor.state_dict(), "policy": self.policy.state_dict(),
                                  "migration_cost": self.migration_cost.state_dict()})
        with self.lock:
            self.last_checkpoint = str(folder)

    # -- control calls (other threads) ------------------------------------------------------

    def status(self) -> dict:
        with self.lock:
            last = self.history[-1].metrics if self.history else None
            plan = self.job.plan
            predicted = self.predictor.predict(plan.attention_gpus)
            return {
                "state": "paused" if not self.unpaused.is_set() and self.state == "running" else self.state,
                "step": self.step, "end_step": self.end_step, "attention_gpus": plan.attention_gpus,
                "moe_gpus": plan.moe_gpus, "plan": plan.to_dict(),
                "measured": {"t_attention_s": None if last is None else last.t_attention_s,
                             "t_moe_s": None if last is None else last.t_moe_s,
                             "imbalance": None if last is None else last.imbalance,
                             "loss": None if last is None else last.loss},
                "predicted": {"t_attention_s": predicted.t_attention_s, "t_moe_s": predicted.t_moe_s},
                "pending_split": self.pending_split, "policy": self.policy.params.to_dict(),
                "predictor_error": self.predictor.error_report(), "migrations": list(self.migrations),
                "last_checkpoint": self.last_checkpoint,
            }

    def rows_since(self, step: int = -1, n: Optional[int] = None) -> List[HistoryRow]:
        """History rows of steps after ``step`` (the newest ``n`` of them when given)."""
        with self.lock:
            rows = [r for r in self.history if r.step > step]
        return rows[-n:] if n else rows

    def history_since(self, step: int = -1, n: Optional[int] = None) -> List[dict]:
        """``rows_since`` as plain rows (``HistoryRow.to_dict``): what a client gets."""
        return [r.to_dict() for r in self.rows_since(step, n)]

    def rebalance(self, attention_gpus: int) -> dict:
        """Queue a move to ``attention_gpus``; it happens before the next step. Bad splits raise
        ConfigError and change nothing."""
        with self.lock:
            p = self.policy.params
            policy_range = (p.min_attention_gpus, p.max_attention_gpus)  # the live policy's, not the config's
        check_split(self.cfg, attention_gpus, key="rebalance", policy_range=policy_range)
        with self.lock:
            self.pending_split = attention_gpus
        return {"scheduled": attention_gpus, "after_step": self.step}

    def set_policy(self, **changes) -> dict:
        """Change balancing parameters (threshold, interval, min, max, enabled, ...); a bad value
        raises and changes nothing."""
        with self.lock:
            return self.policy.update(**changes).to_dict()

    def pause(self) -> str:
        self.unpaused.clear()
        return "paused"

    def resume(self) -> str:
        self.unpaused.set()
        return "running"

    def stop(self) -> str:
        """Checkpoint and end cleanly after the step in progress."""
        with self.lock:
            self.stop_requested = True
        self.unpaused.set()
        return "stopping"

    def ping(self) -> float:
        return time.time()


def _mean(rows: List[tuple]) -> Optional[tuple]:
    if not rows:
        return None
    return tuple(sum(col) / len(rows) for col in zip(*rows))
