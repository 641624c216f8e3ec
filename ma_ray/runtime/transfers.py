"""Point-to-point traffic between the pools: chunked sends posted without waiting, and receives
posted at most ``comm.max_concurrent_communications`` ahead of the one a worker waits for.

Both the CPU backend (gloo's unbound buffers) and NCCL move a message only once its receiver has
posted the receive (a rendezvous), so the receiving side's window is what bounds the transfers
in flight into a worker. Sends are posted at once and waited for later: a sender that waited
for its own window would block its compute on the other pool's progress, which in the ping-pong
schedule is a deadlock (each pool waiting for the other to take an older message).

Under emulation (``parallel.emulation``) each message carries a trailer with the time its data
is ready on the sender's emulated device (``runtime.emulated_device``) and the bytes it stands
for at the configured shapes; the receiver holds it until it would have arrived over its inbound
link (NVLink from its own node, the network from another), messages into one worker arriving
one after another.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

_TRAILER = 2  # float64s: posted at (wall clock, shared by the processes of one host), bytes


def sleep_until(deadline: float, clock: Callable[[], float] = time.perf_counter) -> None:
    remaining = deadline - clock()
    if remaining > 0:
        time.sleep(remaining)


class Transfers:
    def __init__(self, links, max_in_flight: int, link_bytes_per_s: Optional[Callable[[int], float]] = None,
                 ready_at: Callable[[], float] = time.time):
        """``link_bytes_per_s(src_gpu)``: the emulated inbound bandwidth from ``src_gpu``; None
        sends the tensors as they are, with no emulated time. ``ready_at()``: when the data a
        message carries exists on the emulated device (its post time)."""
        self.links = links
        self.max_in_flight = max_in_flight
        self.link_bytes_per_s = link_bytes_per_s
        self.ready_at = ready_at
        self._link_free = 0.0

    @property
    def emulated(self) -> bool:
        return self.link_bytes_per_s is not None

    def send(self, tensor: torch.Tensor, dst_gpu: int, nbytes: float = 0.0):
        """Post ``tensor`` to ``dst_gpu``; returns a handle to ``wait()`` on before the tensor may
        change. ``nbytes``: its size at the configured shapes (emulation only)."""
        if self.emulated:
            trailer = torch.tensor([self.ready_at(), float(nbytes)], dtype=torch.float64).view(torch.uint8)
            tensor = torch.cat([tensor.contiguous().view(-1).view(torch.uint8), trailer])
        return self.links.isend(tensor.contiguous(), dst_gpu)

    def send_chunks(self, rows: torch.Tensor, dst_gpu: int, chunk_rows: int,
                    bytes_of: Callable[[int], float]) -> List:
        return [self.send(chunk, dst_gpu, bytes_of(chunk.shape[0])) for chunk in split_rows(rows, chunk_rows)]

    def receive(self, pairs: Sequence[Tuple[torch.Tensor, int]], waiting) -> Iterator[torch.Tensor]:
        """Fill each ``(buffer, src_gpu)`` in order, yielding it once it has arrived, with at most
        ``max_in_flight`` receives posted; ``waiting()`` is the context the waits are timed in."""
        landing = [self._landing(buf) for buf, _ in pairs]
        pending: deque = deque()
        posted = 0
        for (buf, src), land in zip(pairs, landing):
            while posted < len(pairs) and len(pending) < self.max_in_flight:
                pending.append(self.links.irecv(landing[posted], pairs[posted][1]))
                posted += 1
            with waiting():
                pending.popleft().wait()
                if self.emulated:
                    self._arrive(buf, land, src)
            yield buf

    def _landing(self, buf: torch.Tensor) -> torch.Tensor:
        if not self.emulated:
            return buf
        return torch.empty(buf.numel() * buf.element_size() + 8 * _TRAILER, dtype=torch.uint8, device=buf.device)

    def _arrive(self, buf: torch.Tensor, landing: torch.Tensor, src_gpu: int) -> None:
        posted_at, nbytes = landing[-8 * _TRAILER:].view(torch.float64).tolist()
        buf.view(-1).view(torch.uint8).copy_(landing[:-8 * _TRAILER])
        self._link_free = max(posted_at, self._link_free) + nbytes / self.link_bytes_per_s(src_gpu)
        sleep_until(self._link_free, time.time)


def split_rows(rows: torch.Tensor, chunk_rows: int) -> Sequence[torch.Tensor]:
    """``rows`` in chunks of ``chunk_rows`` (the last may be shorter; none when empty)."""
    return torch.split(rows, chunk_rows) if rows.shape[0] else ()


def chunk_sizes(total: int, chunk_rows: int) -> List[int]:
    """Sizes of ``split_rows`` for ``total`` rows."""
    return [min(chunk_rows, total - start) for start in range(0, total, chunk_rows)]
