"""The MoE role: this worker's experts of every layer, computed for the rows the attention
workers route to them.

Each attention worker sends, per layer and micro-batch, a count per expert of this worker and
its rows sorted by expert. The worker regroups all sources' rows expert-major (one matmul per
expert over every source's tokens), computes, and sends each source its outputs in the order it
sent them; backward does the same with gradients.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ma_ray.model.experts import ExpertGroup
from ma_ray.model.naming import prefixed
from ma_ray.runtime.role import Role, grad_of
from ma_ray.parallel.placement import MOE


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

    def __init__(self, cfg, plan, me, links, device):
        stack = ExpertStack(cfg, me.experts)
        super().__init__(cfg, plan, me, links, device, stack, stack.global_slices())
        self.stack = stack
        self.sources = [w.gpu for w in plan.attention_workers()]
        self.num_local = len(me.experts)
        self.hidden = cfg.model.hidden_size
        self.checkpointing = cfg.train.activation_checkpointing and device.type == "cuda"

    def begin_step(self, step: int) -> None:
        self.state: Dict = {}

    def expert_recv(self, mb: int, layer: int) -> None:
        counts = [torch.empty(self.num_local, dtype=torch.int64, device=self.device) for _ in self.sources]
        handles = [self.links.irecv(c, src) for c, src in zip(counts, self.sources)]
        with self.timer.wait("wait_attention"):
            for h in handles:
                h.wait()
        rows = [torch.empty(int(c.sum()), self.hidden, dtype=self.wire_dtype, device=self.device) for c in counts]
        handles = [self.links.irecv(r, src) for r, src in zip(rows, self.sources)]
        with self.timer.wait("wait_attention"):
            for h in handles:
                h.wait()
        # Expert-major order over all sources: a stable sort of the rows by local expert index.
        expert_of_row = torch.cat([torch.repeat_interleave(torch.arange(self.num_local, device=self.device), c)
                                   for c in counts])
        perm = torch.argsort(expert_of_row, stable=True)
        per_expert = torch.stack(counts).sum(dim=0).tolist()
        self.state[mb, layer] = dict(rows=torch.cat(rows), perm=perm, per_expert=per_expert,
                                     sizes=[r.shape[0] for r in rows])

    def expert_fwd(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer]
        group = self.stack.groups[layer]
        inp = st["rows"].index_select(0, st["perm"]).requires_grad_()
        with self.timer.measure("moe"), self._autocast():
            out = (checkpoint(group, inp, st["per_expert"], use_reentrant=False) if self.checkpointing
                   else group(inp, st["per_expert"]))
        st.update(inp=inp, out=out)
        del st["rows"]

    def expert_send(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer]
        st["sends"] = self._send_back(st["out"].detach(), st)

    def expert_grad_recv(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer]
        bufs = [torch.empty(n, self.hidden, dtype=self.wire_dtype, device=self.device) for n in st["sizes"]]
        handles = [self.links.irecv(b, src) for b, src in zip(bufs, self.sources)]
        with self.timer.wait("wait_attention"):
            for h in handles + st.pop("sends"):
                h.wait()
        st["grad_out"] = torch.cat(bufs).index_select(0, st["perm"]).to(st["out"].dtype)

    def expert_bwd(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer]
        with self.timer.measure("moe"):
            torch.autograd.backward(st["out"], st.pop("grad_out"))

    def expert_grad_send(self, mb: int, layer: int) -> None:
        st = self.state.pop((mb, layer))
        sends = self._send_back(grad_of(st["inp"]), st)
        with self.timer.wait("wait_attention"):
            for h in sends:
                h.wait()

    def _send_back(self, expert_major: torch.Tensor, st) -> List:
        """Undo the expert-major regrouping and send each source its block."""
        expert_major = expert_major.to(self.wire_dtype)
        source_major = torch.empty_like(expert_major)
        source_major[st["perm"]] = expert_major
        return [self.links.isend(block.contiguous(), dst)
                for block, dst in zip(torch.split(source_major, st["sizes"]), self.sources)]
