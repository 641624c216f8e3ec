"""How a held piece of the replicated gradients is summed across nodes: the cross-node level of
the two-level all-reduce (``comm.aggregation``), where gradient compression goes. Chosen once,
by ``cross_node_reducer`` (``comm.gradient_compression``):

* ``DenseCrossNode`` ("none"): a ring all-reduce in the gradient's dtype; exact.
* ``Bf16CrossNode`` ("bf16"): a ring all-reduce of a bf16 copy, the math of torch's
  ``bf16_compress_hook`` (``comm.compression.to_bf16_wire``); half the bytes, bf16's rounding,
  no state.
* ``TopKCrossNode`` ("topk", the methodology's): each member compresses its piece plus its residual
  (``comm.compression``: the ``sparsification_ratio`` largest entries of each block, values in
  ``quantization_bits``), each tensor's run of the piece on its own, the members all-gather the
  messages and each decodes all of them in member order, so every member holds the same sum. A sparse reduction is an all-gather, whose
  bytes grow with the members: it pays across nodes (N = nodes, after the node's own reduction)
  and would not inside one. The first ``comm.compression_warmup_steps`` optimizer steps cross
  dense and exact, as 1-bit Adam's warm-up stage and Deep Gradient Compression's warm-up do:
  compressed from the first step, the local preset's run opens a gap to the exact run in its
  first ~50 steps that does not close (3.4 % of the loss at step 200; bench/RESULTS.md).

Every reducer learns the optimizer step before the step's reductions (``begin_step``);
``compresses`` and ``wire_factor`` describe the step under way.

The error-feedback residual of each held piece is training state: ``residuals()`` and
``load_residuals()`` give and take it by piece. The replicated gradients' pieces are element
ranges of the flat gradient vector of this worker's node; a worker's sharded gradients, summed
with its counterparts in the other replicas, are one piece of their own, in a reducer of their
own (``runtime.residuals`` checkpoints and migrates both).

``wire_factor(members, piece_numel, element_bytes)``: bytes sent per byte of a piece (the ring
all-reduce's ``2 (N - 1) / N``; a message all-gather's ``(N - 1) * message_bytes / piece_bytes``),
for the byte counts and the analytic time.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Sequence

import torch

from ma_ray.comm import groups
from ma_ray.comm.compression import (CompressionSettings, ErrorFeedback, decompress_add_, from_bf16_wire,
                                     message_bytes, to_bf16_wire)
from ma_ray.errors import is_int


class DenseCrossNode:
    exact = True
    compresses = False  # runs compression kernels this step (whose time is modelled under emulation)

    def begin_step(self, step: int) -> None:
        """The optimizer step whose gradients the next reductions sum."""

    def reduce(self, piece: int, part: torch.Tensor, group: str, segments: Sequence[int] = ()) -> None:
        """Sum ``part`` (piece ``piece`` of the flat vector) over ``group``, in place.
        ``segments``: the lengths of the tensors' runs that make up ``part``, in order."""
        groups.allreduce(part, group)

    def wire_factor(self, members: int, piece_numel: int, element_bytes: int) -> float:
        return 2.0 * (members - 1) / members

    def residuals(self) -> Dict[int, torch.Tensor]:
        return {}

    def load_residuals(self, residuals: Dict[int, torch.Tensor], device, dtype) -> None:
        pass


class Bf16CrossNode(DenseCrossNode):
    exact = False

    def reduce(self, piece: int, part: torch.Tensor, group: str, segments: Sequence[int] = ()) -> None:
        wire = to_bf16_wire(part)
        groups.allreduce(wire, group)
        from_bf16_wire(wire, out=part)

    def wire_factor(self, members: int, piece_numel: int, element_bytes: int) -> float:
        return 2.0 * (members - 1) / members * 2 / element_bytes


