"""How two sets of named tensors are compared: the relative error ``verify`` and the tests report.

The error of one tensor is ``max|a - b| / max(max|b|, floor)``. Without a floor, a tensor whose
values are far below its kind's natural scale turns rounding noise into a large ratio:

* gradients: an expert that few tokens reached, or a bias whose gradient nearly cancels, holds
  values a thousand times below the rest; their rounding differences are measured against
  ``GRADIENT_FLOOR_FRACTION`` of the largest gradient of the whole model;
* updated parameters: zero-initialised biases are lr-sized after a step, and AdamW's first steps
  (update ~ lr * g / (|g| + eps)) pass a tiny gradient's *relative* rounding error straight into
  the update; they are measured against the initialisation scale (``model.initializer_range``),
  the magnitude every weight starts at.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

GRADIENT_FLOOR_FRACTION = 1e-3


def largest_magnitude(tensors: Dict[str, torch.Tensor]) -> float:
    return max((float(t.detach().abs().max()) for t in tensors.values() if t.numel()), default=0.0)


def max_relative_error(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                       floor: float) -> Tuple[float, str]:
    """The worst relative error over names and the name it occurs at; differing names raise."""
    if got.keys() != want.keys():
        differ = sorted(set(want) ^ set(got))[:3]
        raise KeyError(f"tensor names differ, e.g. {differ}")
    floor = max(floor, torch.finfo(torch.float32).tiny)
    worst, worst_name = 0.0, ""
    for name, w in want.items():
        if w.numel() == 0:
            continue
        w = w.detach()
        g = got[name].detach().to(w.dtype)
        err = float((g - w).abs().max()) / max(float(w.abs().max()), floor)
        if err > worst or not worst_name:
            worst, worst_name = err, name
    return worst, worst_name


def gradient_error(got, want) -> Tuple[float, str]:
    return max_relative_error(got, want, GRADIENT_FLOOR_FRACTION * largest_magnitude(want))


def parameter_error(got, want, init_std: float) -> Tuple[float, str]:
    return max_relative_error(got, want, init_std)


def scalar_relative_error(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), torch.finfo(torch.float32).tiny)
