"""Bayesian linear regression over keyed observations, forgetting each key's data only as
newer data for the same key arrive.

Model: ``y = x . w + e``, ``e ~ N(0, noise_var)``, prior ``w ~ N(mean0, cov0)``. Observations
come with a key (here: the split they were measured at). For every key the regression keeps the
exponential average, with memory ``memory`` observations, of ``x x^T`` and ``x y``, and a weight
``n`` = how many observations that average stands for (it grows by one per observation up to
``memory``). The posterior is the exact Gaussian update of the prior with those summaries:

    P = P0 + sum_key n_key E_key[x x^T] / noise_var
    h = P0 mean0 + sum_key n_key E_key[x y] / noise_var,     mean = P^-1 h

Why forget per key and not per time step: the cluster sits on one split for hundreds of steps.
Plain exponential forgetting (recursive least squares with a forgetting factor) would, meanwhile,
forget everything it learnt at the other splits -- the very information that says what moving
would cost -- and slide back to the prior, so a policy driven by it would re-try a split it had
just found to be worse. Here what was measured at a split stays until that split is measured
again, while the split being measured follows its own recent steps (memory ``memory``).
Machine-wide changes are the predictor's business (it re-levels the whole model, see
``control.predictor``).

Pure numpy; the state round-trips through plain lists (``state_dict``).
"""

from __future__ import annotations

from typing import Dict, Hashable, Sequence, Tuple

import numpy as np


class _Summary:
    __slots__ = ("weight", "xx", "xy")

    def __init__(self, size: int):
        self.weight = 0.0
        self.xx = np.zeros((size, size))
        self.xy = np.zeros(size)


class KeyedBayesLinear:
    def __init__(self, prior_mean: Sequence[float], prior_cov, noise_var: float, memory: float):
        mean0 = np.asarray(prior_mean, dtype=np.float64)
        cov0 = np.asarray(prior_cov, dtype=np.float64)
        n = mean0.shape[0]
        if mean0.ndim != 1 or cov0.shape != (n, n):
            raise ValueError(f"prior mean of {mean0.shape} and covariance of {cov0.shape} do not match")
        if not np.allclose(cov0, cov0.T) or np.min(np.linalg.eigvalsh(cov0)) <= 0:
            raise ValueError("prior covariance must be symmetric positive definite")
        if not (noise_var > 0 and np.isfinite(noise_var)):
            raise ValueError(f"noise variance must be positive, got {noise_var}")
        if not memory >= 1:
            raise ValueError(f"memory must be at least 1 observation, got {memory}")
        self.size = n
        self.noise_var = float(noise_var)
        self.memory = float(memory)
        precision0 = np.linalg.inv(cov0)
        self.prior_precision = 0.5 * (precision0 + precision0.T)
        self.prior_info = self.prior_precision @ mean0
        self._keys: Dict[Hashable, _Summary] = {}
        self._solve()

    # -- posterior ----------------------------------------------------------------------------

    def _solve(self) -> None:
        precision, info = self.prior_precision.copy(), self.prior_info.copy()
        for s in self._keys.values():
            precision += s.weight * s.xx / self.noise_var
            info += s.weight * s.xy / self.noise_var
        self.precision = precision
        self.mean = np.linalg.solve(precision, info)
        self.cov = np.linalg.inv(precision)

    def predict(self, x: Sequence[float]) -> Tuple[float, float]:
        """Predictive mean and variance of a new observation at ``x`` (noise included)."""
        xv = np.asarray(x, dtype=np.float64)
        return float(xv @ self.mean), float(xv @ self.cov @ xv) + self.noise_var

    def weight(self, key: Hashable) -> float:
        """How many observations the summary of ``key`` stands for (0 if none)."""
        s = self._keys.get(key)
        return s.weight if s is not None else 0.0

    def keys(self):
        return list(self._keys)

    # -- learning -----------------------------------------------------------------------------

    def update(self, key: Hashable, x: Sequence[float], y: float) -> None:
        xv = np.asarray(x, dtype=np.float64)
        if xv.shape != (self.size,) or not np.all(np.isfinite(xv)) or not np.isfinite(y):
            raise ValueError(f"observation must be {self.size} finite features and a finite value")
        s = self._keys.setdefault(key, _Summary(self.size))
        s.weight = min(s.weight + 1.0, self.memory)
        alpha = 1.0 / s.weight  # a plain mean until the memory is full, then an exponential one
        s.xx += alpha * (np.outer(xv, xv) - s.xx)
        s.xy += alpha * (xv * float(y) - s.xy)
        self._solve()

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"noise_var": self.noise_var, "memory": self.memory,
                "prior_precision": self.prior_precision.tolist(), "prior_info": self.prior_info.tolist(),
                "keys": [[key, s.weight, s.xx.tolist(), s.xy.tolist()] for key, s in self._keys.items()]}

    def load_state_dict(self, state: dict) -> None:
        prior_precision = np.asarray(state["prior_precision"], dtype=np.float64)
        if prior_precision.shape != (self.size, self.size):
            raise ValueError(f"saved regression has {prior_precision.shape[0]} features, this one {self.size}")
        self.noise_var = float(state["noise_var"])
        self.memory = float(state["memory"])
        self.prior_precision = prior_precision
        self.prior_info = np.asarray(state["prior_info"], dtype=np.float64)
        self._keys = {}
        for key, weight, xx, xy in state["keys"]:
            s = _Summary(self.size)
            s.weight, s.xx, s.xy = float(weight), np.asarray(xx, dtype=np.float64), np.asarray(xy, dtype=np.float64)
            self._keys[key] = s
        self._solve()
