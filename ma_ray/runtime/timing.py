"""Per-worker stage timing: how long a worker computes and how long it waits on transfers.

On GPU, compute is timed with CUDA events (the host returns before the kernels finish, so a
host clock would measure launch time); the events are resolved once at the end of the step, so
timing adds no synchronisation inside the step. On CPU it is the thread's CPU time: workers run
torch single-threaded there, and emulated GPUs share a few cores, so wall time would count the
time a worker waited for a core as its own work. Waits on transfers (``wait``) are wall time on
both: a blocked wait uses no CPU, and what it costs the step is the time it takes. Emulated
stages (``parallel.emulation``) are recorded as the device time they stand for (``add``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch

# Timer labels: what a worker's ``timings`` report holds, in seconds per step.
ATTENTION_COMPUTE = "attention"  # an attention worker's compute
MOE_COMPUTE = "moe"  # a MoE worker's compute
ATTENTION_COLLECTIVES = "comm_attention"  # the attention pool's own all-gathers, reduce-scatters, all-reduce
WAIT_MOE = "wait_moe"  # an attention worker waiting for the MoE pool's transfers
WAIT_ATTENTION = "wait_attention"  # a MoE worker waiting for the attention pool's transfers
PASSES = "pipeline"  # wall time of the forward and backward passes, first op to last
GRAD_SYNC = "grad_sync"  # end-of-step gradient synchronisation
OPTIMIZER = "optimizer"  # the AdamW step


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._host: Dict[str, float] = defaultdict(float)
        self._events: List[Tuple[str, object, object]] = []

    @contextmanager
    def measure(self, label: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((label, start, end))
        else:
            t0 = time.thread_time()
            yield
            self._host[label] += time.thread_time() - t0

    def add(self, label: str, seconds: float) -> None:
        self._host[label] += seconds

    @contextmanager
    def wait(self, label: str):
        t0 = time.perf_counter()
        yield
        self._host[label] += time.perf_counter() - t0

    def totals(self) -> Dict[str, float]:
        """Seconds per label since the last reset (synchronises the GPU once)."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for label, start, end in self._events:
                out[label] = out.get(label, 0.0) + start.elapsed_time(end) / 1000.0
        return out
