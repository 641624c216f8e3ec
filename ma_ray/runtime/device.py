"""The device seam: where a worker's work runs and how it is timed, chosen once when the worker
takes a role (``runtime.worker``). Roles call the same methods on either device.

* ``RealDevice``: work runs where the role launches it and is timed there (``StageTimer``: CUDA
  events on a GPU, the thread's CPU time on CPU).
* ``ModelledDevice``: under ``emulation.modelled_compute`` the work runs on stand-in tensors, and
  what is timed is its modelled duration at the configured shapes, queued on the timeline of the
  GPU the worker stands for. On a GPU the host only launches kernels; they run in order on the
  device while the host goes on (posting transfers, planning the next batch). A worker that
  slept through each modelled stage would add all of its host work (the stand-in's arithmetic,
  gloo calls, Python) to the step, a cost the real system hides under device time; so a stage
  is queued, and the host waits only where it needs the device's results.

Both expose:

* ``compute(label, modelled_s)``: a region of compute; real: timed as it runs; modelled: its
  ``modelled_s`` is queued when the host has reached its end;
* ``queue(label, seconds)``: device work whose input is here now, without a host region (the MoE
  pool's per-chunk work); returns when its result is ready (real: now, it was timed where it ran);
* ``collective(label, modelled_s)``: a collective over this worker's tensors; it first waits for
  the device (its input is the device's output), and under modelling it lasts ``modelled_s``, of
  which the stand-in's real collective is part;
* ``ready_at()``: when what the device has computed so far exists (a message's post time);
* ``synchronize()``: block the host until the device is idle.

Times are ``time.time()``: the workers of one host share it, so a post time means the same to
the sender and the receiver.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch

from ma_ray.runtime.timing import StageTimer


def sleep_until(deadline: float, clock: Callable[[], float] = time.perf_counter) -> None:
    remaining = deadline - clock()
    if remaining > 0:
        time.sleep(remaining)


class RealDevice:
    def __init__(self, torch_device: torch.device):
        self.torch_device = torch_device
        self.timer = StageTimer(torch_device)

    @contextmanager
    def compute(self, label: str, modelled_s: float = 0.0):
        with self.timer.measure(label):
            yield

    def queue(self, label: str, seconds: float) -> float:
        return time.time()

    @contextmanager
    def collective(self, label: str, modelled_s: float = 0.0):
        with self.timer.wait(label):
            yield

    def ready_at(self) -> float:
        return time.time()

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


class ModelledDevice:
    def __init__(self, torch_device: torch.device):
        self.torch_device = torch_device
        self.timer = StageTimer(torch_device)
        self.free_at = 0.0  # when the work queued so far is done

    def _launch(self, seconds: float, launched_at: float) -> None:
        self.free_at = max(self.free_at, launched_at) + seconds

    @contextmanager
    def compute(self, label: str, modelled_s: float = 0.0):
        # A stage's time is queued where its main arithmetic runs; its other pieces (norms,
        # router, combine) add host work only, as their kernels would hide under the queue.
        launched_at = time.time()
        yield
        self._launch(modelled_s, launched_at)
        self.timer.add(label, modelled_s)

    def queue(self, label: str, seconds: float) -> float:
        self._launch(seconds, time.time())
        self.timer.add(label, seconds)
        return self.free_at

    @contextmanager
    def collective(self, label: str, modelled_s: float = 0.0):
        self.synchronize()
        started = time.perf_counter()
        yield
        with self.timer.wait(label):
            sleep_until(started + modelled_s)

    def ready_at(self) -> float:
        return max(self.free_at, time.time())

    def synchronize(self) -> None:
        sleep_until(self.free_at, time.time)
