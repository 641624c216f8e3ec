"""The MoE role: this worker's experts of every layer, computed for the rows the attention
workers route to them.

Each attention worker sends, per layer and micro-batch, a count per expert of this worker and
then its rows sorted by expert, in chunks of ``schedule.communication_chunk_size`` tokens. The
worker takes the chunks in source order and groups consecutive ones into compute batches as its
transport says (``runtime.transport``: at least a chunk's rows when each chunk is a message, a
source's whole block when blocks travel as one message). Each batch is regrouped expert-major
(one matmul per expert over the batch's rows) and computed while the next batch arrives. The
outputs go back, chunk by chunk, when the attention pool's schedule reaches the exchange that
takes them (``runtime.schedule`` says why that order cannot deadlock); backward does the same
with gradients. Every row's result depends only on its own input, so batching changes sums of
parameter gradients only in their order (rounding). Each source's chunks of an exchange form
one block. Each chunk's share of the modelled stage time is
queued on the device as it arrives (nothing computing for real, where the batch is timed as it
runs), and its result is sent stamped with when that is done.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, Tuple

import torch
from torch.utils.checkpoint import checkpoint

from ma_ray.model.stacks import ExpertStack
from ma_ray.parallel.step_time import FORWARD_SHARE
from ma_ray.parallel.placement import MOE
from ma_ray.runtime import schedule as S
from ma_ray.runtime.role import Role, backward, grad_of, release_output
from ma_ray.runtime.step_metrics import WorkerStepResult
from ma_ray.runtime.timing import MOE_COMPUTE, WAIT_ATTENTION
from ma_ray.runtime.transport import chunk_sizes


class MoERole(Role):
    kind = MOE

    def __init__(self, cfg, plan, me, links, device, transport, durations):
        stack = ExpertStack(cfg, me.experts)
        super().__init__(cfg, plan, me, links, device, transport, durations, stack, stack.global_slices())
        self.stack = stack
        self.sources = [w.gpu for w in plan.attention_workers()]
        self.num_local = len(me.experts)
        self.hidden = cfg.model.hidden_size

    def op_handlers(self):
        return {S.EXPERT_RECV: self.expert_recv, S.EXPERT_FWD: self.expert_fwd, S.EXPERT_RETURN: self.expert_return,
                S.EXPERT_BWD: self.expert_bwd, S.EXPERT_RETURN_BWD: self.expert_return_bwd}

    def begin_step(self, step: int) -> None:
        self.state: Dict = {}
        self.unsent: List = []  # the last input-gradient sends, waited for at the step's end
        self.returned: List = []  # output sends whose receivers may not have taken them yet

    def end_micro_batches(self) -> WorkerStepResult:
        self.wait_sends(self.returned + self.unsent, WAIT_ATTENTION)
        return WorkerStepResult(grad_norm=0.0, lr=0.0)

    def _waiting(self):
        return self.device.waiting(WAIT_ATTENTION)

    def expert_recv(self, mb: int, layer: int) -> None:
        """Every source's row count per local expert; plans the chunks and compute batches."""
        counts = torch.empty(len(self.sources), self.num_local, dtype=torch.int64, device=self.torch_device)
        for _ in self.transport.receive(list(zip(counts, self.sources)), self._waiting):
            pass
        # Every source has posted this exchange's counts, so it took the outputs returned before
        # (its combines come before this dispatch): those sends are done, and their buffers go
        # now rather than at the layer's backward.
        self.wait_sends(self.returned, WAIT_ATTENTION)
        self.returned = []
        # The one host read of this layer and micro-batch: the exchange's sizes, every source's
        # at once.
        per_source = counts.tolist()
        chunks = [_Chunk(src, per_expert) for src, c in zip(self.sources, per_source)
                  for per_expert in _chunk_counts(c, self.chunk_rows)]
        total = sum(ch.rows for ch in chunks)
        # This exchange's modelled stage (zero computing for real), shared by rows among the chunks.
        stage = self.durations.moe_stage_s(self.num_local, total * self.durations.token_scale)
        for chunk in chunks:
            chunk.modelled_s = stage * chunk.rows / total
        # The local expert of every row the exchange brings, sources in order (each sorted by
        # expert), made on the device from the counts there: the batches' regrouping needs no
        # index built on the host.
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local, device=self.torch_device).repeat(len(self.sources)), counts.view(-1),
            output_size=total)
        batches, start = [], 0
        for b in self.transport.compute_batches(chunks):
            rows = sum(ch.rows for ch in b)
            batches.append(_Batch(b, expert_of_row[start:start + rows]))
            start += rows
        self.state[mb, layer] = dict(batches=batches, chunks_per_source=Counter(ch.src for ch in chunks))

    def expert_fwd(self, mb: int, layer: int) -> None:
        """Receive the rows batch by batch and compute them; the outputs wait for expert_return."""
        st = self.state[mb, layer]
        group = self.stack.groups[layer]
        arriving = self._arrivals(st["batches"])
        for batch in st["batches"]:
            rows, batch.ready = self._take(arriving, batch, FORWARD_SHARE)
            inp = rows.index_select(0, batch.perm).requires_grad_()
            with self.device.compute(MOE_COMPUTE), self._autocast():
                out = (checkpoint(group, inp, batch.per_expert, use_reentrant=False) if self.checkpointing
                       else group(inp, batch.per_expert))
            batch.inp, batch.out = inp, out

    def expert_return(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer]
        self.returned += self._send_back(st, lambda batch: batch.out.detach())
        for batch in st["batches"]:
            release_output(batch.out)  # sent; backward needs only its graph

    def expert_bwd(self, mb: int, layer: int) -> None:
        """Receive the output gradients batch by batch and run backward; the input gradients
        wait for expert_return_bwd."""
        st = self.state[mb, layer]
        self.wait_sends(self.returned, WAIT_ATTENTION)
        self.returned = []
        arriving = self._arrivals(st["batches"])
        for batch in st["batches"]:
            grad_out, batch.ready = self._take(arriving, batch, 1 - FORWARD_SHARE)
            with self.device.compute(MOE_COMPUTE):
                backward([batch.out], [grad_out.index_select(0, batch.perm).to(batch.out.dtype)])

    def expert_return_bwd(self, mb: int, layer: int) -> None:
        st = self.state.pop((mb, layer))
        sends = self._send_back(st, lambda batch: grad_of(batch.inp))
        # The previous request's sends are surely wanted by now; this one's may wait (the step's
        # last until its end), so at most two requests' buffers stay alive.
        self.wait_sends(self.unsent, WAIT_ATTENTION)
        self.unsent = sends

    def _arrivals(self, batches: List["_Batch"]) -> Iterator[torch.Tensor]:
        """The exchange's chunks as they arrive, in source order (each sorted by expert); each
        source's chunks form one block."""
        blocks: List[Tuple[int, List[torch.Tensor]]] = []
        for ch in (ch for batch in batches for ch in batch.chunks):
            if not blocks or blocks[-1][0] != ch.src:
                blocks.append((ch.src, []))
            blocks[-1][1].append(torch.empty(ch.rows, self.hidden, dtype=self.transfer_dtype, device=self.torch_device))
        return self.transport.receive_blocks(blocks, self._waiting)

    def _take(self, arriving: Iterator[torch.Tensor], batch: "_Batch", share: float):
        """The batch's rows (source order), and when each chunk's result is ready on the device:
        its ``share`` of the modelled stage is queued as it arrives."""
        parts, ready = [], []
        for ch in batch.chunks:
            parts.append(next(arriving))
            ready.append(self.device.queue(MOE_COMPUTE, share * ch.modelled_s))
        return torch.cat(parts), ready

    def _send_back(self, st, expert_major_of) -> List:
        """Each batch's results (``expert_major_of(batch)``), back in source order, sent chunk by
        chunk to their sources: sources in rank order, each source's chunks in order."""
        outbox = self.transport.outbox(st["chunks_per_source"])
        sends = []
        for batch in st["batches"]:
            expert_major = expert_major_of(batch).to(self.transfer_dtype)
            source_major = torch.empty_like(expert_major)
            source_major[batch.perm] = expert_major
            blocks = torch.split(source_major, [ch.rows for ch in batch.chunks])
            sends += [handle for block, ch, at in zip(blocks, batch.chunks, batch.ready)
                      for handle in outbox.put(block, ch.src, self.modelled_bytes(ch.rows), at)]
        return sends


