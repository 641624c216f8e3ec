"""The GPU a worker stands for under emulation: a timeline of when its queued work finishes.

On a GPU the host only launches kernels; they run in order on the device while the host goes on
(posting transfers, planning the next batch). A worker that slept through each emulated stage
would instead add all of its host work (the stand-in's arithmetic, gloo calls, Python) to the
step, a cost the real system hides under device time. So each emulated stage is queued here:

* ``launch(seconds, launched_at)`` queues work that starts when the device is free and the host
  has reached it, and returns at once;
* ``ready_at()`` is when what the device has computed so far exists; a message carries it as its
  post time, so the receiver holds the data until then plus its link time (``runtime.transfers``);
* ``synchronize()`` blocks the host until the device is idle, before anything that needs the
  device's results on the host side: a collective over real stand-in tensors, the step's end.

Times are ``time.time()``: the workers of one host share it, so a post time means the same to
the sender and the receiver.
"""

from __future__ import annotations

import time


class EmulatedDevice:
    def __init__(self):
        self.free_at = 0.0

    def launch(self, seconds: float, launched_at: float) -> None:
        """Queue ``seconds`` of device work that the host reached at ``launched_at``."""
        self.free_at = max(self.free_at, launched_at) + seconds

    def ready_at(self) -> float:
        return max(self.free_at, time.time())

    def synchronize(self) -> None:
        remaining = self.free_at - time.time()
        if remaining > 0:
            time.sleep(remaining)
