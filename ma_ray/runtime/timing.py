"""Per-worker stage timing: how long a worker computes and how long it waits on transfers.

Each figure means the same on either backend: the time the worker's device spent on it.

* ``measure``, compute: on GPU, CUDA events (the host returns before the kernels finish, so a
  host clock would measure launch time); the events are resolved once at the end of the step, so
  timing adds no synchronisation inside the step. On CPU, the thread's CPU time: workers run
  torch single-threaded there, and emulated GPUs share a few cores, so wall time would count the
  time a worker waited for a core as its own work.
* ``wait``, a wait on a transfer or a collective: how long the worker's compute stood still for
  it. On CPU the host is the device, so it is the wall time the host blocked (a blocked wait uses
  no CPU). On GPU the host does not block: NCCL ops are queued on their own streams, and the
  compute stream waits for them on the device (``comm.groups``). So a wait is a pair of CUDA
  events on the compute stream around the region: the first fires when the compute before it is
  done, the second when the stream may go on, and the time between is the stall. A host clock
  there would read about zero and push the stall into the next compute region's events.
* ``wall``, host wall time, for spans the caller ends by synchronising the device (the passes).
* ``add``: emulated stages (``parallel.emulation``), as the device time they stand for.
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
ATTENTION_COLLECTIVES = "comm_attention"  # the attention pool's per-layer all-gathers and reduce-scatters
WAIT_MOE = "wait_moe"  # an attention worker waiting for the MoE pool's transfers
WAIT_ATTENTION = "wait_attention"  # a MoE worker waiting for the attention pool's transfers
PASSES = "pipeline"  # wall time of the forward and backward passes, first op to last
GRAD_SYNC = "grad_sync"  # end-of-step gradient synchronisation (a wait, like a collective)
COMPRESSION = "compression"  # gradient compression's kernels, part of the gradient synchronisation
OPTIMIZER = "optimizer"  # the AdamW step
# Emulated (``emulation.device_clock``): the modelled device's clock at the end of the gradient
# synchronisation, the step's length on the modelled GPUs without the host (``runtime.device``).
DEVICE_CLOCK = "device_clock"


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
            with self._device_span(label):
                yield
        else:
            t0 = time.thread_time()
            yield
            self._host[label] += time.thread_time() - t0

    def add(self, label: str, seconds: float) -> None:
        self._host[label] += seconds

    @contextmanager
    def wait(self, label: str):
        if self.cuda:
            with self._device_span(label):
                yield
        else:
            with self.wall(label):
                yield

    @contextmanager
    def wall(self, label: str):
        t0 = time.perf_counter()
        yield
        self._host[label] += time.perf_counter() - t0

    @contextmanager
    def _device_span(self, label: str):
        """Events on the current stream around the region: its device time."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((label, start, end))

    def totals(self) -> Dict[str, float]:
        """Seconds per label since the last reset (synchronises the GPU once)."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for label, start, end in self._events:
                out[label] = out.get(label, 0.0) + start.elapsed_time(end) / 1000.0
        return out