class _Chunk:
    """Rows of one source's chunk: its source and how many belong to each local expert."""

    def __init__(self, src: int, per_expert: List[int]):
        self.src, self.per_expert = src, per_expert
        self.rows = sum(per_expert)
        self.modelled_s = 0.0  # modelled device seconds of its rows' stage (fwd + bwd)


class _Batch:
    """Consecutive chunks computed together, regrouped expert-major by ``perm``: a stable sort of
    their rows (in source order) by ``expert_of_row``, on the device."""

    def __init__(self, chunks: List[_Chunk], expert_of_row: torch.Tensor):
        self.chunks = chunks
        self.perm = torch.argsort(expert_of_row, stable=True)
        self.per_expert = [sum(col) for col in zip(*(ch.per_expert for ch in chunks))]
        self.inp = self.out = None
        self.ready: List = []  # when each chunk's result is ready on the device


def _chunk_counts(per_expert: List[int], chunk_rows: int) -> List[List[int]]:
    """A source's rows (sorted by expert, ``per_expert`` of each) cut into ``chunk_sizes``
    chunks: each chunk's count per expert."""
    out: List[List[int]] = []
    bounds: List[Tuple[int, int]] = []
    start = 0
    for n in per_expert:
        bounds.append((start, start + n))
        start += n
    lo = 0
    for size in chunk_sizes(start, chunk_rows):
        hi = lo + size
        out.append([max(0, min(hi, b) - max(lo, a)) for a, b in bounds])
        lo = hi
    return out
