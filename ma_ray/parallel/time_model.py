"""The methodology's stage-time model: predicted seconds of the attention stage and of the MoE stage.

As written in the methodology, with its coefficients from ``cfg.balance``:

    T_attention = c0 + c1 * seq_len + c2 * hidden_size               (attn_time_coef)
    T_moe       = c0 + c1 * expert_hidden + c2 * active_experts      (moe_time_coef)

``active_experts`` is read as the number of experts one MoE GPU computes, and the MoE stage is as
slow as its busiest GPU, so the plan's prediction uses the largest expert count of any MoE GPU.

What this model does and does not say (kept as written; the controller corrects it with
measurements): neither formula depends on the number of attention GPUs, and the MoE one only
through the experts per GPU (12 us per expert). With the paper preset it predicts T_attention =
0.106 s and T_moe = 0.738 s (MoE about 7x slower), while the methodology's text says attention is about
2.3x slower; a balancer driven by these numbers alone moves GPUs towards the MoE pool until the
lower bound of attention GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ma_ray.config import Config
from ma_ray.parallel.placement import Plan


def attention_time(coef: Sequence[float], seq_len: int, hidden_size: int) -> float:
    c0, c1, c2 = coef
    return c0 + c1 * seq_len + c2 * hidden_size


def moe_time(coef: Sequence[float], expert_hidden: int, active_experts: int) -> float:
    c0, c1, c2 = coef
    return c0 + c1 * expert_hidden + c2 * active_experts


@dataclass(frozen=True)
class StageTimes:
    t_attention_s: float
    t_moe_s: float
    active_experts: int  # experts on the busiest MoE GPU, the term the MoE formula uses

    @property
    def slower_over_faster(self) -> float:
        """The slower stage's time over the faster one's (1.0 = balanced)."""
        fast, slow = sorted((self.t_attention_s, self.t_moe_s))
        return slow / fast if fast > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"t_attention_s": self.t_attention_s, "t_moe_s": self.t_moe_s,
                "active_experts": self.active_experts}


def predict_stage_times(cfg: Config, plan: Plan) -> StageTimes:
    """The methodology's model's stage times for ``plan`` under ``cfg`` (sequence length from ``train``)."""
    active = max(len(g.experts) for g in plan.moe_workers())
    return StageTimes(
        t_attention_s=attention_time(cfg.balance.attn_time_coef, cfg.train.seq_length, cfg.model.hidden_size),
        t_moe_s=moe_time(cfg.balance.moe_time_coef, cfg.model.intermediate_size, active),
        active_experts=active)
