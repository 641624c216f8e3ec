"""The worker actor: one per GPU, pinned to its placement-group bundle, hosting one role.

The actor outlives roles: when the split changes, the same actor (same GPU) is handed the new
plan and the state it needs, and becomes a worker of either pool. When it takes a role it builds
its seams once: the device and the transport (``runtime.device``, ``runtime.transport``) for real
or modelled compute, and the modelled durations (all zeros computing for real). This is the one
place that asks which. The driver calls it through ``runtime.worker_group`` (each method below
declares how a group call is spread); activations and gradients travel between workers only, and
migrated state travels from worker to worker through the object store (the driver passes
references, not tensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import ray
import torch

from ma_ray.comm.backend import backend_for_device
from ma_ray.comm.cpu_backend import ensure_registered
from ma_ray.parallel.emulation import compute_setup
from ma_ray.runtime.attention_role import AttentionRole
from ma_ray.runtime.device import ModelledDevice, RealDevice
from ma_ray.runtime.links import Links, worker_name
from ma_ray.runtime.migration import merge, names_of, owned_state, payload_bytes, restrict
from ma_ray.runtime.moe_role import MoERole
from ma_ray.runtime.step_metrics import WorkerStepResult
from ma_ray.runtime.transport import ChunkTransport, ModelledBlockTransport
from ma_ray.runtime.worker_group import ONE_TO_ALL, PER_SLOT, dispatch


class Worker:
    def __init__(self, torch_threads: Optional[int] = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        # The device comes from torch: an emulated Ray GPU has no CUDA device behind it.
        self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = None
        self.role = None
        self.links = None

    @dispatch(PER_SLOT, "set-up")
    def become(self, cfg, plan, slot, job: str, generation: int, dataset,
               state_parts: Sequence = (), checkpoint: Optional[str] = None) -> dict:
        """Be the worker of ``plan`` at ``slot`` (node, local GPU): join the plan's groups, build
        the role, and load its state from ``state_parts`` (references to payloads cut for this
        slot by ``export_for``) or from a checkpoint folder; with neither, start from the seed."""
        state = merge(ray.get(list(state_parts))) if state_parts else None
        if checkpoint is not None:
            state = _read_checkpoint(checkpoint)
        self.close()
        ensure_registered()
        modelled = cfg.emulation.modelled_compute
        # The plan and the waits follow ``cfg``; the tensors, what the workers compute with.
        cfg, durations = compute_setup(cfg)
        self.cfg = cfg
        me = plan.at_slot(slot)
        timeout = cfg.comm.synchronization_timeout_ms
        backend = backend_for_device(cfg.comm.backend, self.torch_device)
        self.links = Links(job, generation, plan, me, timeout, max(timeout, 60_000), backend,
                           strict=cfg.comm.strict_nccl)
        s = cfg.schedule
        # Rows per transferred chunk: communication_chunk_size tokens at the configured shapes.
        chunk_rows = max(1, round(s.communication_chunk_size / durations.token_scale))
        if modelled:
            device = ModelledDevice(self.torch_device)
            transport = ModelledBlockTransport(
                self.links, s.max_concurrent_communications, chunk_rows,
                lambda src: durations.bandwidth(plan.gpus[src].node == me.node), device.ready_at)
        else:
            device = RealDevice(self.torch_device)
            transport = ChunkTransport(self.links, s.max_concurrent_communications, chunk_rows)
        if me.is_attention:
            self.role = AttentionRole(cfg, plan, me, self.links, device, transport, durations, dataset)
        else:
            self.role = MoERole(cfg, plan, me, self.links, device, transport, durations)
        if state is not None:
            self.role.load_state(restrict(state, names_of(cfg, me)))
        return {"gpu": me.gpu, "role": me.role, "device": str(self.torch_device),
                "ray_gpu_ids": ray.get_gpu_ids(), "node_ip": ray.util.get_node_ip_address()}

    @dispatch(ONE_TO_ALL, "migration export", blocking=False, num_returns=lambda new_plan, slots: len(slots))
    def export_for(self, new_plan, slots: List) -> tuple:
        """This worker's state cut for each slot of ``new_plan`` (one return value per slot)."""
        mine = owned_state(self.cfg, self.role.me, self.role.export_state())
        return tuple(restrict(mine, names_of(self.cfg, new_plan.at_slot(slot))) for slot in slots)

    @dispatch(ONE_TO_ALL, "train step")
    def train_step(self, step: int) -> WorkerStepResult:
        return self.role.train_step(step)

    @dispatch(ONE_TO_ALL, "export")
    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        return self.role.export(which, key)

    @dispatch(ONE_TO_ALL, "checkpoint save")
    def save_shard(self, folder: str) -> int:
        """Write the state this worker is the single source of into ``folder``; returns bytes."""
        me = self.role.me
        state = owned_state(self.cfg, me, self.role.export_state())
        path = Path(folder) / f"{worker_name(me.node, me.local_gpu)}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return payload_bytes(state)

    @dispatch(ONE_TO_ALL, "close")
    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.role = self.links = None


def _read_checkpoint(folder: str) -> dict:
    shards = sorted(Path(folder).glob("*.pt"))
    return merge([torch.load(p, map_location="cpu", weights_only=True) for p in shards])
