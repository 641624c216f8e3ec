"""The MoE role: this worker's experts of every layer, computed for the rows the attention
workers route to them.

Each attention worker sends, per layer and micro-batch, a count per expert of this worker and
then its rows sorted by expert, in chunks of ``schedule.communication_chunk_size`` tokens. The worker
takes the chunks in source order and groups consecutive ones into compute batches of at least a
chunk's rows (a batch is one chunk at paper scale, everything at once when all sources together
send less than a chunk). Each batch is regrouped expert-major (one matmul per expert over the
batch's rows), computed, and its outputs go back chunk by chunk while the next batch arrives and
computes; backward does the same with gradients. Every row's result depends only on its own
input, so batching changes sums of parameter gradients only in their order (rounding). Each
source's chunks of an exchange form one block (``runtime.transfers``). Under emulation a block
is one message and one compute batch, while each chunk's device time is queued as it arrives
and its result is stamped with when that is done.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ma_ray.model.experts import ExpertGroup
from ma_ray.model.naming import prefixed
from ma_ray.parallel.emulation import FORWARD_SHARE
from ma_ray.parallel.placement import MOE
from ma_ray.runtime.role import Role, grad_of
from ma_ray.runtime.transfers import chunk_sizes


class ExpertStack(nn.Module):
    def __init__(self, cfg, experts):
        super().__init__()
        self.groups = nn.ModuleList(ExpertGroup(cfg.model, experts) for _ in range(cfg.model.num_layers))

    def global_slices(self):
        out = []
        for layer, group in enumerate(self.groups):
            out += prefixed(group.global_slices(layer), f"groups.{layer}")
        return out


class MoERole(Role):
    kind = MOE

    def __init__(self, cfg, plan, me, links, device, durations=None):
        stack = ExpertStack(cfg, me.experts)
        super().__init__(cfg, plan, me, links, device, stack, stack.global_slices(), durations)
        self.stack = stack
        self.sources = [w.gpu for w in plan.attention_workers()]
        self.num_local = len(me.experts)
        self.hidden = cfg.model.hidden_size
        self.checkpointing = cfg.train.activation_checkpointing and device.type == "cuda"

    def begin_step(self, step: int) -> None:
        self.state: Dict = {}
        self.unsent: List = []  # the last input-gradient sends, waited for at the step's end

    def end_micro_batches(self):
        self.wait_sends(self.unsent, "wait_attention")
        return {}

    def _waiting(self):
        return self.timer.wait("wait_attention")

    def expert_recv(self, mb: int, layer: int) -> None:
        """Every source's row count per local expert; plans the chunks and compute batches."""
        counts = [torch.empty(self.num_local, dtype=torch.int64, device=self.device) for _ in self.sources]
        for _ in self.transfers.receive(list(zip(counts, self.sources)), self._waiting):
            pass
        chunks = [_Chunk(src, per_expert) for src, c in zip(self.sources, counts)
                  for per_expert in _chunk_counts(c.tolist(), self.chunk_rows)]
        if self.durations is not None:
            total = sum(ch.rows for ch in chunks)
            stage = self.durations.moe_stage_s(self.num_local, total * self.durations.token_scale)
            for chunk in chunks:
                chunk.emulated_s = stage * chunk.rows / total
        batches, current = [], []
        for i, chunk in enumerate(chunks):
            current.append(chunk)
            if self.durations is None:
                full = sum(ch.rows for ch in current) >= self.chunk_rows
            else:
                # Emulated device time is queued chunk by chunk as each arrives (``_take``), so
                # the stand-in arithmetic may run a source's whole block at once: its host cost
                # per batch is not what a GPU pays, and at paper scale a chunk is one stand-in row.
                full = i + 1 == len(chunks) or chunks[i + 1].src != chunk.src
            if full:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
        self.state[mb, layer] = dict(batches=[_Batch(b, self.device) for b in batches],
                                     chunks_per_source=Counter(ch.src for ch in chunks))

    def expert_fwd(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer]
        group = self.stack.groups[layer]
        arriving = self._arrivals(st["batches"])
        outbox = self.transfers.outbox(st["chunks_per_source"])
        sends = []
        for batch in st["batches"]:
            rows, ready = self._take(arriving, batch, FORWARD_SHARE)
            inp = rows.index_select(0, batch.perm).requires_grad_()
            with self.compute("moe"), self._autocast():
                out = (checkpoint(group, inp, batch.per_expert, use_reentrant=False) if self.checkpointing
                       else group(inp, batch.per_expert))
            batch.inp, batch.out = inp, out
            sends += self._send_back(out.detach(), batch, outbox, ready)
        st["sends"] = sends

    def expert_bwd(self, mb: int, layer: int) -> None:
        st = self.state.pop((mb, layer))
        self.wait_sends(st["sends"], "wait_attention")
        arriving = self._arrivals(st["batches"])
        outbox = self.transfers.outbox(st["chunks_per_source"])
        sends = []
        for batch in st["batches"]:
            grad_out, ready = self._take(arriving, batch, 1 - FORWARD_SHARE)
            with self.compute("moe"):
                torch.autograd.backward(batch.out, grad_out.index_select(0, batch.perm).to(batch.out.dtype))
            sends += self._send_back(grad_of(batch.inp), batch, outbox, ready)
        # The previous request's sends are surely wanted by now; this one's may wait (the step's
        # last until its end), so at most two requests' buffers stay alive.
        self.wait_sends(self.unsent, "wait_attention")
        self.unsent = sends

    def _arrivals(self, batches: List["_Batch"]) -> Iterator[torch.Tensor]:
        """The exchange's chunks as they arrive, in source order (each sorted by expert); each
        source's chunks form one block."""
        blocks: List[Tuple[int, List[torch.Tensor]]] = []
        for ch in (ch for batch in batches for ch in batch.chunks):
            if not blocks or blocks[-1][0] != ch.src:
                blocks.append((ch.src, []))
            blocks[-1][1].append(torch.empty(ch.rows, self.hidden, dtype=self.transfer_dtype, device=self.device))
        return self.transfers.receive_blocks(blocks, self._waiting)

    def _take(self, arriving: Iterator[torch.Tensor], batch: "_Batch", share: float):
        """The batch's rows (source order), and when each chunk's result is ready on the emulated
        device: its ``share`` of the stage is queued as it arrives (None computing for real)."""
        parts, ready = [], []
        for ch in batch.chunks:
            parts.append(next(arriving))
            ready.append(self.queue_device("moe", share * ch.emulated_s))
        return torch.cat(parts), ready

    def _send_back(self, expert_major: torch.Tensor, batch: "_Batch", outbox, ready: List) -> List:
        """Undo the expert-major regrouping and send each chunk back to its source."""
        expert_major = expert_major.to(self.transfer_dtype)
        source_major = torch.empty_like(expert_major)
        source_major[batch.perm] = expert_major
        blocks = torch.split(source_major, [ch.rows for ch in batch.chunks])
        return [handle for block, ch, at in zip(blocks, batch.chunks, ready)
                for handle in outbox.put(block, ch.src, self.modelled_bytes(ch.rows), at)]


class _Chunk:
    """Rows of one source's chunk: its source and how many belong to each local expert."""

    def __init__(self, src: int, per_expert: List[int]):
        self.src, self.per_expert = src, per_expert
        self.rows = sum(per_expert)
        self.emulated_s = 0.0  # device seconds of its rows' stage (fwd + bwd), under emulation


class _Batch:
    """Consecutive chunks computed together, regrouped expert-major by ``perm``."""

    def __init__(self, chunks: List[_Chunk], device: torch.device):
        self.chunks = chunks
        num_local = len(chunks[0].per_expert)
        expert_of_row = torch.cat([torch.repeat_interleave(torch.arange(num_local), torch.tensor(ch.per_expert))
                                   for ch in chunks])
        self.perm = torch.argsort(expert_of_row, stable=True).to(device)
        self.per_expert = [sum(col) for col in zip(*(ch.per_expert for ch in chunks))]
        self.inp = self.out = None


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
