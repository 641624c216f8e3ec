"""One set of a job's workers: the placement group, the worker group (one actor per GPU slot,
``runtime.worker_group``), and the plan they run. A job (``control.controller``) has one at a
time; a restart builds a new set, a move keeps the set and gives it a new plan.

It only moves scalars (losses, timings): tensors cross between workers through the collective
groups. ``export`` is the exception, for verification: it gathers parameters, gradients or
optimizer moments by global name. Every call to the workers goes through the worker group, so
every wait is bounded and a failure names the workers it happened on.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Dict, List, Optional

import ray
import torch

from ma_ray.comm.torch_backend import strict_requested
from ma_ray.parallel.diff import diff_plans
from ma_ray.parallel.placement import make_plan, plan_of_move
from ma_ray.runtime import residuals
from ma_ray.runtime.cluster import reserve_gpus
from ma_ray.runtime.links import generation_groups, worker_name
from ma_ray.runtime.migration import plan_shipments
from ma_ray.runtime.step_metrics import summarize
from ma_ray.runtime.worker import Worker
from ma_ray.runtime.worker_group import WorkerGroup

CLOSE_TIMEOUT_S = 30.0  # shutting down is best effort: the actors are killed after it


class WorkerSet:
    def __init__(self, cfg, dataset, name: str | None = None, torch_threads: int | None = None,
                 checkpoint: str | None = None, generation: int = 0):
        """Workers for ``cfg`` at its split. ``name``: the placement group's name and the prefix
        of the collective groups' names; ``generation``: the number of its first groups, past any
        a dead set held (docs/architecture.md#lifetimes-and-their-names). A move (``move_to``)
        changes ``plan``, never ``cfg``."""
        if strict_requested(cfg.comm.strict_nccl) and not cfg.comm.strict_nccl:
            cfg = cfg.replace(**{"comm.strict_nccl": True})  # MA_RAY_STRICT_NCCL=1 reaches every worker
        self.cfg = cfg
        self.name = name or f"ma-{uuid.uuid4().hex[:8]}"
        self.plan = make_plan(cfg)
        self.generation = generation
        self._shut = False
        self.pg = reserve_gpus(cfg.cluster, self.name)
        c = cfg.cluster
        # Every replica's slots: replica r's nodes are r * num_nodes onwards (Plan.for_replica).
        self.slots = list(itertools.product(range(c.replicas * c.num_nodes), range(c.gpus_per_node)))
        sync_s = cfg.comm.synchronization_timeout_ms / 1000
        self.workers = WorkerGroup(Worker, self.pg, self.slots, cfg.control.worker_timeout_s, 2 * sync_s + 5,
                                   self._describe, actor_args=(torch_threads,), settle_s=sync_s + 1)
        try:
            self._dataset_ref = ray.put(dataset)
            self.workers.become(lambda slot: ((self.cfg, self.plan, slot, self.name, self.generation,
                                               self._dataset_ref), {"checkpoint": checkpoint}))
        except BaseException:
            self.shutdown()  # nothing of a job that did not start stays on the cluster
            raise

    @property
    def plans(self):
        """Every replica's plan, replica 0 (``self.plan``) first."""
        return self.plan.replica_plans()

    def _describe(self, slot) -> str:
        """A slot's worker as errors name it: its place and its role in the current plan."""
        return f"{worker_name(*slot)} ({self.plan.replica_at(slot).at_slot(slot).role})"

    def move_to(self, target: int, timeout_s: Optional[float] = None) -> dict:
        """Move to ``target`` attention GPUs: heads, experts and their AdamW moments go
        from their old to their new owners (worker to worker), GPUs whose role changes become
        workers of the other pool, and the collective groups are rebuilt. Only what moves
        travels (``migration.plan_shipments``): every old worker cuts exactly the names its new
        holders lack, one object per shipment, and what a worker keeps stays in place. Returns
        what moved, the bytes each worker received from each other (``received_bytes``) and the
        pause it cost. ``timeout_s`` bounds the workers' move (default ``control.worker_timeout_s``)."""
        # The policy's range may have been changed at run time; the caller checked it.
        new_plan = plan_of_move(self.cfg, target)
        t0 = time.perf_counter()
        diff = diff_plans(self.plan, new_plan)
        if diff.is_empty:
            return {"attention_gpus": target, "pause_s": 0.0, "moved_heads": 0, "moved_experts": 0,
                    "shipped_bytes": 0, "received_bytes": {}}
        # Each replica's workers trade among themselves, worker to worker, all replicas at once.
        shipments = [s for old, new in zip(self.plans, new_plan.replica_plans())
                     for s in plan_shipments(self.cfg, old, new)]
        outgoing = {slot: [s for s in shipments if s.src == slot] for slot in self.slots}
        refs = self.workers.export_for(lambda slot: ((outgoing[slot],), {}))
        incoming: Dict[tuple, list] = {slot: [] for slot in self.slots}
        for src, sent in outgoing.items():
            for shipment, ref in zip(sent, refs[src]):
                for dst in shipment.dsts:
                    incoming[dst].append((src, ref))
        # Gradient compression's residuals belong to nodes: each old attention worker's go to
        # the new workers of its node (runtime.residuals).
        residual_refs = self.workers.export_residuals()
        old_attention = [(g.slot, residual_refs[g.slot][0]) for copy in self.plans for g in copy.attention_workers()]
        old_plan, old_generation = self.plan, self.generation
        self.generation += 1
        answers = self.workers.become(lambda slot: ((self.cfg, new_plan, slot, self.name, self.generation,
                                                     self._dataset_ref, incoming[slot]),
                                                    {"carry": True, "residual_parts": old_attention}),
                                     timeout_s=timeout_s)
        del refs, incoming, residual_refs, old_attention  # the shipped objects leave the store
        self.plan = new_plan
        self._release_rendezvous_actors(old_generation, old_plan)
        received = {worker_name(*slot): answer["loaded_bytes"] for slot, answer in sorted(answers.items())
                    if answer["loaded_bytes"]}
        return {"attention_gpus": target, "pause_s": time.perf_counter() - t0,
                "moved_heads": len(diff.head_moves), "moved_experts": len(diff.expert_moves),
                "role_changes": len(diff.role_changes),
                "shipped_bytes": sum(n for by_src in received.values() for n in by_src.values()),
                "received_bytes": received}

    def _release_rendezvous_actors(self, generation: int, plan) -> int:
        """Kill the detached rendezvous actors Ray's NCCL groups of ``generation`` left behind;
        returns how many. Ray's NCCL group makes one per communicator, named by a digest of its
        key and the group name (``ray.util.collective``: ``get_store_name("<key>@<group>")``,
        key ``"<gpu>"`` for the collectives, ``"<lower rank>_<gpu>:<higher rank>_<gpu>"`` for
        a pair), created by the pair's lower rank, and only rank 0's destroy removes those it
        created itself. The group names are ``runtime.links``'s. ma-ray's own backend (nccl, gloo) makes none."""
        from ray.util.collective.const import get_store_name

        gpus = range(max(1, self.cfg.cluster.gpus_per_node))  # the device index a worker's tensors have
        wanted = set()
        for group, size in generation_groups(self.name, generation, plan, self.cfg.comm.hierarchical_allreduce).items():
            keys = [str(g) for g in gpus]
            keys += [f"{lo}_{a}:{hi}_{b}" for lo in range(size) for hi in range(lo + 1, size) for a in gpus for b in gpus]
            wanted.update(get_store_name(f"{key}@{group}") for key in keys)
        killed = 0
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"] in wanted:
                try:
                    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
                    killed += 1
                except ValueError:  # gone meanwhile
                    pass
        return killed

    def step(self, step: int, timeout_s: Optional[float] = None):
        """Run one optimizer step on every worker within ``timeout_s`` (default
        ``control.worker_timeout_s``); returns the step's metrics."""
        results = self.workers.train_step(step, timeout_s=timeout_s)
        return summarize(self.cfg, self.plan, [results[g.slot] for copy in self.plans for g in copy.gpus])

    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        """Every global tensor once, as replica 0 holds it."""
        return self.export_replicas(which, key)[0]

    def export_replicas(self, which: str = "param", key: str = "") -> List[Dict[str, torch.Tensor]]:
        """Every global tensor once per replica, as that replica holds it: replicated
        attention-side tensors from its attention rank 0."""
        parts = self.workers.export(which, key)
        out: List[Dict[str, torch.Tensor]] = []
        for copy in self.plans:
            tensors: Dict[str, torch.Tensor] = {}
            for g in copy.gpus:
                for name, tensor in parts[g.slot].items():
                    tensors.setdefault(name, tensor)
            out.append(tensors)
        return out

    def residuals_by_node(self) -> Dict[int, torch.Tensor]:
        """Gradient compression's residuals, each node's as one vector over the flat replicated
        gradients (as far as its parts reach; zeros where a piece has none yet): their
        layout-independent form (``runtime.residuals``)."""
        refs = self.workers.export_residuals()
        parts = [part for copy in self.plans for g in copy.attention_workers()
                 for part in ray.get(refs[g.slot][0], timeout=60)]
        numel = max((stop for _, _, stop, _ in parts), default=0)
        return {node: residuals.assemble({0: range(numel)}, parts, {node})[0]
                for node in sorted({node for node, *_ in parts})}

    def save_shards(self, folder: str, timeout_s: Optional[float] = None) -> Dict[str, dict]:
        """Each worker writes what it is the single source of into ``folder`` within ``timeout_s``
        (default ``control.worker_timeout_s``); returns each file's record by its path in the
        folder (``Worker.save_shard``)."""
        records = [r for written in self.workers.save_shard(folder, timeout_s=timeout_s).values() for r in written]
        return {r["file"]: {k: v for k, v in r.items() if k != "file"} for r in records}

    def shutdown(self, timeout_s: Optional[float] = CLOSE_TIMEOUT_S) -> None:
        """Close and kill every worker and free the placement group; a second call does nothing."""
        if self._shut:
            return
        self._shut = True
        try:
            self.workers.close(timeout_s=timeout_s)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        self.workers.kill()
        self._release_rendezvous_actors(self.generation, self.plan)  # the last generation's too
        ray.util.remove_placement_group(self.pg)
