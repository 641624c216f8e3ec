"""Going on with fewer nodes (``train.elastic``): the config of the topology that is left, and
the split the predictor chooses for it. Pure code: no Ray.

Checkpoints are layout-independent and a step's arithmetic is the same on any split (the global
batch, its micro-batches and the data order do not depend on how many GPUs hold the heads and
experts), so a run restarted on fewer nodes trains the same model, up to rounding. Only the
cluster section changes: ``num_nodes``, the split, and the policy's range clipped to what the
smaller cluster holds.
"""

from __future__ import annotations

from typing import Optional

from ma_ray.config import Config
from ma_ray.control.predictor import StageTimePredictor
from ma_ray.parallel.split import feasible
from ma_ray.parallel.step_time import step_time_s


def shrunk(cfg: Config, nodes_left: int) -> Optional[Config]:
    """``cfg`` on ``nodes_left`` of its nodes, at the split with the shortest predicted step;
    None when that many nodes cannot hold the model at any split."""
    c, b = cfg.cluster, cfg.balance
    if not 1 <= nodes_left < c.num_nodes:
        return None
    total = nodes_left * c.gpus_per_node
    heads, experts = cfg.model.num_attention_heads, cfg.moe.num_experts
    splits = [k for k in range(1, total) if feasible(k, total, heads, experts)]
    if not splits:
        return None
    def clip(k: int) -> int:
        return max(min(k, splits[-1]), splits[0])

    low, high = clip(b.min_attention_gpus), clip(b.max_attention_gpus)
    splits = [k for k in splits if low <= k <= high]
    smaller = cfg.replace(**{"cluster.num_nodes": nodes_left, "cluster.attention_gpus": splits[0],
                             "balance.min_attention_gpus": low, "balance.max_attention_gpus": high})
    predictor = StageTimePredictor(smaller)

    def predicted_step_s(k: int) -> float:
        p = predictor.predict(k)
        return step_time_s(p.t_attention_s, p.t_moe_s, predictor.pipeline)

    return smaller.replace(**{"cluster.attention_gpus": min(splits, key=predicted_step_s)})
