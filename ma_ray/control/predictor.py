"""Stage-time predictor: each pool's seconds per (micro-batch, layer) stage at any split ``k``,
learned online from measured step timings, starting from the methodology's model.

Model, per pool (attention, MoE)::

    T_pool(k) = level * scale * (w . x_pool(k))

* ``x_pool(k)``: features of the busiest GPU's work at split ``k`` (``parallel.workload``),
  normalised to 1 at the reference split (``cluster.attention_gpus``);
* ``w``: dimensionless coefficients (each term's share of the reference stage time), a Bayesian
  linear regression (``control.regression``) with prior mean = the methodology's formula split into the
  work terms and prior covariance ``(a w0)(a w0)^T + diag(b_j^2)``. The rank-one part (``a`` =
  ``prior_scale_std``) lets the whole prior scale up or down together; the diagonal part
  (``b_j`` = ``prior_term_std``, or ``prior_extra_std`` for the zero-mean ``bytes``/``sources``
  terms) lets the data reshape it. So while only one split has been seen, a surprise is mostly
  absorbed by scaling every term alike -- the prior's per-GPU-work structure (heads ~ ceil(H/k),
  tokens ~ T/k, rows ~ experts per MoE GPU) carries the extrapolation and the intercept takes
  only its share, not everything; measurements at two or three splits then refit the shares.
  The regression remembers the last ``memory_steps`` steps *of each split*: what was measured at
  a split stays until that split is measured again (see ``control.regression`` for why plain
  exponential forgetting would make the policy re-try splits it had found worse);
* ``scale``: seconds. Before any measurement it is the methodology's prediction at the reference split,
  so the predictor reproduces the methodology there exactly. The methodology's absolute numbers describe the
  paper's hardware and model, not this job's (on the emulated CPU cluster they are off by orders
  of magnitude), so the first measurement of each pool *calibrates* the scale (empirical Bayes:
  ``scale = measured / (w0 . x)``), keeping the prior's shape; everything after is ordinary
  Bayesian updating in units of that scale (noise ``noise_rel`` of the stage time);
* ``level``: a fast multiplicative correction, the exponential average in log space (memory
  ``level_memory_steps``, each step's ratio clipped to [1/2, 2]) of measured over
  regression-predicted time: it follows a drift within a few steps, while the regression
  (memory ``memory_steps``) would take a hundred, and goes back to 1 as the regression learns.

Machine-wide shifts. At a split the model has already learnt (observed for
``3 * level_memory_steps`` consecutive steps), the regression learns each step ``SHIFT_WINDOW``
(5) steps late. If the median of those 5 steps' log(measured / predicted) is further from 0 than
``max(log(1 + shift_threshold), 3 sigma)`` -- sigma the step-to-step noise, estimated from
successive differences so that the shift itself does not inflate it -- the time changed while
the split did not: the machine or the load changed (a slower kernel, a throttled GPU, another job
on the node). The predictor then re-levels the whole model, every split it remembers and the
prior alike (``scale`` is multiplied by the shift), measures the shift over the next steps (the
median of up to ``SHIFT_MEASURE`` = 30 steps, during which the regression does not learn at this
split), and resumes. A shift seen at one split is so taken as common to all until the other
splits are measured again, instead of being learnt as a property of the split it happened at
(which would make the policy believe the splits it left were still as fast as before).
``settled_steps(k)`` counts the steps since the last such re-levelling; the policy waits for it.
Right after a change of split, by contrast, a deviation is an extrapolation error at the new
split and the regression learns it at once. A single outlier step moves neither the level (by
more than a few percent) nor the scale (it is one step of five).

Error on steps it did not fit (prequential): ``observe`` first predicts the step from the state
before it, records the relative error, then fits. ``error_report()`` gives, per pool, the mean
and recent absolute relative error, the error on the first step after every change of split
(pure extrapolation: no step at that split fitted since the change) and the methodology's error on the
very first step (kept apart: it measures the methodology's hardware mismatch, not the learner).

Expert load (optional): pass ``expert_load`` (anything proportional to the tokens routed to each
expert) with a step; its exponential average (memory ``level_memory_steps``) feeds the MoE
``rows`` feature, so the model sees which MoE GPU the hot experts land on under every split.
Without it the router is taken as uniform.

Pure code (numpy); ``state_dict()`` / ``load_state_dict()`` round-trip through plain data (JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ma_ray.config import Config
from ma_ray.control.regression import KeyedBayesLinear
from ma_ray.errors import is_int
from ma_ray.parallel.step_time import PipelineShape, imbalance
from ma_ray.parallel.workload import ATTENTION_TERMS, MOE_TERMS, Workload

if TYPE_CHECKING:
    from ma_ray.runtime.step_metrics import StepMetrics

STATE_VERSION = 1
_EXTRA_TERMS = {"bytes", "sources"}  # zero prior mean: learned only if the data need them
_RECENT_ERROR_STEPS = 20.0
_LEVEL_CLIP = math.log(2.0)
SHIFT_WINDOW = 5  # steps whose median decides a machine-wide shift
SHIFT_MEASURE = 30  # steps whose median measures it, once detected
_NOISE_ALPHA = 1.0 / 50.0  # memory of the noise estimate


@dataclass(frozen=True)
class StagePrediction:
    """Predicted seconds per (micro-batch, layer) stage of each pool at ``attention_gpus``."""

    attention_gpus: int
    t_attention_s: float
    t_moe_s: float
    std_attention_s: float  # predictive standard deviation of one step's measurement
    std_moe_s: float

    @property
    def imbalance(self) -> float:
        return imbalance(self.t_attention_s, self.t_moe_s)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PredictionError:
    """One step's prediction, made before the step was fitted, against its measurement."""

    step: Optional[int]
    attention_gpus: int
    predicted_attention_s: float
    predicted_moe_s: float
    measured_attention_s: float
    measured_moe_s: float
    new_split: bool  # first step at this split since the split changed: nothing here was fitted
    uncalibrated: bool  # predicted by the methodology's model before any measurement (the first step)
    fitted: bool  # whether the step was then fitted

    @property
    def rel_error_attention(self) -> float:
        """Signed: (predicted - measured) / measured."""
        return (self.predicted_attention_s - self.measured_attention_s) / self.measured_attention_s

    @property
    def rel_error_moe(self) -> float:
        return (self.predicted_moe_s - self.measured_moe_s) / self.measured_moe_s

    def to_dict(self) -> dict:
        return {**self.__dict__, "rel_error_attention": self.rel_error_attention,
                "rel_error_moe": self.rel_error_moe}


