"""The driver's handle on a running MA-separated job: the placement group, one worker actor per
GPU slot, and one call per worker per step.

It only moves scalars (losses, timings): tensors cross between workers through the collective
groups. ``export`` is the exception, for verification and checkpoints: it gathers parameters,
gradients or optimizer moments by global name.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Dict, List, Optional

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ma_ray.parallel.diff import diff_plans
from ma_ray.parallel.placement import make_plan
from ma_ray.runtime.cluster import reserve_gpus
from ma_ray.runtime.links import worker_name
from ma_ray.runtime.step_metrics import summarize
from ma_ray.runtime.worker import Worker


class StepFailed(RuntimeError):
    """Some workers failed a step; the message names each and its first error line."""


class TrainingJob:
    def __init__(self, cfg, dataset, attention_gpus: int | None = None, name: str | None = None,
                 torch_threads: int | None = None, checkpoint: str | None = None):
        self.cfg = cfg
        self.name = name or f"ma-{uuid.uuid4().hex[:8]}"
        self.plan = make_plan(cfg, attention_gpus)
        self.generation = 0
        self.pg = reserve_gpus(cfg.cluster)
        c = cfg.cluster
        self.slots = list(itertools.product(range(c.num_nodes), range(c.gpus_per_node)))
        self.workers = {
            slot: Worker.options(
                num_gpus=1, num_cpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=slot[0]),
            ).remote(torch_threads)
            for slot in self.slots
        }
        self._dataset_ref = ray.put(dataset)
        self.info = self._setup(checkpoint)

    def _setup(self, checkpoint: Optional[str] = None) -> List[dict]:
        return ray.get([w.become.remote(self.cfg, self.plan, slot, self.name, self.generation, self._dataset_ref,
                                        checkpoint=checkpoint)
                        for slot, w in self.workers.items()])

    def apply_split(self, attention_gpus: int) -> dict:
        """Move to ``attention_gpus`` attention GPUs: heads, experts and their AdamW moments go
        from their old to their new owners (worker to worker), GPUs whose role changes become
        workers of the other pool, and the collective groups are rebuilt. Returns what moved and
        the pause it cost."""
        # The policy's range may have been changed at run time; the caller checked it.
        new_plan = make_plan(self.cfg, attention_gpus, within_policy=False)
        t0 = time.perf_counter()
        diff = diff_plans(self.plan, new_plan)
        if diff.is_empty:
            return {"attention_gpus": attention_gpus, "pause_s": 0.0, "moved_heads": 0, "moved_experts": 0}
        # Every worker cuts its state for every slot; slot j's parts are return value j of each.
        cuts = {slot: w.export_for.options(num_returns=len(self.slots)).remote(new_plan, self.slots)
                for slot, w in self.workers.items()}
        self.generation += 1
        ray.get([w.become.remote(self.cfg, new_plan, slot, self.name, self.generation, self._dataset_ref,
                                 [cuts[src][j] for src in self.slots])
                 for j, (slot, w) in enumerate(self.workers.items())])
        self.plan = new_plan
        return {"attention_gpus": attention_gpus, "pause_s": time.perf_counter() - t0,
                "moved_heads": len(diff.head_moves), "moved_experts": len(diff.expert_moves),
                "role_changes": len(diff.role_changes)}

    def _by_gpu(self):
        """Workers in global-id order of the current plan."""
        return [self.workers[g.slot] for g in self.plan.gpus]

    def step(self, step: int) -> dict:
        """Run one optimizer step on every worker; returns the loss and each pool's timings."""
        refs = [w.train_step.remote(step) for w in self._by_gpu()]
        return summarize(self.cfg, self.plan, self._gather(refs, f"step {step}"))

    def _gather(self, refs, what: str) -> list:
        """Every worker's result; when some fail, one error naming each failed worker and why
        (a dead worker's peers report which transfer with it broke)."""
        results, failures = [], []
        for g, ref in zip(self.plan.gpus, refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                failures.append(f"{worker_name(g.node, g.local_gpu)} ({g.role}): {type(cause).__name__}: {first}")
        if failures:
            raise StepFailed(f"{what} failed on {len(failures)} of {len(refs)} workers: " + "; ".join(failures))
        return results

    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        """Every global tensor once: replicated attention-side tensors from attention rank 0."""
        out: Dict[str, torch.Tensor] = {}
        for part in ray.get([w.export.remote(which, key) for w in self._by_gpu()]):
            for name, tensor in part.items():
                if name not in out:
                    out[name] = tensor
        return out

    def shutdown(self) -> None:
        try:
            ray.get([w.close.remote() for w in self.workers.values()], timeout=30)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        for w in self.workers.values():
            ray.kill(w)
        ray.util.remove_placement_group(self.pg)
