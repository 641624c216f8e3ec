"""The one call path from the driver (or the controller) to the worker actors.

A worker method declares once how a call to the whole group is spread and gathered
(``@dispatch(ONE_TO_ALL)`` or ``@dispatch(PER_SLOT)``, as veRL's single controller does with
``register(dispatch_mode=...)``); ``WorkerGroup`` binds every declared method to a group-level
call of the same name. Every call waits for all workers within one deadline, and when some fail
(or do not answer in time) raises one ``WorkerCallFailed`` that names each failed worker, its role
and its first error line. The workers that failed first usually caused the others' failures (a
dead worker's peers report which transfer with it broke), so all are listed.

Dispatch modes:

* ``ONE_TO_ALL``: the same arguments to every worker; gathers ``{slot: result}``;
* ``PER_SLOT``: ``call(args_of)`` with ``args_of(slot) -> (args, kwargs)``; gathers ``{slot: result}``.

A method declared with ``blocking=False`` and ``num_returns`` returns ``{slot: [ObjectRef, ...]}``
at once, for results that travel from worker to worker without the driver (migration): the
bounded wait is the one of the call that consumes them.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ma_ray.errors import MaRayError, first_line

ONE_TO_ALL = "one_to_all"
PER_SLOT = "per_slot"
_ATTR = "_ma_ray_dispatch"


class WorkerCallFailed(MaRayError, RuntimeError):
    """A group call failed on some workers; the message names each and its first error line.
    ``operation`` is the call's label and ``failures`` maps each failed worker (as ``describe``
    names it) to its first error line, for the failure's record; ``error_types`` maps those that
    raised to their exception's type name (a stalled worker raised nothing); ``started_at`` (wall
    clock) and ``timeout_s`` are the call's start and bound, when it was a group call."""

    def __init__(self, message: str, operation: str = "", failures: Optional[Dict[str, str]] = None,
                 started_at: Optional[float] = None, timeout_s: Optional[float] = None,
                 error_types: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.operation = operation
        self.failures = dict(failures or {})
        self.error_types = dict(error_types or {})
        self.started_at, self.timeout_s = started_at, timeout_s


def dispatch(mode: str, label: str, blocking: bool = True, num_returns: Optional[Callable[..., int]] = None):
    """Declare how a group call of the decorated worker method is spread and gathered; ``label``
    names the operation in errors. ``num_returns(*args, **kwargs)``: return values per worker,
    for ``blocking=False`` calls."""
    if mode not in (ONE_TO_ALL, PER_SLOT):
        raise ValueError(f"unknown dispatch mode {mode!r}")

    def mark(fn):
        setattr(fn, _ATTR, (mode, label, blocking, num_returns))
        return fn
    return mark


def worker_error(exc: BaseException) -> BaseException:
    """What went wrong on a worker: the cause under Ray's wrapper."""
    return exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc


class WorkerGroup:
    """One actor of ``worker_cls`` per slot, pinned to its placement-group bundle, and a method
    per declared worker method. ``describe(slot)`` names a slot's worker in errors."""

    def __init__(self, worker_cls: type, pg, slots: Sequence[Tuple[int, int]], timeout_s: float, grace_s: float,
                 describe: Callable[[Tuple[int, int]], str], actor_args: tuple = (), settle_s: float = 0.0):
        """``timeout_s``: the deadline of a call; ``grace_s``: how much longer the others get
        once one worker has failed (its peers' collectives with it time out within that);
        ``settle_s``: how much longer a call whose deadline passed with no worker failed yet
        waits for the first failure, so that a stalled worker's peers, whose own timeouts fire
        within it, say which one they waited for."""
        self.slots = list(slots)
        self.timeout_s, self.grace_s, self.settle_s = timeout_s, grace_s, settle_s
        self.describe = describe
        remote_cls = ray.remote(worker_cls)
        self.actors = {
            slot: remote_cls.options(
                num_gpus=1, num_cpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=slot[0]),
            ).remote(*actor_args)
            for slot in self.slots
        }
        for name, fn in inspect.getmembers(worker_cls, inspect.isfunction):
            if hasattr(fn, _ATTR):
                setattr(self, name, self._bind(name, *getattr(fn, _ATTR)))

    def _bind(self, name: str, mode: str, label: str, blocking: bool, num_returns):
        def call(*args, timeout_s: Optional[float] = None, **kwargs):
            if mode == ONE_TO_ALL:
                spread = {slot: (args, kwargs) for slot in self.slots}
            else:
                (args_of,) = args
                spread = {slot: args_of(slot) for slot in self.slots}
            refs = {}
            for slot, (a, kw) in spread.items():
                method = getattr(self.actors[slot], name)
                if num_returns is not None:
                    method = method.options(num_returns=num_returns(*a, **kw))
                refs[slot] = method.remote(*a, **kw)
            if not blocking:
                return {slot: list(ref) if isinstance(ref, (list, tuple)) else [ref] for slot, ref in refs.items()}
            return self.gather(refs, label, self.timeout_s if timeout_s is None else timeout_s)
        call.__name__ = name
        return call

    def gather(self, refs: Dict[Tuple[int, int], "ray.ObjectRef"], what: str, timeout_s: float) -> dict:
        """Every slot's result within ``timeout_s``; otherwise one ``WorkerCallFailed`` naming
        the workers that failed or did not answer."""
        started, started_at = time.monotonic(), time.time()
        deadline = started + timeout_s
        slot_of = {ref: slot for slot, ref in refs.items()}
        pending: List = list(refs.values())
        results, failures, error_types = {}, {}, {}
        settled = False
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if failures or settled or not self.settle_s:
                    break
                settled, deadline = True, deadline + self.settle_s
                continue
            slot = slot_of[ready[0]]
            try:
                results[slot] = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                failures[slot] = first_line(worker_error(exc))
                error_types[slot] = type(worker_error(exc)).__name__
                deadline = min(deadline, time.monotonic() + self.grace_s)
        for ref in pending:
            failures[slot_of[ref]] = f"no answer within {time.monotonic() - started:.0f} s (a stall)"
            # A call still queued behind a stuck one never runs; one already running on a stalled
            # worker cannot be interrupted (sync actors): the caller kills the group.
            ray.cancel(ref)
        if failures:
            named = {self.describe(slot): why for slot, why in sorted(failures.items())}
            listed = "; ".join(f"{who}: {why}" for who, why in named.items())
            raise WorkerCallFailed(f"{what} failed on {len(failures)} of {len(refs)} workers: {listed}", what, named,
                                   started_at, timeout_s, {self.describe(slot): t for slot, t in error_types.items()})
        return results

    def kill(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
