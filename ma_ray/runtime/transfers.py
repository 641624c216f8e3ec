"""Point-to-point traffic between the pools: chunked sends posted without waiting, and receives
posted at most ``schedule.max_concurrent_communications`` ahead of the one a worker waits for.

Both the CPU backend (gloo's unbound buffers) and NCCL move a message only once its receiver has
posted the receive (a rendezvous), so the receiving side's window is what bounds the transfers
in flight into a worker. Sends are posted at once and waited for later: a sender that waited
for its own window would block its compute on the other pool's progress, which in the ping-pong
schedule is a deadlock (each pool waiting for the other to take an older message).

Traffic is organised in blocks: everything one worker sends another for one exchange (a
micro-batch's rows of one layer, or their gradients), cut into chunks of
``schedule.communication_chunk_size`` tokens. Computing for real, every chunk is its own message.

Under emulation (``parallel.emulation``) a block's chunks travel as one message, and its trailer
gives each chunk the time its data is ready on the sender's emulated device
(``runtime.emulated_device``) and the bytes it stands for at the configured shapes. The receiver
hands out the chunks one by one, each once it would have arrived over its inbound link (NVLink
from its own node, the network from another), chunks into one worker arriving one after another.
So the emulated timing is the chunked one, while the host pays for one message a block: at
paper scale a chunk is one stand-in row, and a message per chunk made the host's per-message
cost (gloo and Python, on cores shared by every emulated GPU) the step (``bench/RESULTS.md``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

_STAMP_BYTES = 16  # two float64s a chunk: ready at (wall clock, shared by one host's processes), bytes


def sleep_until(deadline: float, clock: Callable[[], float] = time.perf_counter) -> None:
    remaining = deadline - clock()
    if remaining > 0:
        time.sleep(remaining)


class Transfers:
    def __init__(self, links, max_in_flight: int, link_bytes_per_s: Optional[Callable[[int], float]] = None,
                 ready_at: Callable[[], float] = time.time):
        """``link_bytes_per_s(src_gpu)``: the emulated inbound bandwidth from ``src_gpu``; None
        sends the tensors as they are, with no emulated time. ``ready_at()``: when the data a
        message carries exists on the emulated device."""
        self.links = links
        self.max_in_flight = max_in_flight
        self.link_bytes_per_s = link_bytes_per_s
        self.ready_at = ready_at
        self._link_free = 0.0

    @property
    def emulated(self) -> bool:
        return self.link_bytes_per_s is not None

    # -- sending ----------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, dst_gpu: int, nbytes: float = 0.0):
        """Post ``tensor`` to ``dst_gpu`` as a block of one chunk; returns a handle to ``wait()``
        on before the tensor may change. ``nbytes``: its size at the configured shapes."""
        if not self.emulated:
            return self.links.isend(tensor.contiguous(), dst_gpu)
        return self._post_block(dst_gpu, [tensor], [(self.ready_at(), float(nbytes))])

    def send_chunks(self, rows: torch.Tensor, dst_gpu: int, chunk_rows: int,
                    bytes_of: Callable[[int], float]) -> List:
        """Post ``rows`` to ``dst_gpu`` as a block of ``chunk_rows``-row chunks; returns the
        handles. ``bytes_of(n)``: what ``n`` rows stand for at the configured shapes."""
        outbox = self.outbox({dst_gpu: len(chunk_sizes(rows.shape[0], chunk_rows))})
        return [handle for chunk in split_rows(rows, chunk_rows)
                for handle in outbox.put(chunk, dst_gpu, bytes_of(chunk.shape[0]))]

    def outbox(self, chunks_per_dst: Dict[int, int]) -> "Outbox":
        """For blocks whose chunks become ready one at a time: ``chunks_per_dst[dst]`` chunks go
        to each ``dst`` in this exchange."""
        return Outbox(self, chunks_per_dst)

    def _post_block(self, dst_gpu: int, chunks: Sequence[torch.Tensor], stamps: Sequence[Tuple[float, float]]):
        return self.links.isend(pack_block(chunks, stamps), dst_gpu)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, pairs: Sequence[Tuple[torch.Tensor, int]], waiting) -> Iterator[torch.Tensor]:
        """Fill each ``(buffer, src_gpu)``, a block of one chunk each; see ``receive_blocks``."""
        return self.receive_blocks([(src, [buf]) for buf, src in pairs], waiting)

    def receive_blocks(self, blocks: Sequence[Tuple[int, List[torch.Tensor]]], waiting) -> Iterator[torch.Tensor]:
        """Fill the chunk buffers of each ``(src_gpu, [buffer, ...])`` block in order, yielding
        each buffer once it has arrived, with at most ``max_in_flight`` messages posted ahead;
        ``waiting()`` is the context the waits are timed in."""
        if self.emulated:
            messages = [(src, bufs, _landing(bufs)) for src, bufs in blocks if bufs]
        else:
            messages = [(src, [buf], buf) for src, bufs in blocks for buf in bufs]
        pending: deque = deque()
        posted = 0
        for src, bufs, landing in messages:
            while posted < len(messages) and len(pending) < self.max_in_flight:
                pending.append(self.links.irecv(messages[posted][2], messages[posted][0]))
                posted += 1
            with waiting():
                pending.popleft().wait()
            if not self.emulated:
                yield bufs[0]
                continue
            for buf, (ready, nbytes) in zip(bufs, unpack_block(landing, bufs)):
                self._link_free = max(ready, self._link_free) + nbytes / self.link_bytes_per_s(src)
                with waiting():
                    sleep_until(self._link_free, time.time)
                yield buf


class Outbox:
    """Chunks bound for several workers, each worker's in order, sent as they are put; under
    emulation a worker's chunks go as one message once all of them are in, each stamped with
    the time its data is ready."""

    def __init__(self, transfers: Transfers, chunks_per_dst: Dict[int, int]):
        self.transfers = transfers
        self.expected = dict(chunks_per_dst)
        self._held: Dict[int, List[Tuple[torch.Tensor, Tuple[float, float]]]] = {}

    def put(self, chunk: torch.Tensor, dst_gpu: int, nbytes: float, ready_at: Optional[float] = None) -> List:
        """Send (or, under emulation, hold) ``chunk``; returns the handles of what was posted.
        ``ready_at``: when its data is ready on the emulated device, if not now."""
        t = self.transfers
        if not t.emulated:
            return [t.links.isend(chunk.contiguous(), dst_gpu)]
        held = self._held.setdefault(dst_gpu, [])
        held.append((chunk, (t.ready_at() if ready_at is None else ready_at, float(nbytes))))
        if len(held) < self.expected[dst_gpu]:
            return []
        del self._held[dst_gpu]
        return [t._post_block(dst_gpu, [c for c, _ in held], [s for _, s in held])]


def pack_block(chunks: Sequence[torch.Tensor], stamps: Sequence[Tuple[float, float]]) -> torch.Tensor:
    """One emulated message: the chunks' bytes, then a (ready at, bytes) float64 pair per chunk."""
    stamp = torch.tensor(stamps, dtype=torch.float64).view(-1).view(torch.uint8)
    return torch.cat([c.contiguous().view(-1).view(torch.uint8) for c in chunks] + [stamp])


