"""Optimizer and learning-rate schedule shared by the reference trainer and every worker.

Weight decay is decided by global parameter name (``ma_ray.model.naming``), not by tensor rank,
so the reference and any layout decay exactly the same numbers: stacked expert biases are 2-D
locally yet are biases. Embeddings, projection, router and expert weights decay; biases and
LayerNorm parameters do not.
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch import nn

from ma_ray.model.naming import GlobalSlice

# torch.optim.AdamW's per-parameter moment buffers: the optimizer state that travels by global name.
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def decays(global_name: str) -> bool:
    return not (global_name.endswith("bias") or ".ln" in global_name or global_name.startswith("final_ln"))


def param_groups(module: nn.Module, slices: Iterable[GlobalSlice], weight_decay: float) -> List[dict]:
    """AdamW parameter groups of ``module``: one with ``weight_decay``, one without."""
    decay_of = {}
    for s in slices:
        decay_of.setdefault(s.local, decays(s.name))
    params = dict(module.named_parameters())
    if set(decay_of) != set(params):
        raise ValueError(f"parameters without a global name: {sorted(set(params) - set(decay_of))[:3]}")
    return [
        {"params": [params[n] for n in params if decay_of[n]], "weight_decay": weight_decay},
        {"params": [params[n] for n in params if not decay_of[n]], "weight_decay": 0.0},
    ]


def lr_factor(step: int, train_cfg) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up,
    then cosine (or linear, or constant) decay to ``min_learning_rate`` at ``num_train_steps``."""
    t = train_cfg
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    floor = t.min_learning_rate / t.learning_rate if t.learning_rate > 0 else 0.0
    span = max(1, t.num_train_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.lr_decay_style == "constant":
        return 1.0
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if t.lr_decay_style == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * shape


def build_optimizer(module: nn.Module, slices: Iterable[GlobalSlice], train_cfg):
    """AdamW over ``module`` and its LambdaLR schedule (stepped once per optimizer step)."""
    t = train_cfg
    opt = torch.optim.AdamW(param_groups(module, slices, t.weight_decay), lr=t.learning_rate,
                            betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))
    return opt, sched


def param_dtype(cfg) -> torch.dtype:
    """Master-weight dtype: fp64 when verifying in double, else fp32 (bf16 autocasts over it)."""
    return torch.float64 if cfg.train.mixed_precision == "fp64" else torch.float32


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Factor to scale gradients by for global-norm clipping (torch's formula); 0 turns it off."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))
