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
from typing import Dict, Iterator, Optional, Sequence

import ray
import torch

from ma_ray.comm.backend import backend_for_device
from ma_ray.comm.cpu_backend import ensure_registered
from ma_ray.parallel.emulation import compute_setup
from ma_ray.runtime.attention_role import AttentionRole
from ma_ray.runtime.device import ModelledDevice, RealDevice
from ma_ray.runtime.links import Links, worker_name
from ma_ray.runtime.checkpoint import read_shard_index, shard_file
from ma_ray.runtime.migration import (TENSOR_KEYS, from_wire, names_of, owned_names, payload_bytes, restrict,
                                      to_wire)
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
        self.loaded_bytes: Dict[str, int] = {}  # what the last ``become`` read, from where

    @dispatch(PER_SLOT, "set-up")
    def become(self, cfg, plan, slot, job: str, generation: int, dataset,
               state_parts: Sequence = (), checkpoint: Optional[str] = None, carry: bool = False) -> dict:
        """Be the worker of ``plan`` at ``slot`` (node, local GPU): join the plan's groups, build
        the role, and fill its state: with ``carry`` (a change of split), what this worker's
        current role holds of the new one's names stays in place and ``state_parts``,
        ``(source slot, reference)`` pairs of ``export_for`` payloads, bring the rest; from a
        checkpoint folder, only the names it holds; with neither, from the seed. The answer
        says how many bytes came from where (``loaded_bytes``: source worker or shard -> bytes)."""
        old = self.role if carry else None
        if old is not None and old.me.is_attention != plan.at_slot(slot).is_attention:
            old.release()  # a role of the other pool keeps nothing: free it before the new one is built
            old = None
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
        loaded: Dict[str, int] = {}
        if checkpoint is not None:
            self.role.load_state(_read_checkpoint(checkpoint, names_of(cfg, me), loaded))
        elif carry:
            self.role.load_state(_fetched(state_parts, loaded), keep=old)
        else:
            self.role.initialize()
        del old
        self.loaded_bytes = loaded
        return {"gpu": me.gpu, "role": me.role, "device": str(self.torch_device),
                "ray_gpu_ids": ray.get_gpu_ids(), "node_ip": ray.util.get_node_ip_address(),
                "loaded_bytes": loaded}

    @dispatch(PER_SLOT, "migration export", blocking=False, num_returns=lambda shipments: len(shipments))
    def export_for(self, shipments: Sequence):
        """The payload of each of this worker's ``migration.Shipment``s (one return value each):
        exactly its names, as views on the wire (``migration.to_wire``), never a copy of what
        stays here."""
        payloads = tuple(to_wire(self.role.state_views(set(s.names))) for s in shipments)
        return payloads[0] if len(payloads) == 1 else (payloads or None)

    @dispatch(ONE_TO_ALL, "train step")
    def train_step(self, step: int) -> WorkerStepResult:
        return self.role.train_step(step)

    @dispatch(ONE_TO_ALL, "export")
    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        return self.role.export(which, key)

    @dispatch(ONE_TO_ALL, "checkpoint save")
    def save_shard(self, folder: str) -> int:
        """Write the state this worker is the single source of into ``folder``; returns bytes.
        Views are written as they are: ``torch.save`` writes each storage once, and the names a
        worker owns cover its storages whole, so nothing is cloned on the way."""
        me = self.role.me
        state = self.role.state_views(owned_names(self.cfg, me))
        if self.torch_device.type != "cpu":
            state = {**{key: {n: t.to("cpu") for n, t in state[key].items()} for key in TENSOR_KEYS},
                     "optimizer_steps": state["optimizer_steps"]}
        path = Path(folder) / shard_file(worker_name(me.node, me.local_gpu))
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return payload_bytes(state)

    @dispatch(ONE_TO_ALL, "close")
    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.role = self.links = None


def _fetched(parts: Sequence, loaded: Dict[str, int]) -> Iterator[dict]:
    """The payloads of ``(source slot, reference)`` pairs, fetched one at a time (each mapped
    from the object store, read, then dropped); counts their bytes into ``loaded``."""
    for src, ref in parts:
        part = from_wire(ray.get(ref))
        name = worker_name(*src)
        loaded[name] = loaded.get(name, 0) + payload_bytes(part)
        yield part


def _read_checkpoint(folder: str, names, loaded: Dict[str, int]) -> Iterator[dict]:
    """The parts of a checkpoint that hold any of ``names``, one shard at a time and only those
    names: a shard is mapped, not read (``torch.load(mmap=True)``), so only the bytes of the names
    taken are, and the checkpoint's ``shards.json`` says which shards to open at all (one written
    without it: every shard is opened, still reading only the names taken)."""
    names = set(names)
    index = read_shard_index(Path(folder))
    if index is None:
        shards = sorted(Path(folder).glob("*.pt"))
    else:
        shards = [Path(folder) / f for f, held in sorted(index.items()) if names.intersection(held)]
    for path in shards:
        part = restrict(torch.load(path, map_location="cpu", weights_only=True, mmap=True), names)
        if any(part[key] for key in TENSOR_KEYS):
            loaded[path.name] = payload_bytes(part)
            yield part