class TopKCrossNode(DenseCrossNode):
    exact = False

    def __init__(self, settings: CompressionSettings, timed: Callable[[], ContextManager] = nullcontext,
                 warmup_steps: int = 0):
        """``timed()``: the context the compression kernels are timed in. ``warmup_steps``
        (``comm.compression_warmup_steps``): the optimizer steps, from step 0, that cross dense."""
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be a non-negative integer, got {warmup_steps!r}")
        self.settings = settings
        self.timed = timed
        self.warmup_steps = warmup_steps
        self.compresses = warmup_steps == 0  # until begin_step says which step it is
        self.residual: Dict[int, torch.Tensor] = {}  # piece -> what this node has not sent of it
        self.feedback: Dict[int, List[ErrorFeedback]] = {}  # piece -> one per tensor run, on views of it

    def _feedback(self, piece: int, part: torch.Tensor, segments: Sequence[int]) -> List[ErrorFeedback]:
        if piece not in self.residual:
            self.residual[piece] = torch.zeros(part.numel(), dtype=part.dtype, device=part.device)
        if piece not in self.feedback:
            runs, start = [], 0
            for n in segments or [part.numel()]:
                fb = ErrorFeedback(n, self.settings, device=part.device, dtype=part.dtype)
                fb.residual = self.residual[piece][start:start + n]  # a view: the piece's residual is one tensor
                runs.append(fb)
                start += n
            self.feedback[piece] = runs
        return self.feedback[piece]

    def begin_step(self, step: int) -> None:
        self.compresses = step >= self.warmup_steps

    def reduce(self, piece: int, part: torch.Tensor, group: str, segments: Sequence[int] = ()) -> None:
        if not self.compresses:
            # Warm-up: dense and exact. A residual held from compressed steps (none unless a
            # run went back before the warm-up's end) is sent with it, so nothing is lost.
            if piece in self.residual:
                part.add_(self.residual[piece])
                self.residual[piece].zero_()
            super().reduce(piece, part, group, segments)
            return
        # Each tensor's run of the piece is compressed on its own, as Deep Gradient Compression
        # does per layer: a block straddling two tensors would share one scale and one top-k
        # between gradients of unlike size (a LayerNorm's beside an embedding's), and the small
        # one would round to nothing and wait in the residual.
        runs = self._feedback(piece, part, segments)
        with self.timed():
            message = torch.cat([fb.compress(run) for fb, run in zip(runs, torch.split(part, [f.numel for f in runs]))])
        messages = [torch.empty_like(message) for _ in range(groups.world_size(group))]
        groups.allgather(messages, message, group)
        with self.timed():
            part.zero_()
            sizes = [message_bytes(fb.numel, self.settings) for fb in runs]
            for member in messages:  # in member order: every member adds alike
                for fb, out, bytes_ in zip(runs, torch.split(part, [f.numel for f in runs]), torch.split(member, sizes)):
                    decompress_add_(out, bytes_, fb.numel, self.settings)

    def wire_factor(self, members: int, piece_numel: int, element_bytes: int) -> float:
        """Counted as one run of blocks: each tensor's own run adds at most a block's rounding
        and a scale (a few bytes a tensor). The dense ring's during the warm-up."""
        if not self.compresses:
            return super().wire_factor(members, piece_numel, element_bytes)
        if piece_numel == 0:
            return 0.0
        return (members - 1) * message_bytes(piece_numel, self.settings) / (piece_numel * element_bytes)

    def residuals(self) -> Dict[int, torch.Tensor]:
        return dict(self.residual)

    def load_residuals(self, residuals: Dict[int, torch.Tensor], device, dtype) -> None:
        """Residuals by piece, as ``residuals()`` gave them (any device), into this worker's."""
        for piece, residual in residuals.items():
            self.residual[piece] = residual.to(device=device, dtype=dtype, copy=True).reshape(-1)
            self.feedback.pop(piece, None)  # rebuilt on views of the loaded tensor


def cross_node_reducer(kind: str, settings: CompressionSettings,
                       timed: Callable[[], ContextManager] = nullcontext, warmup_steps: int = 0) -> DenseCrossNode:
    """The reducer for ``comm.gradient_compression`` = ``kind``; ``warmup_steps``
    (``comm.compression_warmup_steps``): the first optimizer steps a compressing kind sends dense."""
    if kind == "none":
        return DenseCrossNode()
    if kind == "bf16":
        return Bf16CrossNode()
    if kind == "topk":
        return TopKCrossNode(settings, timed, warmup_steps)
    raise ValueError(f"comm.gradient_compression: unknown kind {kind!r}")


def every_reducer(settings: CompressionSettings) -> Dict[str, DenseCrossNode]:
    """One reducer of each ``comm.gradient_compression`` kind, for their cost model only (the
    planner, ``parallel.search``, asks each its ``wire_factor`` and ``compresses``)."""
    return {kind: cross_node_reducer(kind, settings) for kind in ("none", "bf16", "topk")}
