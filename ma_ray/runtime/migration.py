"""Moving training state between layouts: which global names a worker of a plan holds, what each
worker of a new plan needs from whom, and the payloads that carry it.

A payload is ``Role.export_state()``'s form: parameters and AdamW moments by global name plus the
optimizer step count. The same payloads are a checkpoint's shards (``runtime.checkpoint``).

A change of split ships only what moves (``plan_shipments``): every slot of the new plan gets the
names it holds there and did not hold before, each from the one old worker that held it; heads
and experts from their old owner, and the replicated attention side (embeddings, LayerNorms,
router, LM head), which every attention worker holds, from one old attention worker to a slot
that becomes one. Nothing goes from a worker to itself: what it keeps stays in place
(``Role.load_state``). On the wire (``to_wire``) tensors are numpy arrays, which Ray writes into
its object store and reads back without a copy of their own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Set, Tuple

import numpy as np
import torch

from ma_ray.model.attention_side import AttentionSideParams
from ma_ray.model.stacks import stack_for
from ma_ray.optim import ADAM_MOMENTS

TENSOR_KEYS = ("params", *ADAM_MOMENTS)
# A payload's optional key: the shipped names' top-k residuals across replicas, which are the
# sending replica's own (``Role.shard_residuals``); never in a checkpoint's shards.
SHARD_RESIDUAL = "shard_residual"


def names_of(cfg, assignment) -> Set[str]:
    """Every global name the worker at ``assignment`` holds (built on the meta device: no memory)."""
    with torch.device("meta"):
        stack = stack_for(cfg, assignment)
    return {s.name for s in stack.global_slices()}


def replicated_names(cfg) -> Set[str]:
    with torch.device("meta"):
        return {s.name for s in AttentionSideParams(cfg).global_slices()}


def owned_names(cfg, assignment) -> Set[str]:
    """The names the worker at ``assignment`` is the single source of in a checkpoint
    (replicated attention-side names: attention rank 0 only)."""
    names = names_of(cfg, assignment)
    if assignment.is_attention and assignment.rank == 0:
        return names
    return names - replicated_names(cfg)


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
    """Bytes of the tensors (or wire arrays) of a payload."""
    return sum(_nbytes(t) for key in (*TENSOR_KEYS, SHARD_RESIDUAL) for t in state.get(key, {}).values())


def _nbytes(t) -> int:
    return int(t.nbytes) if isinstance(t, np.ndarray) else t.numel() * t.element_size()


# -- what moves -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Shipment:
    """``names`` from the old worker at ``src`` to the new workers at ``dsts`` (one object in the
    store, however many read it)."""
    src: Tuple[int, int]
    dsts: Tuple[Tuple[int, int], ...]
    names: Tuple[str, ...]


def plan_shipments(cfg, old_plan, new_plan) -> List[Shipment]:
    """What every slot of ``new_plan`` holds and did not hold in ``old_plan``, each name from
    the one old worker that held it: a head or an expert from its old owner, one shipment per
    (source, destination); the replicated attention side, to each slot that becomes an attention
    worker, from an old attention worker of its own node (the lowest old rank there; else old
    attention rank 0), as one shipment per source to all its destinations. No shipment goes from
    a slot to itself, and a slot that only gives names away receives nothing."""
    replicated = replicated_names(cfg)
    held = {g.slot: names_of(cfg, g) for g in old_plan.gpus}
    source_of = {n: g.slot for g in old_plan.gpus for n in held[g.slot] - replicated}
    pairs: Dict[Tuple, Set[str]] = {}
    replica_dsts: Dict[Tuple, List] = {}
    for g in new_plan.gpus:
        need = names_of(cfg, g) - held[g.slot]
        if need & replicated:
            replica_dsts.setdefault(_replica_source(old_plan, g.node), []).append(g.slot)
        for name in need - replicated:
            pairs.setdefault((source_of[name], g.slot), set()).add(name)
    out = [Shipment(src, (dst,), tuple(sorted(names))) for (src, dst), names in sorted(pairs.items())]
    out += [Shipment(src, tuple(sorted(dsts)), tuple(sorted(replicated)))
            for src, dsts in sorted(replica_dsts.items())]
    return out


def _replica_source(old_plan, node: int) -> Tuple[int, int]:
    attention = old_plan.attention_workers()  # by pool rank
    local = [g for g in attention if g.node == node]
    return (local[0] if local else attention[0]).slot


# -- on the wire ----------------------------------------------------------------------------

def to_wire(state: dict) -> dict:
    """A payload whose tensors are host numpy arrays: Ray writes them into the object store out
    of band and a reader maps them from there, so neither side makes a copy of its own. Views
    stay views (no clone); a device tensor is copied to the host once."""
    out = {key: {n: _array(t) for n, t in state.get(key, {}).items()} for key in (*TENSOR_KEYS, SHARD_RESIDUAL)}
    out["optimizer_steps"] = state["optimizer_steps"]
    return out


def from_wire(state: dict) -> dict:
    """The payload with tensors again (sharing the arrays' memory: read them, do not keep them)."""
    with warnings.catch_warnings():
        # Arrays mapped from the object store are read-only; they are only ever copied from.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        out = {key: {n: torch.from_numpy(a) for n, a in state.get(key, {}).items()}
               for key in (*TENSOR_KEYS, SHARD_RESIDUAL)}
    out["optimizer_steps"] = state["optimizer_steps"]
    return out


def _array(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")  # one copy, of this view only
    # A non-contiguous view (a head's output-projection columns) would be pickled in band.
    return np.ascontiguousarray(t.numpy())
