"""The driver's handle on a running MA-separated job: the placement group, the worker group (one
actor per GPU slot, ``runtime.worker_group``), and the plan they run.

It only moves scalars (losses, timings): tensors cross between workers through the collective
groups. ``export`` is the exception, for verification: it gathers parameters, gradients or
optimizer moments by global name. Every call to the workers goes through the worker group, so
every wait is bounded and a failure names the workers it happened on.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Dict, Optional

import ray
import torch

from ma_ray.comm.cpu_backend import strict_requested
from ma_ray.parallel.diff import diff_plans
from ma_ray.parallel.placement import make_plan
from ma_ray.runtime.cluster import reserve_gpus
from ma_ray.runtime.links import worker_name
from ma_ray.runtime.migration import plan_shipments
from ma_ray.runtime.step_metrics import summarize
from ma_ray.runtime.worker import Worker
from ma_ray.runtime.worker_group import WorkerGroup

CLOSE_TIMEOUT_S = 30.0  # shutting down is best effort: the actors are killed after it


class TrainingJob:
    def __init__(self, cfg, dataset, attention_gpus: int | None = None, name: str | None = None,
                 torch_threads: int | None = None, checkpoint: str | None = None):
        if strict_requested(cfg.comm.strict_nccl) and not cfg.comm.strict_nccl:
            cfg = cfg.replace(**{"comm.strict_nccl": True})  # MA_RAY_STRICT_NCCL=1 reaches every worker
        self.cfg = cfg
        self.name = name or f"ma-{uuid.uuid4().hex[:8]}"
        self.plan = make_plan(cfg, attention_gpus)
        self.generation = 0
        self.pg = reserve_gpus(cfg.cluster)
        c = cfg.cluster
        self.slots = list(itertools.product(range(c.num_nodes), range(c.gpus_per_node)))
        grace_s = 2 * cfg.comm.synchronization_timeout_ms / 1000 + 5
        self.workers = WorkerGroup(Worker, self.pg, self.slots, cfg.control.worker_timeout_s, grace_s,
                                   self._describe, actor_args=(torch_threads,))
        try:
            self._dataset_ref = ray.put(dataset)
            self.workers.become(lambda slot: ((self.cfg, self.plan, slot, self.name, self.generation,
                                               self._dataset_ref), {"checkpoint": checkpoint}))
        except BaseException:
            self.shutdown()  # nothing of a job that did not start stays on the cluster
            raise

    def _describe(self, slot) -> str:
        """A slot's worker as errors name it: its place and its role in the current plan."""
        return f"{worker_name(*slot)} ({self.plan.at_slot(slot).role})"

    def apply_split(self, attention_gpus: int) -> dict:
        """Move to ``attention_gpus`` attention GPUs: heads, experts and their AdamW moments go
        from their old to their new owners (worker to worker), GPUs whose role changes become
        workers of the other pool, and the collective groups are rebuilt. Only what moves
        travels (``migration.plan_shipments``): every old worker cuts exactly the names its new
        holders lack, one object per shipment, and what a worker keeps stays in place. Returns
        what moved, the bytes each worker received from each other (``received_bytes``) and the
        pause it cost."""
        # The policy's range may have been changed at run time; the caller checked it.
        new_plan = make_plan(self.cfg, attention_gpus, within_policy=False)
        t0 = time.perf_counter()
        diff = diff_plans(self.plan, new_plan)
        if diff.is_empty:
            return {"attention_gpus": attention_gpus, "pause_s": 0.0, "moved_heads": 0, "moved_experts": 0,
                    "shipped_bytes": 0, "received_bytes": {}}
        shipments = plan_shipments(self.cfg, self.plan, new_plan)
        outgoing = {slot: [s for s in shipments if s.src == slot] for slot in self.slots}
        refs = self.workers.export_for(lambda slot: ((outgoing[slot],), {}))
        incoming: Dict[tuple, list] = {slot: [] for slot in self.slots}
        for src, sent in outgoing.items():
            for shipment, ref in zip(sent, refs[src]):
                for dst in shipment.dsts:
                    incoming[dst].append((src, ref))
        old_plan, old_generation = self.plan, self.generation
        self.generation += 1
        answers = self.workers.become(lambda slot: ((self.cfg, new_plan, slot, self.name, self.generation,
                                                     self._dataset_ref, incoming[slot]), {"carry": True}))
        del refs, incoming  # the shipped objects leave the store
        self.plan = new_plan
        self._release_rendezvous_actors(old_generation, old_plan)
        received = {worker_name(*slot): answer["loaded_bytes"] for slot, answer in sorted(answers.items())
                    if answer["loaded_bytes"]}
        return {"attention_gpus": attention_gpus, "pause_s": time.perf_counter() - t0,
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
        created itself. The group names are ``runtime.links``'s. The CPU backend makes none."""
        from ray.util.collective.const import get_store_name

        gpus = range(max(1, self.cfg.cluster.gpus_per_node))  # the device index a worker's tensors have
        wanted = set()
        for group, size in ((f"{self.name}-g{generation}-world", plan.total_gpus),
                            (f"{self.name}-g{generation}-attn", plan.attention_gpus)):
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

    def step(self, step: int):
        """Run one optimizer step on every worker; returns the step's metrics."""
        results = self.workers.train_step(step)
        return summarize(self.cfg, self.plan, [results[g.slot] for g in self.plan.gpus])

    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        """Every global tensor once: replicated attention-side tensors from attention rank 0."""
        parts = self.workers.export(which, key)
        out: Dict[str, torch.Tensor] = {}
        for g in self.plan.gpus:
            for name, tensor in parts[g.slot].items():
                out.setdefault(name, tensor)
        return out

    def save_shards(self, folder: str) -> int:
        """Each worker writes what it is the single source of into ``folder``; returns bytes."""
        return sum(self.workers.save_shard(folder).values())

    def shutdown(self, timeout_s: Optional[float] = CLOSE_TIMEOUT_S) -> None:
        try:
            self.workers.close(timeout_s=timeout_s)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        self.workers.kill()
        self._release_rendezvous_actors(self.generation, self.plan)  # the last generation's too
        ray.util.remove_placement_group(self.pg)
