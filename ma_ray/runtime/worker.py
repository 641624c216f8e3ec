"""The worker actor: one per GPU, pinned to its placement-group bundle, hosting one role.

The actor outlives roles: when the split changes, the same actor (same GPU) is handed a new
plan and becomes a worker of either pool. The driver calls it once per step; activations and
gradients travel between workers only.
"""

from __future__ import annotations

from typing import Dict, Optional

import ray
import torch


@ray.remote
class Worker:
    def __init__(self, torch_threads: Optional[int] = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        # The device comes from torch: an emulated Ray GPU has no CUDA device behind it.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.role = None
        self.links = None

    def setup(self, cfg, plan, slot, job: str, generation: int, dataset) -> dict:
        """Become the worker of ``plan`` at ``slot`` (node, local GPU) and join its groups."""
        from ma_ray.comm.cpu_backend import ensure_registered
        from ma_ray.runtime.attention_role import AttentionRole
        from ma_ray.runtime.links import Links
        from ma_ray.runtime.moe_role import MoERole

        ensure_registered()
        me = plan.at_slot(slot)
        timeout = cfg.comm.synchronization_timeout_ms
        self.links = Links(job, generation, plan, me, timeout, max(timeout, 60_000))
        if me.is_attention:
            self.role = AttentionRole(cfg, plan, me, self.links, self.device, dataset)
        else:
            self.role = MoERole(cfg, plan, me, self.links, self.device)
        return {"gpu": me.gpu, "role": me.role, "device": str(self.device),
                "ray_gpu_ids": ray.get_gpu_ids(), "node_ip": ray.util.get_node_ip_address()}

    def train_step(self, step: int) -> dict:
        return self.role.train_step(step)

    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        return self.role.export(which, key)

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.role = self.links = None