class _ErrorStats:
    def __init__(self):
        self.steps = 0
        self.sum_abs = 0.0
        self.recent_abs: Optional[float] = None
        self.new_split_steps = 0
        self.new_split_sum_abs = 0.0
        self.uncalibrated_rel_error: Optional[float] = None
        self.last_rel_error: Optional[float] = None

    def add(self, rel: float, new_split: bool, uncalibrated: bool) -> None:
        if uncalibrated:
            self.uncalibrated_rel_error = rel
            return
        a = abs(rel)
        self.steps += 1
        self.sum_abs += a
        alpha = 1.0 / _RECENT_ERROR_STEPS
        self.recent_abs = a if self.recent_abs is None else self.recent_abs + alpha * (a - self.recent_abs)
        self.last_rel_error = rel
        if new_split:
            self.new_split_steps += 1
            self.new_split_sum_abs += a

    def report(self) -> dict:
        return {"steps": self.steps,
                "mean_abs_rel_error": self.sum_abs / self.steps if self.steps else None,
                "recent_abs_rel_error": self.recent_abs,
                "new_split_steps": self.new_split_steps,
                "new_split_mean_abs_rel_error": (self.new_split_sum_abs / self.new_split_steps
                                                 if self.new_split_steps else None),
                "seed_rel_error": self.uncalibrated_rel_error,
                "last_rel_error": self.last_rel_error}

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        for key in self.__dict__:
            setattr(self, key, state[key])


