"""Balancing policy: when to move GPUs between the attention and MoE pools, and to which split.

Called by the controller after every training step (or only at decision steps; both work), it
decides at steps ``step`` that are positive multiples of ``rebalancing_interval`` (``step`` =
optimizer steps completed so far), or whenever the caller passes ``force=True``:

1. ``disabled``   balancing is off: never move.
2. ``not_due``    not a decision step.
3. ``out_of_range`` the current split is outside [min, max] attention GPUs (the range was
   changed at run time): move to the in-range split with the best net gain (below), whatever
   the imbalance and margins.
4. ``settling``   fewer than ``settle_steps`` steps observed at the current split since it was
   entered (a migration, a move by hand) or since the predictor last re-levelled for a
   machine-wide shift (``predictor.settled_steps``): no decision on a model that does not yet
   describe the cluster as it is -- acting mid-shift would move on half the shift, and the rest,
   measured at the new split, would be learnt as a property of that split.
5. ``balanced``   imbalance ``|T_a - T_m| / max(T_a, T_m)`` at the current split at most
   ``imbalance_threshold``: no move. ``T_a, T_m`` are the predictor's estimate there (the
   default: measured steps, smoothed, and re-levelled at once on a shift) or what the caller
   passes as ``measured`` (then pass the mean since the last decision, not one step: a single
   noisy step pokes over the threshold now and then, and although the gain test below vetoes
   most such triggers, with ``p`` = 1 it may let the prior's guess move the cluster).
6. Otherwise every split ``k`` in [min, max] that the topology holds is scored with the
   predictor's stage times:

   * step time ``S(k) = parallel.step_time.step_time_s(T_a(k), T_m(k), predictor.pipeline)``:
     the ideal ping-pong pipeline of the job's micro-batches, layers and micro-batches in flight
     ``p``, with transfers taken as free (the predictor predicts compute stage times only; the
     rows that cross are the same whatever the split). It is the same model the benchmarks and
     the overlap figures use. At ``p`` = 1 the pools take turns, ``S = stages (T_a + T_m)``,
     and the best split minimises the sum; with ``p >= 2`` each group of ``p`` micro-batches
     takes the slower pool's ``p L`` stages plus one stage of the lighter pool (fill and drain),
     so the slower pool sets the pace and the best split balances them. Gradient sync and the
     optimizer are left out (about the same for every k);
   * gain ``G(k) = S(current) - S(k)`` seconds per step; net ``N(k) = G(k) * interval -
     migration(current, k)``: the migration pause is paid against the gain over the next
     interval (the soonest the policy could undo the move);
   * hysteresis: ``k`` is eligible only if ``N(k) > 0`` and ``G(k) / S(current)`` is at least
     ``min_gain_fraction``, raised ``return_gain_factor``-fold when ``k`` is a split the cluster
     left within the last ``return_window`` decisions. Measured imbalance above the threshold is
     necessary but not sufficient: the model must also promise a clear gain, so noise that
     pokes over the threshold around the optimum does not move anything, and a split just left
     is only re-entered on strong evidence (no A -> B -> A ping-pong).

   ``move`` to the eligible split with the largest net gain (ties: fewer GPUs moved, then fewer
   attention GPUs); ``no_gain`` when none is eligible.

The policy learns of moves by seeing ``current_k`` change between calls (its own decisions,
once applied, and moves made by hand alike), so the caller never reports them separately.

``PolicyParams`` holds the knobs ``set_policy`` exposes (threshold, interval, range, enabled) and
the hysteresis knobs, all from the config's ``balance`` section (``PolicyParams.from_config``; the
class has no defaults of its own) and checked by the config's rules (``config.check_policy``);
``updated(**changes)`` returns a checked copy (ValueError, one line). The decision kinds are the
module constants below (``DISABLED``, ``NOT_DUE``, ...); compare ``Decision.reason`` with them, not
with their spelling. Pure code; ``state_dict()`` round-trips through plain data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

from ma_ray.config import Config, check_policy
from ma_ray.parallel.step_time import imbalance as imbalance_of, step_time_s

# Decision kinds (``Decision.reason``); IDLE are those that were no decision at all.
DISABLED = "disabled"
NOT_DUE = "not_due"
OUT_OF_RANGE = "out_of_range"
SETTLING = "settling"
BALANCED = "balanced"
NO_GAIN = "no_gain"
MOVE = "move"
IDLE = (DISABLED, NOT_DUE)

MigrationCost = Union[None, float, Callable[[int, int], float]]
_MAX_MOVES_KEPT = 64


@dataclass(frozen=True)
class PolicyParams:
    """The policy's knobs; each is the ``balance`` key of the same name (``config.BalanceConfig``
    says what it does and holds its default). Build with ``from_config``."""

    enabled: bool
    imbalance_threshold: float
    rebalancing_interval: int
    min_attention_gpus: int
    max_attention_gpus: int
    min_gain_fraction: float  # predicted step-time gain a move must promise, relative
    return_window: int  # decisions during which a split just left counts as "recently left"
    return_gain_factor: float  # margin multiplier for moving back to such a split
    settle_steps: Optional[int]  # steps at a split before deciding; None = interval // 4

    def __post_init__(self):
        check_policy(dataclasses.asdict(self), prefix="")  # the config's rules (a ConfigError is a ValueError)

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> "PolicyParams":
        """The ``balance`` section of ``cfg``, with any ``overrides`` (validated like ``updated``,
        except that None is a value: ``settle_steps=None``)."""
        _check_names(overrides)
        values = {f.name: getattr(cfg.balance, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, **overrides})

    def updated(self, **changes) -> "PolicyParams":
        """A validated copy with ``changes``; None values are ignored (so ``set_policy`` can pass
        every argument through). Raises ValueError with a one-line message."""
        _check_names(changes)
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def effective_settle_steps(self) -> int:
        return self.rebalancing_interval // 4 if self.settle_steps is None else self.settle_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyParams":
        """The inverse of ``to_dict``: every parameter must be there."""
        _check_names(data)
        missing = sorted({f.name for f in dataclasses.fields(cls)} - set(data))
        if missing:
            raise ValueError(f"{missing[0]}: missing policy parameter")
        return cls(**data)


def _check_names(changes: dict) -> None:
    names = {f.name for f in dataclasses.fields(PolicyParams)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown policy parameter (known: {', '.join(sorted(names))})")


@dataclass(frozen=True)
class Candidate:
    """One split as the policy scored it."""

    attention_gpus: int
    t_attention_s: float
    t_moe_s: float
    step_s: float  # predicted seconds of a step's passes (``step_time_s``)
    gain_s: float  # predicted seconds saved per step against the current split
    migration_s: float  # predicted pause of moving there
    net_s: float  # gain_s * interval - migration_s
    required_gain: float  # relative gain it needs (margin, raised if recently left)
    eligible: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Decision:
    step: int
    current_k: int
    new_k: Optional[int]  # the split to move to; None = stay
    reason: str  # one of the module's reason codes
    detail: str  # one line for people
    imbalance: Optional[float] = None
    measured: Optional[Tuple[float, float]] = None  # (T_a, T_m) the trigger used
    candidates: Tuple[Candidate, ...] = ()

    @property
    def move(self) -> bool:
        return self.new_k is not None

    def to_dict(self) -> dict:
        return {"step": self.step, "current_k": self.current_k, "new_k": self.new_k, "reason": self.reason,
                "detail": self.detail, "imbalance": self.imbalance,
                "measured": list(self.measured) if self.measured is not None else None,
                "candidates": [c.to_dict() for c in self.candidates]}


class BalancingPolicy:
    def __init__(self, params: PolicyParams):
        self.params = params
        self.decisions = 0  # due decisions taken so far
        self.moves: List[dict] = []  # {"decision", "step", "from", "to"}, oldest first
        self._last_k: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: Config, **overrides) -> "BalancingPolicy":
        return cls(PolicyParams.from_config(cfg, **overrides))

    def update(self, **changes) -> PolicyParams:
        """Change parameters (validated; None values ignored); returns the new parameters."""
        self.params = self.params.updated(**changes)
        return self.params

    def is_due(self, step: int) -> bool:
        return step > 0 and step % self.params.rebalancing_interval == 0

    def recently_left(self) -> List[int]:
        """Splits the cluster left within the last ``return_window`` decisions."""
        window = self.params.return_window
        return sorted({m["from"] for m in self.moves if self.decisions - m["decision"] < window})

    def decide(self, step: int, current_k: int, predictor, measured: Optional[Sequence[float]] = None,
               migration_cost: MigrationCost = None, force: bool = False) -> Decision:
        """Decide at ``step`` (steps completed) on a cluster at ``current_k`` attention GPUs.

        ``predictor``: a ``StageTimePredictor`` (or anything with ``predict(k)``, ``splits()``,
        ``settled_steps(k)`` and ``pipeline``, a ``parallel.step_time.PipelineShape``) that has
        observed the steps so far. ``measured``: (T_a, T_m) at the current split for
        the imbalance trigger; None (recommended) takes the predictor's estimate, otherwise pass
        the mean over the steps since the last decision. ``migration_cost``: seconds, or
        ``f(old_k, new_k) -> seconds`` (e.g. a ``MigrationCostModel``); None = free.
        """
        self._track(step, current_k)
        p = self.params
        if not p.enabled:
            return Decision(step, current_k, None, DISABLED, "automatic balancing is off")
        if not force and not self.is_due(step):
            return Decision(step, current_k, None, NOT_DUE,
                            f"decisions every {p.rebalancing_interval} steps")
        self.decisions += 1
        in_range = p.min_attention_gpus <= current_k <= p.max_attention_gpus
        seen = predictor.settled_steps(current_k)
        if in_range and seen < p.effective_settle_steps:
            return Decision(step, current_k, None, SETTLING,
                            f"{seen} of {p.effective_settle_steps} settled steps observed at {current_k} attention GPUs")

        if measured is None:
            now = predictor.predict(current_k)
            measured = (now.t_attention_s, now.t_moe_s)
        t_a, t_m = float(measured[0]), float(measured[1])
        imbalance = imbalance_of(t_a, t_m)
        candidates = self._score(current_k, predictor, migration_cost)
        in_policy = [c for c in candidates if c.attention_gpus != current_k]

        if not in_range:
            reachable = [c for c in in_policy if p.min_attention_gpus <= c.attention_gpus <= p.max_attention_gpus]
            if not reachable:
                return Decision(step, current_k, None, NO_GAIN,
                                f"no split in [{p.min_attention_gpus}, {p.max_attention_gpus}] fits the cluster",
                                imbalance, (t_a, t_m), candidates)
            best = max(reachable, key=lambda c: self._rank(c, current_k))
            return Decision(step, current_k, best.attention_gpus, OUT_OF_RANGE,
                            f"{current_k} attention GPUs is outside [{p.min_attention_gpus}, "
                            f"{p.max_attention_gpus}]; {best.attention_gpus} has the best net gain",
                            imbalance, (t_a, t_m), candidates)
        if imbalance <= p.imbalance_threshold:
            return Decision(step, current_k, None, BALANCED,
                            f"imbalance {imbalance:.1%} within {p.imbalance_threshold:.1%}",
                            imbalance, (t_a, t_m), candidates)
        eligible = [c for c in in_policy if c.eligible]
        if not eligible:
            best = max(in_policy, key=lambda c: self._rank(c, current_k), default=None)
            why = ("no other split in range" if best is None else
                   f"best {best.attention_gpus}: gain {_rel(best, candidates, current_k):.1%}/step "
                   f"(needs {best.required_gain:.1%}), net {best.net_s:.3g} s over the interval")
            return Decision(step, current_k, None, NO_GAIN,
                            f"imbalance {imbalance:.1%} but no split gains enough: {why}",
                            imbalance, (t_a, t_m), candidates)
        best = max(eligible, key=lambda c: self._rank(c, current_k))
        return Decision(step, current_k, best.attention_gpus, MOVE,
                        f"imbalance {imbalance:.1%}: {current_k} -> {best.attention_gpus} attention GPUs "
                        f"saves {best.gain_s:.3g} s/step ({_rel(best, candidates, current_k):.1%}), "
                        f"net {best.net_s:.3g} s over {p.rebalancing_interval} steps "
                        f"after a {best.migration_s:.3g} s migration",
                        imbalance, (t_a, t_m), candidates)

    # -- internals ----------------------------------------------------------------------------

    def _track(self, step: int, current_k: int) -> None:
        if self._last_k is not None and current_k != self._last_k:
            self.moves.append({"decision": self.decisions, "step": step, "from": self._last_k, "to": current_k})
            del self.moves[:-_MAX_MOVES_KEPT]
        self._last_k = current_k

    def _score(self, current_k: int, predictor, migration_cost: MigrationCost) -> Tuple[Candidate, ...]:
        p = self.params
        shape = predictor.pipeline
        splits = [k for k in predictor.splits()
                  if p.min_attention_gpus <= k <= p.max_attention_gpus or k == current_k]
        if current_k not in splits:
            splits.append(current_k)
        left = set(self.recently_left())
        predictions = {k: predictor.predict(k) for k in splits}
        now = predictions[current_k]
        s_now = step_time_s(now.t_attention_s, now.t_moe_s, shape)
        out = []
        for k in sorted(splits):
            pr = predictions[k]
            s_k = step_time_s(pr.t_attention_s, pr.t_moe_s, shape)
            gain = s_now - s_k
            cost = 0.0 if k == current_k else _cost(migration_cost, current_k, k)
            net = gain * p.rebalancing_interval - cost
            required = p.min_gain_fraction * (p.return_gain_factor if k in left else 1.0)
            eligible = k != current_k and net > 0 and gain >= required * s_now and gain > 0
            out.append(Candidate(k, pr.t_attention_s, pr.t_moe_s, s_k, gain, cost, net, required, eligible))
        return tuple(out)

    @staticmethod
    def _rank(c: Candidate, current_k: int):
        return (c.net_s, -abs(c.attention_gpus - current_k), -c.attention_gpus)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"params": self.params.to_dict(), "decisions": self.decisions,
                "moves": [dict(m) for m in self.moves], "last_k": self._last_k}

    def load_state_dict(self, state: dict) -> None:
        self.params = PolicyParams.from_dict(state["params"])
        self.decisions = int(state["decisions"])
        self.moves = [dict(m) for m in state["moves"]]
        self._last_k = state["last_k"]


def _cost(migration_cost: MigrationCost, old_k: int, new_k: int) -> float:
    if migration_cost is None:
        return 0.0
    if callable(migration_cost):
        return float(migration_cost(old_k, new_k))
    return float(migration_cost)


def _rel(c: Candidate, candidates: Sequence[Candidate], current_k: int) -> float:
    now = next(x for x in candidates if x.attention_gpus == current_k)
    return c.gain_s / now.step_s if now.step_s > 0 else 0.0
