"""Moving training state between layouts: which global names a worker of a plan holds, and how
the per-worker state payloads of one layout are cut and merged for another.

A payload is ``Role.export_state()``: parameters and AdamW moments by global name plus the
optimizer step count. Replicated attention-side names travel from one holder only (attention
rank 0), so every name has exactly one source. The same payloads are a checkpoint's shards.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Set

import torch

from ma_ray.model.attention_side import AttentionSideParams
from ma_ray.model.stacks import stack_for
from ma_ray.optim import ADAM_MOMENTS

TENSOR_KEYS = ("params", *ADAM_MOMENTS)


def names_of(cfg, assignment) -> Set[str]:
    """Every global name the worker at ``assignment`` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        stack = stack_for(cfg, assignment)
    return {s.name for s in stack.global_slices()}


def replicated_names(cfg) -> Set[str]:
    with torch.device("meta"):
        return {s.name for s in AttentionSideParams(cfg).global_slices()}


def owned_state(cfg, assignment, state: dict) -> dict:
    """The part of a worker's payload it is the single source of (replicas: attention rank 0 only)."""
    if assignment.is_attention and assignment.rank == 0:
        return state
    return restrict(state, set(state["params"]) - replicated_names(cfg))


def restrict(state: dict, names: Iterable[str]) -> dict:
    names = set(names)
    out = {key: {n: t for n, t in state.get(key, {}).items() if n in names} for key in TENSOR_KEYS}
    out["optimizer_steps"] = state["optimizer_steps"]
    return out


def merge(states: List[dict]) -> dict:
    """One payload from parts that each hold some names; the step counts must agree."""
    steps = {s["optimizer_steps"] for s in states}
    if len(steps) != 1:
        raise ValueError(f"state parts disagree on the optimizer step: {sorted(steps)}")
    out: Dict = {key: {} for key in TENSOR_KEYS}
    for s in states:
        for key in TENSOR_KEYS:
            out[key].update(s.get(key, {}))
    out["optimizer_steps"] = steps.pop()
    return out


def payload_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for key in TENSOR_KEYS for t in state.get(key, {}).values())
