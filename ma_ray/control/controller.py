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
from typing import List, Optional, Sequence

import ray
from ray.util import metrics as ray_metrics

from ma_ray.config import Config, check_split
from ma_ray.control.client import controller_name
from ma_ray.control.elastic import shrunk
from ma_ray.control.faults import (Failure, NonFiniteStep, move_deadline_s, save_deadline_s, skipped_in_a_row,
                                   step_deadline_s)
from ma_ray.control.metrics_log import GROW_EVENT, MetricsLog
from ma_ray.control.migration_cost import MigrationCostModel
from ma_ray.control.policy import IDLE, BalancingPolicy, Decision
from ma_ray.control.predictor import PredictionError, StageTimePredictor
from ma_ray.parallel.step_time import PipelineShape, step_time_s
from ma_ray.run_folder import new_job_id
from ma_ray.runtime import checkpoint
from ma_ray.runtime.checkpoint import latest_intact
from ma_ray.runtime.cluster import ClusterError
from ma_ray.runtime.worker_set import CLOSE_TIMEOUT_S, WorkerSet
from ma_ray.runtime.step_metrics import StepMetrics
from ma_ray.runtime.worker_group import WorkerCallFailed
from ma_ray.storage import StorageError, write_speed


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

    def __init__(self, job_id: str):
        tags = {"job_id": job_id}
        self.stage = ray_metrics.Gauge("ma_ray_stage_time_seconds", "measured stage time of a pool",
                                       tag_keys=("job_id", "pool"))
        self.imbalance = ray_metrics.Gauge("ma_ray_imbalance", "|T_a - T_m| / max(T_a, T_m)", tag_keys=("job_id",))
        self.attention_gpus = ray_metrics.Gauge("ma_ray_attention_gpus", "GPUs in the attention pool",
                                                tag_keys=("job_id",))
        self.loss = ray_metrics.Gauge("ma_ray_loss", "training loss", tag_keys=("job_id",))
        self.overlap = ray_metrics.Gauge("ma_ray_overlap_efficiency",
                                         "share of the lighter pool's compute hidden under the heavier's",
                                         tag_keys=("job_id",))
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
                 torch_threads: Optional[int] = None, job_id: Optional[str] = None,
                 recovering: Optional[dict] = None, earlier_failures: Sequence[dict] = (),
                 workers_name: Optional[str] = None):
        """``cfg``: the run's config, at the split its workers start at (a resume's: settled by the
        caller). ``resume``: the checkpoint folder to continue from, verified
        (``checkpoint.verify``) by the caller; ``job_id``: the run's (``run_folder.new_job_id``),
        in this actor's name and its gauges' tags; ``recovering``: the failure of the controller this one replaces
        (``Failure.to_dict``), recorded as recovered from once this one's workers are ready;
        ``earlier_failures``: those of the run before it, which count against
        ``train.max_failures``; ``workers_name``: the name of this incarnation's workers (default:
        this actor's; docs/architecture.md#lifetimes-and-their-names)."""
        self.cfg = self.full_cfg = cfg  # cfg: the topology run now (smaller after an elastic restart)
        self.job_id = job_id or new_job_id()
        self.name = controller_name(cfg.control.name, self.job_id)
        self.out = Path(out)
        self.dataset, self.torch_threads = dataset, torch_threads
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
        self.checkpoints = self.out / "checkpoints"
        checkpoint.clean_orphans(self.checkpoints)  # what saves cut short by a crash left behind
        # A save's deadline comes from its bytes over the slowest write speed seen on this disk:
        # measured here first (a folder that cannot be written fails here, named), then by
        # every save.
        self.write_speeds = [write_speed(self.checkpoints)]
        folder = None if resume is None else Path(resume)  # a verified checkpoint (the driver chose it)
        if folder is not None:
            self._restore(folder)
        self.start_step = 0 if folder is None else checkpoint.read_meta(folder)["step"] + 1
        self.metrics_log = MetricsLog(self.out / "metrics.jsonl")
        redone = sum(1 for r in self.metrics_log.rows() if "event" not in r and r.get("step", -1) >= self.start_step)
        self.metrics_log.rewind(self.start_step - 1)  # the steps past the checkpoint are trained again
        self.failures = [Failure(**row) for row in earlier_failures]
        self.end_step = steps  # the run's total: a resumed run continues up to the same step
        self.next_boundary = self.start_step  # the step before which the run thread next reads requests
        self.workers_name = workers_name or self.name
        self.worker_set = self._restart(cfg, folder, generation=0)
        shrank = self.worker_set.cfg.total_gpus != cfg.total_gpus
        if shrank:
            self._adopt(self.worker_set.cfg)
        self.measured_from = 0  # the first history row measured on the current workers and split
        if recovering is not None:
            failure = Failure(**recovering)
            if shrank:  # the node that held the dead controller may be gone with it
                failure.notes.append(self._shrunk_note(self.worker_set))
            failure.recovered(self.start_step - 1, time.time() - recovering["detected_at"], redone)
            self.failures.append(failure)
            self.metrics_log.append(failure.to_dict())
        self.gauges = _Gauges(self.job_id)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_length
        self.state = "ready"
        self.step = self.start_step - 1
        self.last_checkpoint: Optional[str] = None if folder is None else str(folder)

    def _restore(self, folder: Path) -> int:
        """Take the controller's state from checkpoint ``folder``; returns the checkpoint's split."""
        meta = checkpoint.read_meta(folder)
        self.predictor.load_state_dict(meta["predictor"])
        self.policy.load_state_dict(meta["policy"])
        self.migration_cost.load_state_dict(meta["migration_cost"])
        return meta["attention_gpus"]

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train until the last step or a stop; returns the final status."""
        self.state = "running"
        try:
            step = self.start_step
            while step < self.end_step:
                self.unpaused.wait()
                try:
                    if self._apply_requests(step):
                        break
                    t0 = time.perf_counter()
                    metrics = self.worker_set.step(step, timeout_s=self._step_deadline_s())
                    self._after_step(step, metrics.with_wall_clock(time.perf_counter() - t0, self.tokens_per_step))
                    if metrics.skipped:
                        self._check_skips(step, metrics)
                    step += 1
                except WorkerCallFailed as exc:
                    if _storage_only(exc):
                        raise  # a full disk or a read-only folder: a restart would fail the same way
                    failure = Failure(step, exc.operation, exc.failures, time.time(), exc.started_at, exc.timeout_s)
                    step = self._recover(failure, exc)
            self._checkpoint(self.step)
            self.state = "stopped" if self.stop_requested else "finished"
        except BaseException:
            self.state = "failed"
            raise
        finally:
            # After a failure the groups may be broken and a worker stalled: kill, do not wait.
            self.worker_set.shutdown(timeout_s=0 if self.state == "failed" else CLOSE_TIMEOUT_S)
        return self.status()

    def _check_skips(self, step: int, metrics: StepMetrics) -> None:
        """End the run on a skipped step, as ``train.on_nonfinite`` and
        ``train.max_consecutive_skips`` say."""
        t = self.cfg.train
        if t.on_nonfinite == "stop":
            raise NonFiniteStep(f"step {step}: the loss is {metrics.loss} and the gradient norm "
                                f"{metrics.grad_norm}; the step was not applied and the run stops "
                                f"(train.on_nonfinite=stop)")
        with self.lock:
            streak = skipped_in_a_row([r.metrics.skipped for r in self.history])
        if streak >= t.max_consecutive_skips:
            raise NonFiniteStep(f"steps {step - streak + 1}-{step}: {streak} steps in a row had a non-finite loss or "
                                f"gradient norm and were skipped (train.max_consecutive_skips="
                                f"{t.max_consecutive_skips}); the last applied step is {step - streak}")

    def _step_deadline_s(self) -> float:
        """How long the next step may take before it counts as stalled (``faults``)."""
        k = self.worker_set.plan.attention_gpus
        with self.lock:
            recent = [r.metrics.step_time_s for r in self.history[self.measured_from:]
                      if r.metrics.attention_gpus == k]
        predicted = self.predictor.predict(k)
        predicted_s = step_time_s(predicted.t_attention_s, predicted.t_moe_s, PipelineShape.from_config(self.cfg))
        return step_deadline_s(predicted_s, recent, self.cfg.comm.synchronization_timeout_ms,
                               self.cfg.control.worker_timeout_s)

    def _recover(self, failure: Failure, exc: WorkerCallFailed) -> int:
        """Restart every worker from the latest checkpoint after ``failure``, or raise ``exc``
        once ``train.max_failures`` are used up; returns the step to go on with. Each failure is
        recorded (a row of ``metrics.jsonl``, and what ``failures_since`` returns); a restart
        that fails is one more."""
        budget = self.cfg.train.max_failures
        generation = self.worker_set.generation
        t0 = time.perf_counter()
        while True:
            with self.lock:
                self.failures.append(failure)
            if len(self.failures) > budget:
                self.metrics_log.append(failure.to_dict())
                if budget:
                    raise WorkerCallFailed(f"{exc} (failure {len(self.failures)}, more than "
                                           f"train.max_failures={budget})", exc.operation, exc.failures) from None
                raise exc
            self.worker_set.shutdown(timeout_s=0)  # broken groups are not closed politely: the actors are killed
            folder = latest_intact(self.checkpoints, warn=failure.notes.append)
            k = self.worker_set.plan.attention_gpus if folder is None else self._restore(folder)
            generation += 1  # past every generation the old workers used: no group name is taken twice
            try:
                # On the run's whole topology at the split it held; after an elastic restart, at
                # the configured split of the whole topology.
                same_nodes = self.cfg.cluster.num_nodes == self.full_cfg.cluster.num_nodes
                workers = self._restart(self.full_cfg.with_split(k) if same_nodes else self.full_cfg, folder,
                                        generation)
            except (WorkerCallFailed, ClusterError) as again:
                exc = again if isinstance(again, WorkerCallFailed) else WorkerCallFailed(
                    str(again), "recovery", {"cluster": str(again)})
                failure = Failure(failure.failed_step, exc.operation, exc.failures, time.time())
                continue
            break
        resumed = -1 if folder is None else checkpoint.read_meta(folder)["step"]
        redone = sum(1 for r in self.history if r.step > resumed)
        if workers.cfg.total_gpus != self.cfg.total_gpus:
            shrank = workers.cfg.total_gpus != self.full_cfg.total_gpus
            self._adopt(workers.cfg if shrank else self.full_cfg)
            if shrank:
                failure.notes.append(self._shrunk_note(workers))
        recover_s = time.perf_counter() - t0
        self.metrics_log.rewind(resumed)
        self.metrics_log.append(dict(failure.to_dict(), resumed_from=resumed, recover_s=recover_s, steps_lost=redone))
        with self.lock:  # a client sees the failure recovered only with the history it resumed from
            failure.recovered(resumed, recover_s, redone)
            self.worker_set = workers
            self.history = [r for r in self.history if r.step <= resumed]
            self.measured_from = len(self.history)
            self.window.clear()
            self.step = resumed
            self.last_checkpoint = None if folder is None else str(folder)
        return resumed + 1

    def _shrunk_note(self, workers: WorkerSet) -> str:
        return (f"going on with {workers.cfg.cluster.num_nodes} of {self.full_cfg.cluster.num_nodes} nodes at "
                f"{workers.plan.attention_gpus} attention GPUs (train.elastic)")

    def _restart(self, cfg: Config, folder: Optional[Path], generation: int) -> WorkerSet:
        """New workers from ``folder`` for ``cfg`` (the run's whole topology, at a split); with
        ``train.elastic``, when the cluster cannot hold it, on the nodes that are left
        (``elastic.shrunk``: the predictor picks the split)."""
        start = dict(dataset=self.dataset, name=self.workers_name, torch_threads=self.torch_threads,
                     checkpoint=None if folder is None else str(folder), generation=generation)
        try:
            return WorkerSet(cfg, **start)
        except ClusterError:
            full = self.full_cfg
            smaller = shrunk(full, _nodes_holding(full.cluster.gpus_per_node)) if full.train.elastic else None
            if smaller is None:
                raise
            return WorkerSet(smaller, **start)

    def _adopt(self, cfg: Config) -> None:
        """Run on ``cfg``'s topology from now on: the time model and the policy start afresh, as
        what they learnt was of another cluster."""
        with self.lock:
            self.cfg = cfg
            self.predictor = StageTimePredictor(cfg)
            self.policy = BalancingPolicy.from_config(cfg)
            self.migration_cost = MigrationCostModel(cfg)

    def _apply_requests(self, step: int) -> bool:
        """Between steps: carry out a queued rebalance; True when a stop was asked for."""
        with self.lock:
            target, self.pending_split = self.pending_split, None
            stop = self.stop_requested
            self.next_boundary = step + 1  # a request from now on waits for the next boundary
        if stop:
            return True
        if target is not None and target != self.worker_set.plan.attention_gpus:
            self._migrate(step, target, reason="requested")
        return False

    def _migrate(self, step: int, k: int, reason: str) -> None:
        before = self.worker_set.plan.attention_gpus
        measured = self.migration_cost.migrations > 0  # the defaults' guess is not a bound
        deadline_s = move_deadline_s(self.migration_cost.estimate(before, k) if measured else None,
                                     self.cfg.comm.synchronization_timeout_ms, self.cfg.control.worker_timeout_s)
        result = self.worker_set.move_to(k, timeout_s=deadline_s)
        with self.lock:
            self.measured_from = len(self.history)  # the new split's steps are measured afresh
        record = {"before_step": step, "from": before, "to": k, "reason": reason, **result}
        with self.lock:
            self.migrations.append(record)
        self.migration_cost.observe(before, k, result["pause_s"])

    def _after_step(self, step: int, metrics: StepMetrics) -> None:
        k = self.worker_set.plan.attention_gpus
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
        row = HistoryRow(step, metrics, seen, decision if taken else None)
        self.metrics_log.append(row.to_dict())
        with self.lock:
            self.history.append(row)
            self.step = step
        self.gauges.record(metrics)
        if (step + 1) % self.cfg.train.checkpoint_interval == 0:
            self._checkpoint(step)
            full = self.full_cfg.cluster
            if step + 1 < self.end_step and self.cfg.cluster.num_nodes < full.num_nodes and \
                    _nodes_holding(full.gpus_per_node) >= full.num_nodes:
                self._grow_back(step)
                return  # the decision was for the smaller cluster
        if decision.move:
            self._migrate(step + 1, decision.new_k, reason=decision.detail)

    def _grow_back(self, step: int) -> None:
        """After an elastic restart, once the cluster holds the run's whole topology again: new
        workers on all of it from the checkpoint just written, at the configured split. Recorded
        as a migration and a ``grow`` row of ``metrics.jsonl``. A restart that fails here is a
        failure like any other (``_recover``), whose restart takes what the cluster holds."""
        t0 = time.perf_counter()
        before, old = self.worker_set.plan.attention_gpus, self.worker_set
        old.shutdown()
        try:
            workers = self._restart(self.full_cfg, Path(self.last_checkpoint), old.generation + 1)
        except ClusterError as exc:  # not even the smaller cluster could be reserved again
            raise WorkerCallFailed(str(exc), "grow back", {"cluster": str(exc)}) from None
        if workers.cfg.total_gpus == self.full_cfg.total_gpus:
            self._adopt(self.full_cfg)
        record = {"before_step": step + 1, "from": before, "to": workers.plan.attention_gpus,
                  "reason": f"the cluster holds {workers.cfg.cluster.num_nodes} nodes again (train.elastic)",
                  "pause_s": time.perf_counter() - t0}
        self.metrics_log.append({"event": GROW_EVENT, "nodes": workers.cfg.cluster.num_nodes, **record})
        with self.lock:
            self.worker_set = workers
            self.migrations.append(record)
            self.measured_from = len(self.history)
            self.window.clear()

    def _checkpoint(self, step: int) -> None:
        if step < 0 or (self.last_checkpoint or "").endswith(f"step-{step:08d}"):
            return
        state_bytes = self._state_bytes()
        t0 = time.perf_counter()
        folder = checkpoint.save(self.worker_set, self.checkpoints, step,
                                 {"predictor": self.predictor.state_dict(), "policy": self.policy.state_dict(),
                                  "migration_cost": self.migration_cost.state_dict()},
                                 keep=self.cfg.train.keep_checkpoints,
                                 timeout_s=save_deadline_s(state_bytes, min(self.write_speeds),
                                                           self.cfg.control.worker_timeout_s))
        written = checkpoint.read_meta(folder)["bytes"]
        self.write_speeds = (self.write_speeds + [written / max(time.perf_counter() - t0, 1e-6)])[-RECENT_SAVES:]
        with self.lock:
            self.last_checkpoint = str(folder)

    def _state_bytes(self) -> float:
        """What the next save writes: the last checkpoint's bytes, or before one the model's
        training state (parameters and both moments, twice over for what else a worker may
        write: gradient compression's residuals)."""
        if self.last_checkpoint is not None:
            return checkpoint.read_meta(Path(self.last_checkpoint))["bytes"]
        return 2 * self.migration_cost.state_bytes()

    # -- control calls (other threads) ------------------------------------------------------

    def status(self) -> dict:
        with self.lock:
            last = self.history[-1].metrics if self.history else None
            plan = self.worker_set.plan
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
                "failures": [f.to_dict() for f in self.failures],
                "skipped_steps": sum(1 for r in self.history if r.metrics.skipped),
            }

    def rows_since(self, step: int = -1, n: Optional[int] = None) -> List[HistoryRow]:
        """History rows of steps after ``step`` (the newest ``n`` of them when given)."""
        with self.lock:
            rows = [r for r in self.history if r.step > step]
        return rows[-n:] if n else rows

    def history_since(self, step: int = -1, n: Optional[int] = None) -> List[dict]:
        """``rows_since`` as plain rows (``HistoryRow.to_dict``): what a client gets."""
        return [r.to_dict() for r in self.rows_since(step, n)]

    def failures_since(self, n: int = 0) -> List[dict]:
        """The run's failures after the first ``n`` (``faults.Failure.to_dict``), recovered from
        or not."""
        with self.lock:
            return [f.to_dict() for f in self.failures[n:]]

    def rebalance(self, attention_gpus: int) -> dict:
        """Queue a move to ``attention_gpus``; it happens before the next step to start, whose
        number the reply gives (``before_step``: the first step on the new split). Bad splits
        raise ConfigError and change nothing."""
        with self.lock:
            p = self.policy.params
            policy_range = (p.min_attention_gpus, p.max_attention_gpus)  # the live policy's, not the config's
        check_split(self.cfg, attention_gpus, key="rebalance", policy_range=policy_range)
        with self.lock:
            self.pending_split = attention_gpus
            # Read under the lock the run thread takes requests under: the step in progress, if
            # any, runs on the old split, and the move comes before the next one to start.
            return {"scheduled": attention_gpus, "before_step": self.next_boundary}

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

    def job_identity(self) -> dict:
        """Which job this is: what a client checks before it steers it."""
        return {"job_id": self.job_id, "name": self.name, "namespace": self.cfg.control.namespace,
                "out": str(self.out), "step": self.step, "state": self.state}

    def ping(self) -> float:
        return time.time()


RECENT_SAVES = 5  # saves whose write speed the next save's deadline looks back on


def _storage_only(exc: WorkerCallFailed) -> bool:
    """Whether every worker that failed could not write (``StorageError``)."""
    return bool(exc.failures) and all(exc.error_types.get(who) == StorageError.__name__ for who in exc.failures)


def _nodes_holding(gpus: int) -> int:
    """Live nodes of the cluster with at least ``gpus`` GPUs."""
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) >= gpus)


def _mean(rows: List[tuple]) -> Optional[tuple]:
    if not rows:
        return None
    return tuple(sum(col) / len(rows) for col in zip(*rows))
