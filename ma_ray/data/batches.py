"""Batches: which windows of a token source make up each step's batch.

Step ``s`` draws ``batch_size`` window offsets uniformly (with replacement) from a numpy
Generator seeded by ``(seed, s)`` alone; row ``r`` of the step's batch is the window of
``seq_length + 1`` tokens at ``offsets[r]``, split into inputs (the first ``seq_length``) and
targets (the last ``seq_length``, i.e. shifted by one). Micro-batch ``i`` is rows
``[i * micro_batch_size, (i + 1) * micro_batch_size)``.

Why this design:

* Stateless random access. A batch is a pure function of ``(seed, step, index)``; no iterator
  state, so resuming from a checkpoint needs only the step number, and any worker can build any
  micro-batch without coordination.
* Independent of the split. Nothing depends on the cluster, the attention/MoE GPU split, the
  number of workers, or even on how ``batch_size`` is cut into micro-batches (the step's rows are
  the same whatever the micro-batch size), so runs on different splits see identical data and
  their losses are comparable.
* Cheap. Seeding a Generator and drawing ``batch_size`` integers costs microseconds, so nothing
  is cached between calls.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .sources import TokenSource

# Keeps the data stream's seeds apart from other users of ``train.seed`` (e.g. weight init), so
# the sampled offsets are not correlated with any other seeded draw of the run.
_DATA_STREAM_TAG = 0xDA7A


class Dataset:
    """Deterministic training batches over a ``TokenSource``; see the module docstring."""

    def __init__(self, source: TokenSource, seed: int, batch_size: int, micro_batch_size: int,
                 seq_length: int):
        if batch_size % micro_batch_size:
            raise ValueError(f"micro_batch_size {micro_batch_size} does not divide batch_size {batch_size}")
        if source.num_tokens < seq_length + 1:
            raise ValueError(f"source has {source.num_tokens} tokens, fewer than seq_length + 1 ({seq_length + 1})")
        self.source = source
        self.seed = seed
        self.batch_size = batch_size
        self.micro_batch_size = micro_batch_size
        self.seq_length = seq_length
        self.grad_accum = batch_size // micro_batch_size
        self._num_offsets = source.num_tokens - seq_length  # valid window starts

    @property
    def num_tokens(self) -> int:
        """Tokens in the source (the synthetic source reports its virtual length, 2**40)."""
        return self.source.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.source.vocab_size

    def step_offsets(self, step: int) -> np.ndarray:
        """The ``batch_size`` window offsets of step ``step`` (int64), a function of (seed, step)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # SeedSequence wants non-negative entropy; masking keeps negative seeds usable and distinct.
        rng = np.random.default_rng([_DATA_STREAM_TAG, self.seed & 0xFFFF_FFFF_FFFF_FFFF, step])
        return rng.integers(0, self._num_offsets, size=self.batch_size, dtype=np.int64)

    def rows(self, step: int, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[start, stop)`` of step ``step``'s global batch as (inputs, targets).

        For data-parallel workers that each take a slice of a micro-batch's rows.
        """
        if not 0 <= start <= stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are outside the batch of {self.batch_size}")
        tokens = self.source.windows(self.step_offsets(step)[start:stop], self.seq_length + 1)
        # Two contiguous arrays rather than views of one buffer: callers may .view() them, and
        # numpy's strided copy is several times faster here than torch's .contiguous().
        inputs = np.ascontiguousarray(tokens[:, :-1])
        targets = np.ascontiguousarray(tokens[:, 1:])
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def micro_batch(self, step: int, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``index`` (0 .. grad_accum - 1) of step ``step``: (inputs, targets).

        Both int64 [micro_batch_size, seq_length] on the CPU; targets are inputs shifted by one.
        """
        if not 0 <= index < self.grad_accum:
            raise ValueError(f"micro-batch index must be in [0, {self.grad_accum}), got {index}")
        start = index * self.micro_batch_size
        return self.rows(step, start, start + self.micro_batch_size)

    def describe(self) -> str:
        """One line for logs: where the tokens come from and how batches are cut."""
        return (f"{self.source.describe()}; vocab {self.vocab_size:,}; step batch {self.batch_size} x "
                f"{self.seq_length} tokens = {self.grad_accum} micro-batch{'es' * (self.grad_accum != 1)} "
                f"of {self.micro_batch_size}; windows sampled by (seed {self.seed}, step)")
