"""Handles of non-blocking operations: on a gloo group `.wait()` blocks the host, bounded by the
group's timeout; on NCCL it makes torch's current stream wait for the op, on the device.

`CommHandle` wraps a `torch.distributed` Work object. On gloo its `wait()` never blocks longer
than the per-op timeout (counted from the call to `wait`, so compute overlapped with the transfer
does not eat into it); on NCCL (``on_device``) it is `Work.wait()` without a timeout, which only
orders the current stream after the op's end event (the group's watchdog bounds the op). Either
way it turns any failure into a `CommError` that names the group, the worker and the op, and runs
an optional `finish` step (e.g. slicing padded buffers) whose value it returns.
`QueuedHandle` is the same device-side wait for an op of Ray's NCCL group (`groups.py`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Optional

from ma_ray.comm.errors import CommError, CommTimeoutError, GroupIdentity, op_failed

_TIMEOUT_MARKERS = ("timed out", "timeout")


class CommHandle:
    """An operation in flight. `wait()` may be called more than once; later calls return the
    same value or raise the same error."""

    def __init__(self, work, *, ident: GroupIdentity, op: str, timeout_ms: int,
                 on_failure: Callable[[CommError], None],
                 finish: Optional[Callable[[], Any]] = None, on_device: bool = False):
        self._work = work
        self._ident = ident
        self._op = op
        self._timeout_ms = timeout_ms
        self._on_failure = on_failure
        self._finish = finish
        self._on_device = on_device
        self._done = False
        self._value: Any = None
        self._error: Optional[CommError] = None

    @property
    def op(self) -> str:
        return self._op

    @property
    def timed_out(self) -> bool:
        """Whether ``wait()`` failed by passing the timeout (a stalled peer, not a dead one)."""
        return isinstance(self._error, CommTimeoutError)

    def is_completed(self) -> bool:
        """True once the transfer is over (successfully or not); never blocks."""
        return self._done or self._work.is_completed()

    def wait(self) -> Any:
        if self._error is not None:
            raise self._error
        if self._done:
            return self._value
        try:
            if self._on_device:
                # torch: with no timeout, ProcessGroupNCCL's wait only makes the current stream
                # wait for the op's end event; with one, the host would spin until the op ends.
                self._work.wait()
            else:
                self._work.wait(timedelta(milliseconds=self._timeout_ms))
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or DistError kinds
            self._error = op_failed(self._ident, self._op, exc, self._timeout_ms,
                                    timed_out=_is_timeout(exc))
            self._on_failure(self._error)
            raise self._error from exc
        self._value = self._finish() if self._finish is not None else None
        self._done = True
        return self._value


class FailedLaunch:
    """The Work of a point-to-point op whose launch already failed: gloo's send and recv touch
    the peer's connection at once, so a dead peer can fail them before there is any Work.
    Handing the failure to `CommHandle` as a Work lets it be reported like one that surfaced in
    ``wait()``: named, and breaking the group."""

    def __init__(self, cause: BaseException):
        self._cause = cause

    def is_completed(self) -> bool:
        return True

    def wait(self, timeout=None):
        raise self._cause


class CompletedHandle:
    """A handle for an operation that already ran to completion (backends without async ops)."""

    def __init__(self, value: Any = None, op: str = ""):
        self._value = value
        self.op = op

    def is_completed(self) -> bool:
        return True

    def wait(self) -> Any:
        return self._value


class QueuedHandle:
    """An op of Ray's NCCL group, queued on its stream: ``wait()`` makes torch's current stream
    wait on the device for ``done`` (an event recorded on the op's stream after the op), without
    blocking the host."""

    def __init__(self, done, device, op: str):
        self._done_event = done
        self._device = device
        self.op = op

    def is_completed(self) -> bool:
        return self._done_event.query()

    def wait(self) -> None:
        import torch

        torch.cuda.current_stream(self._device).wait_event(self._done_event)


def _is_timeout(exc: BaseException) -> bool:
    # Work.wait(timeout) says "Operation timed out!"; gloo's own transport timeout says
    # "Timed out waiting N ms for recv operation"; a dead peer says "Connection closed by peer".
    text = str(exc).lower()
    return any(marker in text for marker in _TIMEOUT_MARKERS)
