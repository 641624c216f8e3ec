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
  which the stand-in's real collective is part, and is recorded as ``modelled_s``;
* ``waiting(label)``: the context a wait on a transfer is timed in (real: how long the device
  stood still for it, ``StageTimer.wait``; modelled: the host's wait for the modelled arrival);
* ``ready_at()``: when what the device has computed so far exists (a message's post time), a
  ``Ready``;
* ``start_step()``, ``end_step()``: around a step (the modelled device clock's, below);
* ``synchronize()``: block the host until the device is idle.

Times are ``time.time()``: the workers of one host share it, so a post time means the same to
the sender and the receiver.

The modelled device clock (``ModelledDevice.clock``, ``emulation.device_clock``): the timeline
above is kept on the host's wall clock, so wherever the host is behind the modelled device (a
stand-in collective whose gloo calls on shared cores take longer than the collective it stands
for, the host work between a collective and the next launch) its time is in the step too. The
clock is the same timeline without the host: seconds since the step began, advanced only by
modelled durations and by what a worker waits for (a message: its sender's clock when the data
was ready, plus its bytes over the inbound link; a collective: the latest member's clock, via
``pool_clock``), never by the host's own time. Its value at the step's end (label
``DEVICE_CLOCK``) is what the step takes on the modelled GPUs. A ``Ready`` is when a message's
data exists, on both clocks.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, NamedTuple, Optional

import torch

from ma_ray.runtime.timing import DEVICE_CLOCK, StageTimer


class Ready(NamedTuple):
    """When a result exists: ``wall``, on the host's shared clock; ``clock``, on the worker's
    modelled device clock (seconds since the step began; 0 where none is kept)."""

    wall: float
    clock: float


def sleep_until(deadline: float, clock: Callable[[], float] = time.perf_counter) -> None:
    remaining = deadline - clock()
    if remaining > 0:
        time.sleep(remaining)


def cuda_priority(methodology_priority: int, priority_range) -> int:
    """The method's stream priority (``comm.attention_stream_priority`` 0: high,
    ``comm.moe_stream_priority`` 1: normal) on CUDA's scale, ``priority_range`` = a CUDA stream's
    ``priority_range()`` = (least, greatest), where a lower number is a higher priority: 0 is the
    greatest; anything else the least, CUDA's default and the NCCL streams'."""
    least, greatest = priority_range
    return greatest if methodology_priority == 0 else least


class RealDevice:
    def __init__(self, torch_device: torch.device, stream_priority: int = 1):
        """``stream_priority``: the pool's (``cuda_priority``); on a GPU the worker's work runs on
        a stream of it, made current: torch's kernels and the CUDA-event timers run on it, and
        every collective is ordered against it by events both ways (``comm.groups``)."""
        self.torch_device = torch_device
        if torch_device.type == "cuda":
            torch.cuda.synchronize(torch_device)  # what the previous role queued ends on its stream
            torch.cuda.set_stream(torch.cuda.Stream(
                torch_device, priority=cuda_priority(stream_priority, torch.cuda.current_stream(torch_device).priority_range())))
        self.timer = StageTimer(torch_device)

    @contextmanager
    def compute(self, label: str, modelled_s: float = 0.0):
        with self.timer.measure(label):
            yield

    def queue(self, label: str, seconds: float) -> Ready:
        return Ready(time.time(), 0.0)

    @contextmanager
    def collective(self, label: str, modelled_s: float = 0.0):
        with self.timer.wait(label):
            yield

    def waiting(self, label: str):
        return self.timer.wait(label)

    def ready_at(self) -> Ready:
        return Ready(time.time(), 0.0)

    def start_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


class ModelledDevice:
    def __init__(self, torch_device: torch.device, keep_clock: bool = False):
        """``keep_clock``: report the device clock's value at the step's end (``DEVICE_CLOCK``);
        a worker of a pool with collectives sets ``pool_clock`` too."""
        self.torch_device = torch_device
        self.timer = StageTimer(torch_device)
        self.free_at = 0.0  # when the work queued so far is done (wall clock)
        self.keep_clock = keep_clock
        # ``pool_clock(mine)``: the latest clock over the collective's members (this one's is
        # ``mine``); None: this worker's own clock alone.
        self.pool_clock: Optional[Callable[[float], float]] = None
        self.start_step()

    def start_step(self) -> None:
        """Every worker's clock starts the step at 0, its inbound link free."""
        self.clock = 0.0
        self.link_clock = 0.0

    def end_step(self) -> None:
        if self.keep_clock:
            self.timer.add(DEVICE_CLOCK, self.clock)

    def _launch(self, seconds: float, launched_at: float) -> None:
        self.free_at = max(self.free_at, launched_at) + seconds
        self.clock += seconds

    @contextmanager
    def compute(self, label: str, modelled_s: float = 0.0):
        # A stage's time is queued where its main arithmetic runs; its other pieces (norms,
        # router, combine) add host work only, as their kernels would hide under the queue.
        launched_at = time.time()
        yield
        self._launch(modelled_s, launched_at)
        self.timer.add(label, modelled_s)

    def queue(self, label: str, seconds: float) -> Ready:
        self._launch(seconds, time.time())
        self.timer.add(label, seconds)
        return Ready(self.free_at, self.clock)

    @contextmanager
    def collective(self, label: str, modelled_s: float = 0.0):
        # Recorded as the device time it stands for, as a stage is: the host's own time in the
        # stand-in's collective also waits for the other members, which the step time shows.
        self.synchronize()
        started = time.perf_counter()
        yield
        # On the clock it starts when its last member is there (the exchange's host time, if
        # any, is in the wall clock's sleep below or past it, as the stand-in's is).
        if self.pool_clock is not None:
            self.clock = self.pool_clock(self.clock)
        self.clock += modelled_s
        sleep_until(started + modelled_s)
        self.timer.add(label, modelled_s)

    def arrived(self, sent: float, link_s: float) -> None:
        """A message's data, ready on its sender's clock at ``sent``, took ``link_s`` over this
        worker's inbound link (messages into one worker arrive one after another); what the
        device does next starts no earlier."""
        self.link_clock = max(sent, self.link_clock) + link_s
        self.clock = max(self.clock, self.link_clock)

    def waiting(self, label: str):
        # The modelled timeline is kept on the host: what a wait costs is the host's time in it.
        return self.timer.wall(label)

    def ready_at(self) -> Ready:
        return Ready(max(self.free_at, time.time()), self.clock)

    def synchronize(self) -> None:
        sleep_until(self.free_at, time.time)
