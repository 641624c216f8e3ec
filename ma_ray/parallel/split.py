"""The one rule of which splits of the cluster between the pools can run.

``k`` attention GPUs out of ``total`` can run when both pools keep at least one GPU
(``1 <= k <= total - 1``), every attention GPU holds at least one head (``k <= heads``) and every
MoE GPU at least one expert (``total - k <= experts``). The balancing policy may narrow this to
``[min_attention_gpus, max_attention_gpus]``.

Config validation (``ma_ray.config.check_split``), the planner (``placement``, ``workload``) and
the controller's rebalance all ask this module. It is pure (plain numbers in, a message or None
out) and imports nothing of the package, so ``ma_ray.config`` can use it without an import cycle.
"""

from __future__ import annotations

from typing import Optional, Tuple


def split_error(attention_gpus: int, total_gpus: int, num_heads: int, num_experts: int, *,
                key: str = "attention GPUs", policy_range: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """None when ``attention_gpus`` of ``total_gpus`` can hold ``num_heads`` heads and
    ``num_experts`` experts (and lies in ``policy_range`` = (min, max) when given), else one
    line that starts with ``key`` and names the broken rule."""
    k, total = attention_gpus, total_gpus
    moe_gpus = total - k
    if policy_range is not None and not policy_range[0] <= k <= policy_range[1]:
        return (f"{key}: {k} is outside the policy's range [{policy_range[0]}, {policy_range[1]}] of "
                f"attention GPUs (balance.min_attention_gpus, balance.max_attention_gpus)")
    if k < 1:
        return f"{key}: must be at least 1, got {k}"
    if k > total:
        return (f"{key}: {k} is more than the {total} GPUs of the topology "
                f"(cluster.num_nodes x cluster.gpus_per_node)")
    if moe_gpus < 1:
        return f"{key}: {k} leaves {moe_gpus} MoE GPUs of the {total} in the topology; at least 1 is needed"
    if moe_gpus > num_experts:
        return f"{key}: {k} leaves {moe_gpus} MoE GPUs for only {num_experts} experts (moe.num_experts)"
    if k > num_heads:
        return f"{key}: {k} attention GPUs exceed the {num_heads} heads (model.num_attention_heads)"
    return None


def feasible(attention_gpus: int, total_gpus: int, num_heads: int, num_experts: int) -> bool:
    """Whether the topology and model can hold ``attention_gpus`` (policy range aside)."""
    return split_error(attention_gpus, total_gpus, num_heads, num_experts) is None
