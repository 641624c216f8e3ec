"""A worker's collective groups, built from the plan, and the few operations the roles use.

Groups of one generation of the plan:
  ``{job}-g{gen}-world``: every worker, rank = global GPU id. Carries the point-to-point traffic
      between the attention and MoE pools and the global gradient-norm all-reduce.
  ``{job}-g{gen}-attn``: the attention pool, rank = pool rank. Carries the token all-gathers,
      the reduce-scatter of the heads' partial outputs and the replicated gradients' all-reduce.
A rebalance tears a generation down and builds the next one.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ma_ray.comm import groups
from ma_ray.comm.uneven import allgather_uneven, reducescatter_uneven


def worker_name(node: int, local_gpu: int) -> str:
    return f"node{node}-gpu{local_gpu}"


class Links:
    def __init__(self, job: str, generation: int, plan, me, timeout_ms: int, init_timeout_ms: int,
                 backend: Optional[str] = None, strict: bool = False):
        """``strict``: the CPU backend's strict NCCL mode (``comm.cpu_backend``)."""
        self.world = f"{job}-g{generation}-world"
        self.attn = f"{job}-g{generation}-attn" if me.is_attention else None
        names = [worker_name(g.node, g.local_gpu) for g in plan.gpus]
        # Every member creates the groups in the same order: world first, then its pool's.
        groups.create_group(self.world, names, me.gpu, timeout_ms=timeout_ms,
                            init_timeout_ms=init_timeout_ms, generation=generation, backend=backend,
                            strict=strict)
        if self.attn is not None:
            attn_names = [worker_name(g.node, g.local_gpu) for g in plan.attention_workers()]
            groups.create_group(self.attn, attn_names, me.rank, timeout_ms=timeout_ms,
                                init_timeout_ms=init_timeout_ms, generation=generation, backend=backend,
                                strict=strict)

    def close(self) -> None:
        for name in (self.attn, self.world):
            if name is not None:
                groups.destroy_group(name)

    # -- attention pool ---------------------------------------------------------------------

    def gather_tokens(self, local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """All-gather token slices into the whole micro-batch (slices are contiguous, in order)."""
        return torch.cat(allgather_uneven(local.contiguous(), self.attn, sizes))

    def scatter_tokens(self, full: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Sum ``full`` over the pool and keep this worker's token slice."""
        return reducescatter_uneven(full.contiguous(), sizes, self.attn)

    def allreduce_attention(self, tensor: torch.Tensor) -> None:
        groups.allreduce(tensor, self.attn)

    # -- whole job --------------------------------------------------------------------------

    def allreduce_world(self, tensor: torch.Tensor) -> None:
        groups.allreduce(tensor, self.world)

    def isend(self, tensor: torch.Tensor, dst_gpu: int):
        return groups.isend(tensor, dst_gpu, self.world)

    def irecv(self, tensor: torch.Tensor, src_gpu: int):
        return groups.irecv(tensor, src_gpu, self.world)
