"""Migration cost: how many seconds of training a change of split costs (the pause while heads,
experts, their AdamW moments and the replicated attention-side state move and every worker
rebuilds its role and groups), estimated from the bytes that move and refined by measured pauses.

    pause(old_k, new_k) = ratio * (fixed_s + busiest_receiver_bytes / bandwidth)

* bytes: from ``parallel.diff.diff_plans`` of the two plans: every moved head carries its
  Q/K/V/O slices of every layer, every moved expert its fc1/fc2 of every layer, and a GPU that
  becomes an attention GPU receives the whole replicated attention side (embeddings, LM head,
  LayerNorms, router); each parameter travels with its fp32 master copy and both AdamW moments
  (``parallel.memory.precision_of``). Receivers fetch in parallel, so the busiest receiver's
  bytes, not the sum, set the transfer time;
* ``fixed_s``: what any change costs regardless of size (every worker rebuilds its role and the
  collective groups are re-formed); ``balance.migration_fixed_s`` and ``bandwidth``
  (``balance.migration_gb_per_s``) unless given;
* ``ratio``: 1 until a migration is measured, then the exponential average in log space (memory
  ``memory`` migrations) of measured / estimated pause, so the defaults only matter until the
  first migration.

Pure code; ``state_dict()`` round-trips through plain data.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Dict, Optional

from ma_ray.config import Config
from ma_ray.parallel.diff import diff_plans
from ma_ray.parallel.memory import attention_replicated_params, expert_params, head_params, precision_of
from ma_ray.parallel.placement import ATTENTION, Plan, place


class MigrationCostModel:
    def __init__(self, cfg: Config, fixed_s: Optional[float] = None, bandwidth_bytes_per_s: Optional[float] = None,
                 memory: float = 3.0):
        if fixed_s is None:
            fixed_s = cfg.balance.migration_fixed_s
        if bandwidth_bytes_per_s is None:
            bandwidth_bytes_per_s = cfg.balance.migration_gb_per_s * 1e9
        if not (fixed_s >= 0 and math.isfinite(fixed_s)):
            raise ValueError(f"fixed_s: must be a non-negative number of seconds, got {fixed_s!r}")
        if not (bandwidth_bytes_per_s > 0 and math.isfinite(bandwidth_bytes_per_s)):
            raise ValueError(f"bandwidth_bytes_per_s: must be positive, got {bandwidth_bytes_per_s!r}")
        if not memory >= 1:
            raise ValueError(f"memory: must be at least 1 migration, got {memory!r}")
        c, m = cfg.cluster, cfg.model
        self._topology = (c.num_nodes, c.gpus_per_node, m.num_attention_heads, cfg.moe.num_experts)
        precision = precision_of(cfg)
        per_param = precision.master_param_bytes + 2 * precision.moment_bytes
        self.head_bytes = m.num_layers * head_params(m) * per_param
        self.expert_bytes = m.num_layers * expert_params(m) * per_param
        self.replicated_bytes = attention_replicated_params(cfg) * per_param
        self.fixed_s = float(fixed_s)
        self.bandwidth = float(bandwidth_bytes_per_s)
        self.memory = float(memory)
        self.ratio = 1.0
        self.migrations = 0
        self._plan = lru_cache(maxsize=None)(self._plan_uncached)

    def _plan_uncached(self, k: int) -> Plan:
        nodes, per_node, heads, experts = self._topology
        return place(nodes, per_node, k, heads, experts)

    def bytes_moved(self, old_k: int, new_k: int) -> Dict[str, int]:
        """Bytes that travel from ``old_k`` to ``new_k`` attention GPUs: in total, and into the
        busiest receiving GPU."""
        if old_k == new_k:
            return {"total": 0, "busiest_receiver": 0}
        old, new = self._plan(old_k), self._plan(new_k)
        diff = diff_plans(old, new)
        received: Dict[tuple, int] = {}
        for moves, size in ((diff.head_moves, self.head_bytes), (diff.expert_moves, self.expert_bytes)):
            for mv in moves:
                received[mv.dst] = received.get(mv.dst, 0) + size
        for change in diff.role_changes:
            if change.new_role == ATTENTION:
                received[change.slot] = received.get(change.slot, 0) + self.replicated_bytes
        return {"total": sum(received.values()), "busiest_receiver": max(received.values(), default=0)}

    def state_bytes(self) -> int:
        """Bytes of the whole training state: every head, expert and the replicated attention
        side once, with their master copies and moments."""
        _, _, heads, experts = self._topology
        return heads * self.head_bytes + experts * self.expert_bytes + self.replicated_bytes

    def raw_estimate(self, old_k: int, new_k: int) -> float:
        """The uncorrected estimate (ratio 1)."""
        if old_k == new_k:
            return 0.0
        return self.fixed_s + self.bytes_moved(old_k, new_k)["busiest_receiver"] / self.bandwidth

    def estimate(self, old_k: int, new_k: int) -> float:
        """Predicted pause, in seconds, of moving from ``old_k`` to ``new_k`` attention GPUs."""
        return self.ratio * self.raw_estimate(old_k, new_k)

    __call__ = estimate

    def observe(self, old_k: int, new_k: int, pause_s: float) -> None:
        """Learn from a measured migration pause (e.g. ``move_to``'s ``pause_s``)."""
        raw = self.raw_estimate(old_k, new_k)
        if old_k == new_k or raw <= 0 or not (pause_s > 0 and math.isfinite(pause_s)):
            return
        target = math.log(pause_s / raw)
        if self.migrations == 0:
            log_ratio = target
        else:
            log_ratio = math.log(self.ratio) + (target - math.log(self.ratio)) / self.memory
        self.ratio = math.exp(log_ratio)
        self.migrations += 1

    def state_dict(self) -> dict:
        return {"fixed_s": self.fixed_s, "bandwidth": self.bandwidth, "memory": self.memory,
                "ratio": self.ratio, "migrations": self.migrations}

    def load_state_dict(self, state: dict) -> None:
        self.fixed_s = float(state["fixed_s"])
        self.bandwidth = float(state["bandwidth"])
        self.memory = float(state["memory"])
        self.ratio = float(state["ratio"])
        self.migrations = int(state["migrations"])
