"""How two sets of named tensors are compared: the relative error ``verify`` and the tests report.

The error of one tensor is ``max|a - b| / max|b|``. A few gradients are zero in exact arithmetic
(the key bias's: softmax ignores a constant shift of the scores), so what both sides hold there
is rounding noise around 1e-12; dividing noise by noise says nothing. Those tensors are measured
against ``floor_fraction`` of the largest magnitude in the whole set instead.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch


def max_relative_error(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor],
                       floor_fraction: float = 1e-3) -> Tuple[float, str]:
    """The worst relative error over names and the name it occurs at; missing names raise."""
    if got.keys() != want.keys():
        missing = sorted(set(want) ^ set(got))[:3]
        raise KeyError(f"tensor names differ, e.g. {missing}")
    scale = max((float(t.detach().abs().max()) for t in want.values() if t.numel()), default=0.0)
    floor = max(scale * floor_fraction, torch.finfo(torch.float32).tiny)
    worst, worst_name = 0.0, ""
    for name, w in want.items():
        g = got[name].detach().to(w.dtype)
        if w.numel() == 0:
            continue
        err = float((g - w.detach()).abs().max()) / max(float(w.detach().abs().max()), floor)
        if err > worst or not worst_name:
            worst, worst_name = err, name
    return worst, worst_name


def scalar_relative_error(got: float, want: float) -> float:
    return abs(got - want) / max(abs(want), torch.finfo(torch.float32).tiny)
