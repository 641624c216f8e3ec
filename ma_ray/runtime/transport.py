"""The transport seam: point-to-point traffic between the pools, chosen once when a worker takes
a role (``runtime.worker``). Roles call the same methods on either transport.

Traffic is organised in blocks: everything one worker sends another for one exchange (a
micro-batch's rows of one layer, or their gradients), cut into chunks of
``schedule.communication_chunk_size`` tokens. Sends are posted at once and waited for later;
receives are posted at most ``schedule.max_concurrent_communications`` ahead of the one a
worker waits for.

Both the CPU backend (gloo's unbound buffers) and NCCL move a message only once its receiver has
posted the receive (a rendezvous), so the receiving side's window is what bounds the transfers
in flight into a worker. A sender that waited for its own window would block its compute on the
other pool's progress, which in the ping-pong schedule is a deadlock (each pool waiting for the
other to take an older message).

* ``ChunkTransport`` (computing for real): every chunk is its own message, and the MoE pool
  computes the chunks in batches of at least a chunk's rows as they arrive.
* ``ModelledBlockTransport`` (``emulation.modelled_compute``): a block's chunks travel as one
  message whose trailer gives each chunk the time its data is ready on the sender's modelled
  device (``runtime.device``) and the bytes it stands for at the configured shapes. The receiver
  hands out the chunks one by one, each once it would have arrived over its inbound link (NVLink
  from its own node, the network from another), chunks into one worker arriving one after
  another. So the modelled timing is the chunked one, while the host pays for one message a
  block: at paper scale a chunk is one stand-in row, and a message per chunk made the host's
  per-message cost (gloo and Python, on cores shared by every emulated GPU) the step
  (``bench/RESULTS.md``). A block arrives on the host at once, so the MoE pool computes it as
  one batch, while each chunk's modelled device time is still queued as it arrives. A chunk's
  stamp carries its ready time on the sender's modelled device clock too, which the receiver's
  device advances by (``ModelledDevice.arrived``).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from ma_ray.runtime.device import sleep_until

# Three float64s a chunk: ready at (wall clock, shared by one host's processes), ready at on the
# sender's modelled device clock (``runtime.device``), bytes.
_STAMP_BYTES = 24


class ChunkTransport:
    def __init__(self, links, max_in_flight: int, chunk_rows: int):
        self.links = links
        self.max_in_flight = max_in_flight
        self.chunk_rows = chunk_rows

    # -- sending ----------------------------------------------------------------------------

    def send(self, tensor: torch.Tensor, dst_gpu: int, nbytes: float = 0.0):
        """Post ``tensor`` to ``dst_gpu`` as a block of one chunk; returns a handle to ``wait()``
        on before the tensor may change. ``nbytes``: its size at the configured shapes."""
        return self.links.isend(tensor.contiguous(), dst_gpu)

    def send_chunks(self, rows: torch.Tensor, dst_gpu: int, bytes_of: Callable[[int], float]) -> List:
        """Post ``rows`` to ``dst_gpu`` as a block of ``chunk_rows``-row chunks; returns the
        handles. ``bytes_of(n)``: what ``n`` rows stand for at the configured shapes."""
        outbox = self.outbox({dst_gpu: len(chunk_sizes(rows.shape[0], self.chunk_rows))})
        return [handle for chunk in split_rows(rows, self.chunk_rows)
                for handle in outbox.put(chunk, dst_gpu, bytes_of(chunk.shape[0]), None)]

    def outbox(self, chunks_per_dst: Dict[int, int]) -> "ChunkOutbox":
        """For blocks whose chunks become ready one at a time: ``chunks_per_dst[dst]`` chunks go
        to each ``dst`` in this exchange."""
        return ChunkOutbox(self)

    # -- receiving --------------------------------------------------------------------------

    def receive(self, pairs: Sequence[Tuple[torch.Tensor, int]], waiting) -> Iterator[torch.Tensor]:
        """Fill each ``(buffer, src_gpu)``, a block of one chunk each; see ``receive_blocks``."""
        return self.receive_blocks([(src, [buf]) for buf, src in pairs], waiting)

    def receive_blocks(self, blocks: Sequence[Tuple[int, List[torch.Tensor]]], waiting) -> Iterator[torch.Tensor]:
        """Fill the chunk buffers of each ``(src_gpu, [buffer, ...])`` block in order, yielding
        each buffer once it has arrived, with at most ``max_in_flight`` messages posted ahead;
        ``waiting()`` is the context the waits are timed in."""
        messages = [(src, [buf], buf) for src, bufs in blocks for buf in bufs]
        for src, bufs, landing in self._arrived(messages, waiting):
            yield bufs[0]

    def _arrived(self, messages, waiting):
        """``(src, bufs, landing)`` messages in order, each once its ``landing`` buffer is filled."""
        pending: deque = deque()
        posted = 0
        for message in messages:
            while posted < len(messages) and len(pending) < self.max_in_flight:
                pending.append(self.links.irecv(messages[posted][2], messages[posted][0]))
                posted += 1
            with waiting():
                pending.popleft().wait()
            yield message

    # -- compute batches --------------------------------------------------------------------

    def compute_batches(self, chunks: Sequence) -> List[List]:
        """Consecutive chunks (each with ``src`` and ``rows``) grouped into compute batches of
        at least a chunk's rows: each chunk is its own message, so a batch can compute while the
        next chunks arrive."""
        batches, current = [], []
        for chunk in chunks:
            current.append(chunk)
            if sum(ch.rows for ch in current) >= self.chunk_rows:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
        return batches


class ChunkOutbox:
    """Chunks sent as they are put, each its own message."""

    def __init__(self, transport: ChunkTransport):
        self.transport = transport

    def put(self, chunk: torch.Tensor, dst_gpu: int, nbytes: float, ready_at) -> List:
        """Send ``chunk``; returns the handles of what was posted. ``ready_at``: when its data is
        ready on the device (None: now)."""
        return [self.transport.links.isend(chunk.contiguous(), dst_gpu)]


class ModelledBlockTransport(ChunkTransport):
    def __init__(self, links, max_in_flight: int, chunk_rows: int,
                 link_bytes_per_s: Callable[[int], float], ready_at: Callable[[], Tuple[float, float]],
                 arrived: Callable[[float, float], None] = lambda sent, link_s: None):
        """``link_bytes_per_s(src_gpu)``: the modelled inbound bandwidth from ``src_gpu``;
        ``ready_at()``: when the data a message carries exists on the modelled device, (wall
        clock, device clock) (``runtime.device.Ready``); ``arrived(sent, link_s)``: a chunk
        ready at ``sent`` on its sender's device clock took ``link_s`` over the inbound link
        (``ModelledDevice.arrived``)."""
        super().__init__(links, max_in_flight, chunk_rows)
        self.link_bytes_per_s = link_bytes_per_s
        self.ready_at = ready_at
        self.arrived = arrived
        self._link_free = 0.0

    def send(self, tensor: torch.Tensor, dst_gpu: int, nbytes: float = 0.0):
        return self.post_block(dst_gpu, [tensor], [(*self.ready_at(), float(nbytes))])

    def outbox(self, chunks_per_dst: Dict[int, int]) -> "BlockOutbox":
        return BlockOutbox(self, chunks_per_dst)

    def post_block(self, dst_gpu: int, chunks: Sequence[torch.Tensor], stamps: Sequence[Tuple[float, ...]]):
        return self.links.isend(pack_block(chunks, stamps), dst_gpu)

    def receive_blocks(self, blocks: Sequence[Tuple[int, List[torch.Tensor]]], waiting) -> Iterator[torch.Tensor]:
        messages = [(src, bufs, _landing(bufs)) for src, bufs in blocks if bufs]
        for src, bufs, landing in self._arrived(messages, waiting):
            for buf, (ready, ready_clock, nbytes) in zip(bufs, unpack_block(landing, bufs)):
                link_s = nbytes / self.link_bytes_per_s(src)
                self._link_free = max(ready, self._link_free) + link_s
                with waiting():
                    sleep_until(self._link_free, time.time)
                self.arrived(ready_clock, link_s)
                yield buf

    def compute_batches(self, chunks: Sequence) -> List[List]:
        """One batch per source block: the block is on the host at once, and the modelled device
        time of its chunks is queued chunk by chunk as each arrives, so the stand-in arithmetic
        may run a block at once (its host cost per batch is not what a GPU pays)."""
        batches: List[List] = []
        for chunk in chunks:
            if not batches or batches[-1][-1].src != chunk.src:
                batches.append([])
            batches[-1].append(chunk)
        return batches


class BlockOutbox:
    """Chunks bound for several workers, each worker's in order; a worker's chunks go as one
    message once all of them are in, each stamped with the time its data is ready."""

    def __init__(self, transport: ModelledBlockTransport, chunks_per_dst: Dict[int, int]):
        self.transport = transport
        self.expected = dict(chunks_per_dst)
        self._held: Dict[int, List[Tuple[torch.Tensor, Tuple[float, float]]]] = {}

    def put(self, chunk: torch.Tensor, dst_gpu: int, nbytes: float, ready_at) -> List:
        t = self.transport
        held = self._held.setdefault(dst_gpu, [])
        held.append((chunk, (*(t.ready_at() if ready_at is None else ready_at), float(nbytes))))
        if len(held) < self.expected[dst_gpu]:
            return []
        del self._held[dst_gpu]
        return [t.post_block(dst_gpu, [c for c, _ in held], [s for _, s in held])]


def pack_block(chunks: Sequence[torch.Tensor], stamps: Sequence[Tuple[float, ...]]) -> torch.Tensor:
    """One modelled message on the chunks' device: the chunks' bytes, then a stamp of float64s
    per chunk, all of one width ((ready at, ready at on the device clock, bytes) from the
    transport), made on that device too: no tensor of another device is joined."""
    device = chunks[0].device
    stamp = torch.tensor(stamps, dtype=torch.float64, device=device).view(-1).view(torch.uint8)
    return torch.cat([c.contiguous().view(-1).view(torch.uint8) for c in chunks] + [stamp])


def unpack_block(landing: torch.Tensor, bufs: Sequence[torch.Tensor]) -> List[List[float]]:
    """Fill ``bufs`` from a ``pack_block`` message; returns its stamps, a list of floats each
    (their width is what the message's bytes past the chunks leave per chunk), read back to the
    host."""
    offset = 0
    for buf in bufs:
        size = buf.numel() * buf.element_size()
        buf.view(-1).view(torch.uint8).copy_(landing[offset:offset + size])
        offset += size
    # A copy on the host: the stamps start wherever the chunks end, and float64 views need 8-byte
    # alignment.
    return landing[offset:].to("cpu", copy=True).view(torch.float64).view(len(bufs), -1).tolist()


def _landing(bufs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The buffer a ``pack_block`` message of ``bufs``' chunks lands in, on their device."""
    size = sum(b.numel() * b.element_size() for b in bufs) + _STAMP_BYTES * len(bufs)
    return torch.empty(size, dtype=torch.uint8, device=bufs[0].device)


def split_rows(rows: torch.Tensor, chunk_rows: int) -> Sequence[torch.Tensor]:
    """``rows`` in chunks of ``chunk_rows`` (the last may be shorter; none when empty)."""
    return torch.split(rows, chunk_rows) if rows.shape[0] else ()


def chunk_sizes(total: int, chunk_rows: int) -> List[int]:
    """Sizes of ``split_rows`` for ``total`` rows."""
    return [min(chunk_rows, total - start) for start in range(0, total, chunk_rows)]