def unpack_block(landing: torch.Tensor, bufs: Sequence[torch.Tensor]) -> List[List[float]]:
    """Fill ``bufs`` from a ``pack_block`` message; returns its stamps, [ready at, bytes] each."""
    offset = 0
    for buf in bufs:
        size = buf.numel() * buf.element_size()
        buf.view(-1).view(torch.uint8).copy_(landing[offset:offset + size])
        offset += size
    # A copy: the stamps start wherever the chunks end, and float64 views need 8-byte alignment.
    return landing[offset:].clone().view(torch.float64).view(-1, 2).tolist()


def _landing(bufs: Sequence[torch.Tensor]) -> torch.Tensor:
    size = sum(b.numel() * b.element_size() for b in bufs) + _STAMP_BYTES * len(bufs)
    return torch.empty(size, dtype=torch.uint8, device=bufs[0].device)


def split_rows(rows: torch.Tensor, chunk_rows: int) -> Sequence[torch.Tensor]:
    """``rows`` in chunks of ``chunk_rows`` (the last may be shorter; none when empty)."""
    return torch.split(rows, chunk_rows) if rows.shape[0] else ()


def chunk_sizes(total: int, chunk_rows: int) -> List[int]:
    """Sizes of ``split_rows`` for ``total`` rows."""
    return [min(chunk_rows, total - start) for start in range(0, total, chunk_rows)]
