"""Faults as the controller sees them: how long a step may take before it counts as stalled, the
record of a failure the run recovered from (or ended with), and the error of a non-finite step
that ends a run. Pure code: no Ray, no torch.

A stalled worker never answers, and on GPUs nothing else bounds it (NCCL ops have no timeout), so
the controller's wait on a step is the watchdog. Its deadline is the step's expected time,
``DEADLINE_FACTOR`` times the larger of the predictor's step time (``parallel.step_time``) and the
slowest step measured recently at this split, plus ``comm.synchronization_timeout_ms``, the time a
worker's peers wait before they fail on their own. A step that nothing has been measured for yet
(the first one after a set-up, a recovery or a move, which builds the groups and warms up) gets
``control.worker_timeout_s``. When the deadline passes before any worker has failed, the wait goes
on for ``comm.synchronization_timeout_ms`` + 1 s (``WorkerGroup``'s settle time) for the stalled
worker's peers to fail by themselves and name it. Measured steps count as well as the prediction
because the predictor models compute stages only: on a tiny model, Ray's and the collectives'
overheads are most of a step.

Calls other than a step are bounded the same way, by what they do: a checkpoint save by its bytes
over the slowest write speed measured on the run's disk (``save_deadline_s``), a move by its
migration's predicted pause once one has been measured (``move_deadline_s``), each with
``DEADLINE_FACTOR`` of headroom and ``CALL_OVERHEAD_S`` for the call itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from ma_ray.errors import MaRayError

DEADLINE_FACTOR = 3.0  # headroom over the expected step for the noise of a shared machine
RECENT_STEPS = 5  # measured steps the expectation looks back on
CALL_OVERHEAD_S = 5.0  # a call's own cost on a loaded host (scheduling, pickling), whatever it moves

FAILURE_EVENT = "failure"


class NonFiniteStep(MaRayError, RuntimeError):
    """A step's loss or gradient norm was not finite and ``train.on_nonfinite`` is ``stop``."""


def step_deadline_s(predicted_s: float, recent_wall_s: Sequence[float], synchronization_timeout_ms: float,
                    first_step_timeout_s: float) -> float:
    """Seconds a step may take: see the module docstring. ``recent_wall_s``: the wall times of
    the steps measured at this split since the workers were last set up."""
    if not recent_wall_s:
        return first_step_timeout_s
    predicted_s = predicted_s if math.isfinite(predicted_s) and predicted_s > 0 else 0.0
    expected = max(predicted_s, max(recent_wall_s[-RECENT_STEPS:]))
    return min(first_step_timeout_s, DEADLINE_FACTOR * expected + synchronization_timeout_ms / 1000)


def save_deadline_s(state_bytes: float, write_bytes_per_s: float, first_call_timeout_s: float) -> float:
    """Seconds a checkpoint save of ``state_bytes`` may take on a disk measured at
    ``write_bytes_per_s`` (never more than ``control.worker_timeout_s``)."""
    if not (write_bytes_per_s > 0 and math.isfinite(write_bytes_per_s)):
        return first_call_timeout_s
    return min(first_call_timeout_s, DEADLINE_FACTOR * state_bytes / write_bytes_per_s + CALL_OVERHEAD_S)


def move_deadline_s(predicted_pause_s: Optional[float], synchronization_timeout_ms: float,
                    first_call_timeout_s: float) -> float:
    """Seconds a move may take: ``DEADLINE_FACTOR`` times its predicted pause, calibrated by a
    measured move (None before one: ``control.worker_timeout_s``, as for an unmeasured step), plus
    the time its peers wait before they fail on their own."""
    if predicted_pause_s is None or not math.isfinite(predicted_pause_s):
        return first_call_timeout_s
    return min(first_call_timeout_s, DEADLINE_FACTOR * predicted_pause_s + CALL_OVERHEAD_S
               + synchronization_timeout_ms / 1000)


def skipped_in_a_row(skipped: Sequence[bool]) -> int:
    """How many of the last steps in ``skipped`` (one flag per step, in order) were skipped."""
    n = 0
    for flag in reversed(skipped):
        if not flag:
            break
        n += 1
    return n


@dataclass
class Failure:
    """One failure of a run: at which step, in which operation, on which workers (name -> first
    error line; ``{"controller": ...}`` when the controller died), and what recovering cost.
    ``detected_at`` is wall-clock (``time.time()``) seconds, so a test or an operator that knows
    when the fault happened gets the time to detect (``step_started_at``: when the failed step
    began, ``deadline_s``: how long it was allowed); ``recover_s`` runs from the detection to
    the restarted workers being ready; ``steps_lost`` are the finished steps done again (those
    after the checkpoint resumed from). ``resumed_from`` is that checkpoint's step (-1: none,
    the run started over), None while it has not recovered (or did not)."""

    failed_step: int
    operation: str
    workers: Dict[str, str]
    detected_at: float
    step_started_at: Optional[float] = None  # when the failed call began (a step, a save, a move)
    deadline_s: Optional[float] = None  # the bound the failed call had
    notes: List[str] = field(default_factory=list)  # damaged checkpoints passed over on the way back
    recover_s: Optional[float] = None
    resumed_from: Optional[int] = None
    steps_lost: Optional[int] = None
    event: str = field(default=FAILURE_EVENT)

    def recovered(self, resumed_from: int, recover_s: float, steps_lost: int) -> "Failure":
        """Record the recovery: from the checkpoint of ``resumed_from``, ``steps_lost`` finished
        steps (counted by their rows: a step whose save failed had finished) to do again."""
        self.resumed_from, self.recover_s, self.steps_lost = resumed_from, recover_s, steps_lost
        return self

    def line(self) -> str:
        """The failure's one line on a terminal."""
        who = "; ".join(f"{w}: {why}" for w, why in self.workers.items())
        text = f"failure at step {self.failed_step}: {self.operation} failed on {who}"
        if self.resumed_from is not None:
            start = "the start" if self.resumed_from < 0 else f"the checkpoint of step {self.resumed_from}"
            text += (f"; recovered from {start} in {self.recover_s:.1f} s, "
                     f"{self.steps_lost} finished step(s) redone")
        text += "".join(f" ({note})" for note in self.notes)
        return text

    def to_dict(self) -> dict:
        return asdict(self)
