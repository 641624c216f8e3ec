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
from ma_ray.comm.compression import CompressionSettings
from ma_ray.comm.cross_node import cross_node_reducer
from ma_ray.comm.torch_backend import ensure_registered
from ma_ray.parallel.emulation import compute_setup
from ma_ray.runtime import residuals
from ma_ray.runtime.attention_role import AttentionRole
from ma_ray.runtime.device import ModelledDevice, RealDevice
from ma_ray.runtime.links import Links, worker_name
from ma_ray.runtime.checkpoint import CheckpointError, file_digest, read_shard_index, shard_file
from ma_ray.runtime.migration import (SHARD_RESIDUAL, TENSOR_KEYS, from_wire, names_of, owned_names, payload_bytes,
                                      restrict, to_wire)
from ma_ray.runtime.moe_role import MoERole
from ma_ray.runtime.step_metrics import WorkerStepResult
from ma_ray.runtime.timing import COMPRESSION
from ma_ray.runtime.transport import ChunkTransport, ModelledBlockTransport
from ma_ray.runtime.worker_group import ONE_TO_ALL, PER_SLOT, dispatch
from ma_ray.errors import first_line
from ma_ray.storage import storage_error

LOOPBACK = "127.0.0.1"


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
               state_parts: Sequence = (), checkpoint: Optional[str] = None, carry: bool = False,
               residual_parts: Sequence = ()) -> dict:
        """Be the worker of ``plan`` at ``slot`` (node, local GPU): join the plan's groups, build
        the role, and fill its state: with ``carry`` (a change of split), what this worker's
        current role holds of the new one's names stays in place and ``state_parts``,
        ``(source slot, reference)`` pairs of ``export_for`` payloads, bring the rest, and
        ``residual_parts``, pairs of ``export_residuals`` payloads, gradient compression's
        residuals; from a checkpoint folder, only the names it holds and its node's residuals;
        with neither, from the seed. The answer says how many bytes came from where
        (``loaded_bytes``: source worker or shard -> bytes). ``plan``: any replica's; the
        worker runs its slot's replica's."""
        plan = plan.replica_at(slot)
        old = self.role if carry else None
        if old is not None and old.me.is_attention != plan.at_slot(slot).is_attention:
            old.release()  # a role of the other pool keeps nothing: free it before the new one is built
            old = None
        self.close()
        ensure_registered()
        modelled = cfg.emulation.modelled_compute
        device_clock = modelled and cfg.emulation.device_clock
        # The plan and the waits follow ``cfg``; the tensors, what the workers compute with.
        cfg, durations = compute_setup(cfg)
        self.cfg = cfg
        me = plan.at_slot(slot)
        timeout = cfg.comm.synchronization_timeout_ms
        backend = backend_for_device(cfg.comm.backend, self.torch_device)
        c = cfg.comm
        device = ModelledDevice(self.torch_device, keep_clock=device_clock) if modelled else RealDevice(
            self.torch_device, c.attention_stream_priority if me.is_attention else c.moe_stream_priority)
        def reducer():
            return cross_node_reducer(c.gradient_compression,
                                      CompressionSettings.of(c),
                                      timed=lambda: device.compute(COMPRESSION),
                                      warmup_steps=c.compression_warmup_steps)
        # An emulated cluster is this machine: its groups listen on loopback only.
        self.links = Links(job, generation, plan, me, timeout, max(timeout, 60_000), backend,
                           strict=c.strict_nccl, hierarchical=c.hierarchical_allreduce, reducer=reducer(),
                           counterpart_reducer=reducer() if plan.replicas > 1 else None,
                           listen_host=LOOPBACK if cfg.cluster.fake_gpus else None)
        if device_clock and me.is_attention:  # the pool's collectives start at its latest member's clock
            device.pool_clock = lambda mine: self.links.pool_max(mine, self.torch_device)
        s = cfg.schedule
        # Rows per transferred chunk: communication_chunk_size tokens at the configured shapes.
        chunk_rows = max(1, round(s.communication_chunk_size / durations.token_scale))
        if modelled:
            transport = ModelledBlockTransport(
                self.links, s.max_concurrent_communications, chunk_rows,
                lambda src: durations.bandwidth(plan.gpus[src].node == me.node), device.ready_at, device.arrived)
        else:
            transport = ChunkTransport(self.links, s.max_concurrent_communications, chunk_rows)
        if me.is_attention:
            self.role = AttentionRole(cfg, plan, me, self.links, device, transport, durations, dataset)
        else:
            self.role = MoERole(cfg, plan, me, self.links, device, transport, durations)
        loaded: Dict[str, int] = {}
        # Residuals are summed over every replica's nodes (runtime.links: the replicated
        # gradients' all-reduce spans them), so a node of any replica may take a lost node's.
        attention_nodes = [g.node for copy in plan.replica_plans() for g in copy.attention_workers()]
        if checkpoint is not None:
            names = names_of(cfg, me)
            self.role.load_state(_read_checkpoint(checkpoint, names, loaded))
            nodes = residuals.taken_nodes(me.node, attention_nodes, attention_nodes[0],
                                          residuals.old_nodes_in(Path(checkpoint)))
            self.role.load_residuals(residuals.read(Path(checkpoint), nodes) if me.is_attention else [], nodes)
            replicas = residuals.taken_replicas(plan.replica, plan.replicas, residuals.saved_replicas(Path(checkpoint)))
            for part in residuals.read_sharded(Path(checkpoint), replicas, names):
                self.role.add_shard_residuals(part)
        elif carry:
            # The residuals of what this worker keeps stay with it: their views are taken while
            # the old role's parameters still have their shapes (loading releases them).
            kept = old.shard_residuals() if old is not None else {}
            self.role.load_state(_fetched(state_parts, loaded, self.role.add_shard_residuals), keep=old)
            self.role.add_shard_residuals(kept)
            del kept
            nodes = residuals.taken_nodes(me.node, attention_nodes, attention_nodes[0],
                                          {src[0] for src, _ in residual_parts})
            self.role.load_residuals([part for src, ref in residual_parts if src[0] in nodes and me.is_attention
                                      for part in ray.get(ref)], nodes)
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
        payloads = tuple(to_wire({**self.role.state_views(set(s.names)),
                                  SHARD_RESIDUAL: self.role.shard_residuals(set(s.names))}) for s in shipments)
        return payloads[0] if len(payloads) == 1 else (payloads or None)

    @dispatch(ONE_TO_ALL, "residual export", blocking=False, num_returns=lambda: 1)
    def export_residuals(self) -> list:
        """Gradient compression's residuals this worker holds, as ``runtime.residuals`` parts."""
        return self.role.residual_parts()

    @dispatch(ONE_TO_ALL, "train step")
    def train_step(self, step: int) -> WorkerStepResult:
        return self.role.train_step(step)

    @dispatch(ONE_TO_ALL, "export")
    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        return self.role.export(which, key)

    @dispatch(ONE_TO_ALL, "checkpoint save")
    def save_shard(self, folder: str) -> list:
        """Write the state this worker is the single source of into ``folder``; returns a record
        per file written (``checkpoint.save``): the shard's and, with gradient compression, its
        residuals' (``runtime.residuals``), each with its path in the folder, tensor bytes, file
        bytes and SHA-256.
        Views are written as they are: ``torch.save`` writes each storage once, and the names a
        worker owns cover its storages whole, so nothing is cloned on the way."""
        me = self.role.me
        # Every replica holds the same state: replica 0 writes it; each writes its residuals.
        state = self.role.state_views(owned_names(self.cfg, me)) if self.role.plan.replica == 0 else None
        if state is not None and self.torch_device.type != "cpu":
            state = {**{key: {n: t.to("cpu") for n, t in state[key].items()} for key in TENSOR_KEYS},
                     "optimizer_steps": state["optimizer_steps"]}
        path = Path(folder) / shard_file(worker_name(me.node, me.local_gpu))
        tmp = path.with_suffix(".pt.tmp")
        written = []
        try:
            if state is not None:
                torch.save(state, tmp)
                os.replace(tmp, path)
                written.append((path, payload_bytes(state)))
            written.append(residuals.save(Path(folder), me.node, me.local_gpu, self.role.residual_parts()))
            written.append(residuals.save_sharded(Path(folder), self.role.plan.replica, me.node, me.local_gpu,
                                                  self.role.shard_residuals()))
        except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError for a full disk
            raise storage_error(path, exc) from None
        written = [w for w in written if w is not None]
        return [{"file": file.relative_to(folder).as_posix(), "bytes": tensor_bytes, "file_bytes": file.stat().st_size,
                 "sha256": file_digest(file)} for file, tensor_bytes in written]

    @dispatch(ONE_TO_ALL, "close")
    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.role = self.links = None


def _fetched(parts: Sequence, loaded: Dict[str, int], take_residuals) -> Iterator[dict]:
    """The payloads of ``(source slot, reference)`` pairs, fetched one at a time (each mapped
    from the object store, read, then dropped); counts their bytes into ``loaded`` and hands
    their sharded residuals to ``take_residuals``."""
    for src, ref in parts:
        part = from_wire(ray.get(ref))
        name = worker_name(*src)
        loaded[name] = loaded.get(name, 0) + payload_bytes(part)
        take_residuals(part.pop(SHARD_RESIDUAL))
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
        try:
            whole = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch's errors for a bad file are many and long
            raise CheckpointError(f"checkpoint {path}: unreadable ({first_line(exc)})") from None
        part = restrict(whole, names)
        if any(part[key] for key in TENSOR_KEYS):
            loaded[path.name] = payload_bytes(part)
            yield part