class _Pool:
    """One pool's model: calibrated scale, regression over its features, fast level, errors."""

    def __init__(self, name: str, terms: Sequence[str], prior_seconds: Sequence[float],
                 fallback_shares: Sequence[float], settings: "PredictorSettings"):
        self.name, self.terms = name, tuple(terms)
        total = float(sum(prior_seconds))
        if total > 0 and all(math.isfinite(v) for v in prior_seconds):
            self.prior_scale, shares = total, [v / total for v in prior_seconds]
        else:  # the configured coefficients predict nothing usable: physics shares, 1 ms
            self.prior_scale, shares = 1e-3, list(fallback_shares)
        self.prior_shares = tuple(shares)
        w0 = np.asarray(shares, dtype=np.float64)
        b = np.array([settings.prior_extra_std if t in _EXTRA_TERMS else settings.prior_term_std for t in terms])
        cov0 = settings.prior_scale_std ** 2 * np.outer(w0, w0) + np.diag(b ** 2)
        self.regression = KeyedBayesLinear(w0, cov0, settings.noise_rel ** 2, settings.memory_steps)
        self.scale = self.prior_scale
        self.calibrated = False
        self.level = 1.0
        self.level_alpha = 1.0 / settings.level_memory_steps
        self.shift_threshold = settings.shift_threshold
        self.shifts = 0
        self.pending: List[Tuple[int, List[float], float]] = []  # steps not yet learnt (settled split)
        self.shift_base: Optional[float] = None  # scale before the shift being measured
        self.noise_var = settings.noise_rel ** 2  # step-to-step variance of log(measured/predicted)
        self.last_log_ratio: Optional[float] = None
        self.errors = _ErrorStats()

    def slow(self, x: Sequence[float]) -> Tuple[float, float]:
        """Regression's mean and predictive std in seconds (no level)."""
        mean, var = self.regression.predict(x)
        return self.scale * mean, self.scale * math.sqrt(max(var, 0.0))

    def predict(self, x: Sequence[float]) -> Tuple[float, float]:
        mean, std = self.slow(x)
        return self.level * mean, self.level * std

    def fit(self, k: int, x: Sequence[float], y: float, settled: bool) -> bool:
        """Learn from one step; returns whether the model is being re-levelled for a
        machine-wide shift (detected now, or still being measured).

        At a settled split the regression learns each step ``SHIFT_WINDOW`` steps late: the
        window is first tested for a shift, so that a shift goes into the scale before any of its
        steps can be learnt as a property of this split. Once a shift is detected, the next
        steps at this split (up to ``SHIFT_MEASURE`` in all) only measure it: the scale is the
        median over all of them, and the regression resumes when the measurement ends."""
        if not self.calibrated:
            base = float(np.dot(self.prior_shares, x))
            if base > 0:
                self.scale = y / base
            self.calibrated = True
        self._update_level(x, y)
        if not settled:
            self._end_shift()
            self._learn(k, x, y)
            return False
        self.pending.append((k, list(x), y))
        if self.shift_base is not None:  # measuring a detected shift
            self.scale = self.shift_base * math.exp(self._median_log_ratio(self.shift_base))
            self.level = 1.0
            if len(self.pending) >= SHIFT_MEASURE:
                self._end_shift()
            return True
        if len(self.pending) >= SHIFT_WINDOW:
            median = self._median_log_ratio(self.scale)
            if abs(median) > self.shift_tolerance():
                # Most of the window moved the same way, well beyond the noise, at a split the
                # model had already learnt: the machine changed, not the split. Re-level the
                # whole model (every remembered split and the prior alike) by the shift.
                self.shift_base = self.scale
                self.scale *= math.exp(median)
                self.level = 1.0
                self.shifts += 1
                return True
        while len(self.pending) >= SHIFT_WINDOW:
            self._learn(*self.pending.pop(0))
        return False

    def _median_log_ratio(self, scale: float) -> float:
        logs = sorted(math.log(yi / max(scale * self.regression.predict(xi)[0], 1e-300))
                      for _, xi, yi in self.pending)
        n = len(logs)
        return logs[n // 2] if n % 2 else 0.5 * (logs[n // 2 - 1] + logs[n // 2])

    def _end_shift(self) -> None:
        self.shift_base = None
        while self.pending:
            self._learn(*self.pending.pop(0))

    def shift_tolerance(self) -> float:
        """How far (log ratio) the median of a window must move to count as a shift: the
        configured threshold, or three times the step-to-step noise if that is larger."""
        return max(math.log1p(self.shift_threshold), 3.0 * math.sqrt(self.noise_var))

    def _update_level(self, x: Sequence[float], y: float) -> None:
        before, _ = self.slow(x)
        if before <= 1e-12 * self.scale:
            return
        ratio = math.log(y / before)
        # Noise from successive differences of the log ratio: a level shift adds one large
        # difference (clipped to 4 sigma), not a lasting offset, so a shift does not raise the
        # tolerance that is meant to detect it.
        if self.last_log_ratio is not None:
            half_sq = 0.5 * (ratio - self.last_log_ratio) ** 2
            half_sq = min(half_sq, 16.0 * self.noise_var)
            self.noise_var += _NOISE_ALPHA * (half_sq - self.noise_var)
        self.last_log_ratio = ratio
        # Exponential average in log space, each step's ratio clipped to [1/2, 2]: one
        # outlier step (a GC pause, a straggler) moves the level by a few percent at most.
        step = min(max(ratio, -_LEVEL_CLIP), _LEVEL_CLIP)
        log_level = math.log(self.level)
        self.level = math.exp(log_level + self.level_alpha * (step - log_level))

    def _learn(self, k: int, x: Sequence[float], y: float) -> None:
        self.regression.update(k, x, y / self.scale)

    def coefficients(self) -> dict:
        mean = self.regression.mean
        return {"terms_s": {t: float(self.scale * w) for t, w in zip(self.terms, mean)},
                "prior_terms_s": {t: float(self.prior_scale * w) for t, w in zip(self.terms, self.prior_shares)},
                "scale_s": self.scale, "level": self.level, "calibrated": self.calibrated,
                "shifts": self.shifts}

    def state_dict(self) -> dict:
        return {"scale": self.scale, "calibrated": self.calibrated, "level": self.level, "shifts": self.shifts,
                "pending": [[k, list(x), y] for k, x, y in self.pending], "shift_base": self.shift_base,
                "noise_var": self.noise_var, "last_log_ratio": self.last_log_ratio,
                "regression": self.regression.state_dict(), "errors": self.errors.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.calibrated = bool(state["calibrated"])
        self.level = float(state["level"])
        self.shifts = int(state["shifts"])
        self.pending = [(int(k), [float(v) for v in x], float(y)) for k, x, y in state["pending"]]
        self.shift_base = None if state["shift_base"] is None else float(state["shift_base"])
        self.noise_var = float(state["noise_var"])
        self.last_log_ratio = None if state["last_log_ratio"] is None else float(state["last_log_ratio"])
        self.regression.load_state_dict(state["regression"])
        self.errors.load_state_dict(state["errors"])


@dataclass(frozen=True)
class PredictorSettings:
    memory_steps: float = 100.0  # steps the regression remembers at each split
    level_memory_steps: float = 10.0  # fast level correction and expert-load average
    noise_rel: float = 0.05  # assumed step-to-step noise, relative to the stage time
    prior_scale_std: float = 1.0  # relative std of the prior's common scale (rank-one part)
    prior_term_std: float = 0.3  # std of each physical term, in units of the reference stage time
    prior_extra_std: float = 0.1  # std of the zero-mean terms (bytes, sources)
    shift_threshold: float = 0.1  # smallest change at a learnt split taken as machine-wide (relative)
    warmup_steps: int = 1  # first steps of the job and after every change of split: scored, not fitted

    def __post_init__(self):
        for name in ("memory_steps", "level_memory_steps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1):
                raise ValueError(f"{name}: must be a number >= 1, got {value!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be an integer >= 0, got {self.warmup_steps!r}")
        for name in ("noise_rel", "prior_scale_std", "prior_term_std", "prior_extra_std", "shift_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number, got {value!r}")


class StageTimePredictor:
    """Predicts both pools' stage times at any split and learns from every step's timings.

    Call ``observe`` once per training step (the seconds per stage ``summarize`` reports), then
    ``predict(k)`` for any feasible split ``k``.
    """

    def __init__(self, cfg: Config, settings: Optional[PredictorSettings] = None, *,
                 reference_k: Optional[int] = None, **overrides):
        if settings is None:
            settings = PredictorSettings(**overrides)
        elif overrides:
            raise TypeError("pass either settings or keyword overrides, not both")
        self.cfg = cfg
        self.pipeline = PipelineShape.from_config(cfg)  # what the policy's step-time model needs
        self._build(settings, reference_k)

    def _build(self, settings: PredictorSettings, reference_k: Optional[int]) -> None:
        self.settings = settings
        self.workload = Workload(self.cfg, reference_k)
        attention_prior, moe_prior = self.workload.methodology_prior()
        head_share, token_share = self.workload.work_shares()
        self.pools = {
            "attention": _Pool("attention", ATTENTION_TERMS, attention_prior,
                               (0.05, 0.95 * head_share, 0.95 * token_share, 0.0), settings),
            "moe": _Pool("moe", MOE_TERMS, moe_prior, (0.05, 0.05, 0.9, 0.0), settings),
        }
        self._load: Optional[Tuple[float, ...]] = None
        self._load_alpha = 1.0 / settings.level_memory_steps
        self._settled_steps = math.ceil(3 * settings.level_memory_steps)
        self._last_k: Optional[int] = None
        self._run_length = 0
        self._last_shift = 0  # observation count at the latest re-levelling
        self.observations = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def reference_split(self) -> int:
        return self.workload.reference_k

    @property
    def current_split(self) -> Optional[int]:
        """The split of the latest observed step (None before any)."""
        return self._last_k

    @property
    def expert_load(self) -> Optional[Tuple[float, ...]]:
        """The averaged share of routed tokens per expert (None: taken as uniform)."""
        return self._load

    def splits(self) -> List[int]:
        """Every split the topology and model can hold (the policy range is the policy's)."""
        return self.workload.splits()

    def steps_at_split(self, k: int) -> int:
        """Consecutive observed steps at ``k`` up to the latest one (0 unless the latest was at k)."""
        return self._run_length if self._last_k == k else 0

    def settled_steps(self, k: int) -> int:
        """Consecutive steps at ``k`` since the latest machine-wide re-levelling (see the module
        docstring): how long the model has described the cluster as it now is. A policy should
        not act on a model that is still absorbing a shift: the rest of the shift, measured at
        the split it moved to, would be learnt as a property of that split."""
        return min(self.steps_at_split(k), self.observations - self._last_shift)

    def predict(self, k: int, expert_load: Optional[Sequence[float]] = None) -> StagePrediction:
        """Predicted stage times at ``k`` attention GPUs (``expert_load`` overrides the average)."""
        x_a, x_m = self.workload.features(k, self._load if expert_load is None else expert_load)
        t_a, s_a = self.pools["attention"].predict(x_a)
        t_m, s_m = self.pools["moe"].predict(x_m)
        return StagePrediction(k, t_a, t_m, s_a, s_m)

    def predict_all(self, splits: Optional[Sequence[int]] = None) -> Dict[int, StagePrediction]:
        return {k: self.predict(k) for k in (self.splits() if splits is None else splits)}

    def error_report(self) -> dict:
        """Prequential error: every step is predicted before it is fitted (see module docstring)."""
        return {"observations": self.observations,
                **{name: pool.errors.report() for name, pool in self.pools.items()}}

    def coefficients(self) -> dict:
        """Per pool: seconds each term takes at the reference split (fitted and prior), scale, level."""
        return {name: pool.coefficients() for name, pool in self.pools.items()}

    # -- learning -----------------------------------------------------------------------------

    def observe(self, attention_gpus: int, t_attention_s: float, t_moe_s: float, *,
                expert_load: Optional[Sequence[float]] = None, step: Optional[int] = None,
                fit: bool = True) -> PredictionError:
        """Record one step measured at ``attention_gpus``: predict it from the state before it,
        then update. Not fitted (only scored): the first ``settings.warmup_steps`` steps of the
        job and after every change of split (allocator growth, library handles, the rebuilt
        workers' first step), and any step passed with ``fit=False`` (one the caller knows was
        disturbed). Raises ValueError on an infeasible split or a time that is not a positive
        finite number."""
        k = attention_gpus
        if not is_int(k) or not self.workload.feasible(k):
            raise ValueError(f"attention_gpus: {k!r} is not a feasible split of this cluster and model")
        for name, value in (("t_attention_s", t_attention_s), ("t_moe_s", t_moe_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive finite number of seconds, got {value!r}")
        shares = self.workload.normalized_load(expert_load)

        uncalibrated = not self.pools["attention"].calibrated
        new_split = self._last_k is not None and self._last_k != k
        run_length = self._run_length + 1 if self._last_k == k else 1
        fit = fit and run_length > self.settings.warmup_steps
        predicted = self.predict(k, expert_load=shares)
        record = PredictionError(step, k, predicted.t_attention_s, predicted.t_moe_s, float(t_attention_s),
                                 float(t_moe_s), new_split, uncalibrated, fit)
        self.pools["attention"].errors.add(record.rel_error_attention, new_split, record.uncalibrated)
        self.pools["moe"].errors.add(record.rel_error_moe, new_split, record.uncalibrated)

        if fit:
            x_a, x_m = self.workload.features(k, shares if shares is not None else self._load)
            settled = self._last_k == k and self._run_length >= self._settled_steps
            shifting = self.pools["attention"].fit(k, x_a, float(t_attention_s), settled)
            shifting = self.pools["moe"].fit(k, x_m, float(t_moe_s), settled) or shifting
            if shifting:
                self._last_shift = self.observations + 1
            if shares is not None:
                if self._load is None:
                    self._load = shares
                else:
                    a = self._load_alpha
                    self._load = tuple(old + a * (new - old) for old, new in zip(self._load, shares))
        self._run_length = run_length
        self._last_k = k
        self.observations += 1
        return record

    def observe_metrics(self, metrics: StepMetrics, step: Optional[int] = None, fit: bool = True,
                        expert_load: Optional[Sequence[float]] = None) -> PredictionError:
        """``observe`` a step's ``runtime.step_metrics.StepMetrics`` (its split and stage times).
        The step metrics carry no expert load; pass one as ``expert_load`` if you have it."""
        return self.observe(metrics.attention_gpus, metrics.t_attention_s, metrics.t_moe_s,
                            expert_load=expert_load, step=step, fit=fit)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self.workload.fingerprint(),
                "settings": dict(self.settings.__dict__),
                "pools": {name: pool.state_dict() for name, pool in self.pools.items()},
                "load": list(self._load) if self._load is not None else None,
                "last_k": self._last_k, "run_length": self._run_length, "last_shift": self._last_shift,
                "observations": self.observations}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict`` (its settings and reference split included); raises
        ValueError when it was saved for a different cluster, model shape or batch (the features
        would not mean the same)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"predictor state version {state.get('version')!r}, expected {STATE_VERSION}")
        saved = dict(state["fingerprint"])
        reference_k = saved.pop("reference_k")
        mine = self.workload.fingerprint()
        mine.pop("reference_k")
        if self.cfg.balance.time_coef_layout is not None:
            reference_k = None  # the layout the coefficients describe fixes the reference
        if saved != mine:
            changed = sorted(k for k in mine if saved.get(k) != mine[k])
            raise ValueError(f"predictor state was saved for a different job ({', '.join(changed)} differ)")
        self._build(PredictorSettings(**state["settings"]), reference_k)
        for name, pool in self.pools.items():
            pool.load_state_dict(state["pools"][name])
        self._load = tuple(state["load"]) if state["load"] is not None else None
        self._last_k = state["last_k"]
        self._run_length = int(state["run_length"])
        self._last_shift = int(state["last_shift"])
        self.observations = int(state["observations"])
