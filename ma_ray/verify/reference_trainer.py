"""One optimizer step of the single-process reference: the oracle's side of ``ma-ray verify``
and the baseline of ``bench/step_overhead.py``.

Same rules as the workers: mean loss over the step's micro-batches (gradient accumulation),
global-norm clipping, AdamW with the warm-up + decay schedule, decay chosen by global name, and
every parameter stepped every step (zero gradient where no token reached an expert).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, Sequence, Tuple

import torch

from ma_ray.model.naming import export_global
from ma_ray.model.reference import MoETransformer
from ma_ray.optim import build_optimizer, clip_coefficient, param_dtype


class ReferenceTrainer:
    def __init__(self, cfg, seed: int | None = None):
        self.cfg = cfg
        self.model = MoETransformer(cfg, seed=seed).to(param_dtype(cfg))
        self.slices = self.model.global_slices()
        self.optimizer, self.scheduler = build_optimizer(self.model, self.slices, cfg.train)
        # bf16 autocasts the forward over fp32 master weights, as the workers do.
        bf16 = cfg.train.mixed_precision == "bf16"
        self._autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(self, micro_batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, float]:
        """Forward/backward every micro-batch, clip, step; returns the mean loss parts."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"total": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0}
        n = len(micro_batches)
        for ids, targets in micro_batches:
            with self._autocast():
                parts = self.model(ids, targets)
            (parts.total / n).backward()
            for k, v in parts.detached().items():
                totals[k] += v / n
        # Every parameter takes an AdamW step every step, as stacked expert weights in a layout
        # must: an expert no token reached gets a zero gradient (and its weight decay), not a skip.
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.model.parameters()]
        norm = float(torch.nn.utils.get_total_norm(grads))
        coef = clip_coefficient(norm, self.cfg.train.gradient_clipping)
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        self.optimizer.step()
        self.scheduler.step()
        totals["grad_norm"] = norm
        return totals

    def parameters_by_name(self) -> Dict[str, torch.Tensor]:
        return export_global(self.model, self.slices)

    def gradients_by_name(self) -> Dict[str, torch.Tensor]:
        return export_global(self.model, self.slices, "grad")
