"""Per-GPU work of a split: the features the stage-time predictor regresses on, for any number
``k`` of attention GPUs, and the methodology's model turned into a prior over their coefficients.

A pool is as slow as its busiest GPU (``runtime.step_metrics.summarize`` reports the slowest worker's
compute seconds per (micro-batch, layer) stage), so every feature describes the busiest GPU of
its pool at split ``k`` (placement from ``ma_ray.parallel.placement.place``: heads and experts in
balanced contiguous ranges, tokens of a micro-batch in balanced slices).

Attention pool (``T`` = micro_batch_size x seq_length tokens of one micro-batch):

* ``constant``  1: launch and framework overhead per stage;
* ``heads``     most heads on one attention GPU, ``ceil(H / k)``: every attention GPU runs the
                whole micro-batch through its heads (Q, K, V, O projections and causal core
                attention, ~ ``2 T d (4 hidden + seq)`` flops per head);
* ``tokens``    the largest token slice, ``ceil(T / k)``: the token-wise (sequence-parallel)
                work, LayerNorms, residuals, router, dispatch and combine, and the LM head and
                embeddings amortised over the layers;
* ``bytes``     hidden-size vectors the GPU moves per stage: all-gather in and reduce-scatter
                out of the micro-batch (``2 (T - T/k)``) plus its routed rows out and back
                (``2 top_k T/k``).

MoE pool (``m = N - k`` GPUs):

* ``constant``  1;
* ``experts``   most experts on one MoE GPU, ``ceil(E / m)``: one weight read and one pair of
                matmul launches per expert (the methodology's ``active_experts`` term);
* ``rows``      the most rows one MoE GPU computes per stage: the sum over its experts of each
                expert's expected routed rows, ``min(capacity, share_e * T * top_k)``. With a
                uniform router this is ``experts x T top_k / E``; with a measured skewed load it
                finds the GPU holding the hot experts. Bytes received and sent by a MoE GPU are
                these rows times ``hidden``, so they are this feature, not another one;
* ``sources``   attention GPUs that each send it a message per stage (``k``).

Each feature is divided by its value at the reference split under a uniform router, so a
coefficient reads "seconds this term takes at the reference split" and all features are 1 there.
The reference is the layout the methodology's coefficients describe (``balance.time_coef_layout``: the
methodology's 4 x 4 at 12), or, when that is null, the configured layout at ``cluster.attention_gpus``.
A fixed reference makes every layout's prior the same function of its GPUs' work: anchored at
the configured layout instead, the methodology's formula, which hardly depends on the layout, would
price any layout run as if it were the methodology's.

The prior (``methodology_prior``): at the reference split the prior mean reproduces the methodology's formula
exactly. Its constant goes to ``constant``; for attention, the shape terms ``c1 seq + c2 hidden``
are split between ``heads`` and ``tokens`` in proportion to their flops at the reference split;
for MoE, ``c1 expert_hidden`` goes to ``rows`` and ``c2 active_experts`` to ``experts``.
``bytes`` and ``sources`` start at zero: the runtime's stage timers measure compute only
(transfer waits are timed apart), so these terms are there to be learned if a schedule ever
folds transfers into the stage time. The methodology's formula itself does not depend on ``k`` (only
through ``active_experts``); this split of it into per-GPU work terms is what lets the model
say what another split would cost.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from ma_ray.config import Config
from ma_ray.parallel.memory import expert_capacity, tokens_per_micro_batch
from ma_ray.parallel.placement import place
from ma_ray.parallel.split import feasible as split_feasible, split_error
from ma_ray.parallel.time_model import attention_time, moe_time

ATTENTION_TERMS = ("constant", "heads", "tokens", "bytes")
MOE_TERMS = ("constant", "experts", "rows", "sources")

# Memory-bound elementwise work (LayerNorms, residuals, dropout, dispatch/combine copies) per
# hidden element of a token, in flop-equivalents. Rough on purpose: it only sets how the prior
# splits the methodology's attention time between head work and token work; measurements refit it.
ELEMENTWISE_FLOPS_PER_ELEMENT = 100.0


@dataclass(frozen=True)
class SplitShape:
    """The busiest GPU of each pool at ``attention_gpus`` = k, in physical units per stage."""

    attention_gpus: int
    heads: int  # most heads on one attention GPU
    tokens: int  # largest token slice of one attention GPU (tokens of one micro-batch)
    attention_vectors: float  # hidden-size vectors an attention GPU moves per stage
    experts: int  # most experts on one MoE GPU
    rows: float  # most rows one MoE GPU computes per stage (expected, capacity-capped)
    sources: int  # attention GPUs sending to each MoE GPU

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Workload:
    """Features of any split of ``cfg``'s cluster; pure and cheap (placements are cached)."""

    def __init__(self, cfg: Config, reference_k: Optional[int] = None):
        m, moe, t = cfg.model, cfg.moe, cfg.train
        self.total_gpus = cfg.total_gpus
        self.num_nodes, self.gpus_per_node = cfg.cluster.num_nodes, cfg.cluster.gpus_per_node
        self.num_heads, self.num_experts = m.num_attention_heads, moe.num_experts
        self.top_k = moe.top_k
        self.tokens = tokens_per_micro_batch(cfg)
        self.capacity = expert_capacity(cfg)
        layout = cfg.balance.time_coef_layout
        if reference_k is not None or layout is None:
            layout = (self.num_nodes, self.gpus_per_node, cfg.cluster.attention_gpus if reference_k is None else reference_k)
        # The reference: the layout whose busiest GPUs' work the coefficients price (features
        # are 1 there). ``reference_k`` is its split.
        self.reference_layout = tuple(layout)
        self.reference_k = self.reference_layout[2]
        self.micro_batches_in_flight = cfg.schedule.micro_batches_in_flight
        # Flops per head (whole micro-batch) and per token of a slice, forward; only their ratio
        # is used (backward multiplies both by about the same factor).
        d, hidden, seq = m.attention_head_size, m.hidden_size, t.seq_length
        self.flops_per_head = 2.0 * self.tokens * d * (4 * hidden + seq)
        self.flops_per_token = (2.0 * hidden * moe.num_experts + 2.0 * hidden * m.vocab_size / m.num_layers
                                + ELEMENTWISE_FLOPS_PER_ELEMENT * hidden)
        self.seq_length, self.hidden_size, self.expert_hidden = seq, hidden, m.intermediate_size
        self.attn_time_coef = tuple(float(c) for c in cfg.balance.attn_time_coef)
        self.moe_time_coef = tuple(float(c) for c in cfg.balance.moe_time_coef)
        self._experts_of = lru_cache(maxsize=None)(self._experts_of_uncached)
        ref_nodes, ref_gpus, ref_k = self.reference_layout
        problem = split_error(ref_k, ref_nodes * ref_gpus, self.num_heads, self.num_experts,
                              key="reference split (cluster.attention_gpus)")
        if problem is not None:
            raise ValueError(problem)
        if (ref_nodes, ref_gpus) == (self.num_nodes, self.gpus_per_node):
            self._reference = self.shape(ref_k)
        else:  # the same model and batch on the reference's topology
            cluster = dataclasses.replace(cfg.cluster, num_nodes=ref_nodes, gpus_per_node=ref_gpus, attention_gpus=ref_k)
            self._reference = Workload(dataclasses.replace(cfg, cluster=cluster), ref_k).shape(ref_k)

    # -- identity -----------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        """The numbers the features depend on; a saved predictor state only fits the same ones."""
        return {"total_gpus": self.total_gpus, "num_nodes": self.num_nodes, "gpus_per_node": self.gpus_per_node,
                "num_heads": self.num_heads, "num_experts": self.num_experts, "top_k": self.top_k,
                "tokens": self.tokens, "capacity": self.capacity, "reference_k": self.reference_k}

    @property
    def reference_shape(self) -> SplitShape:
        """The reference layout's busiest GPUs' work under a uniform router."""
        return self._reference

    # -- splits -------------------------------------------------------------------------------

    def feasible(self, k: int) -> bool:
        """Whether the topology and model can hold ``k`` attention GPUs (policy range aside)."""
        return split_feasible(k, self.total_gpus, self.num_heads, self.num_experts)

    def splits(self) -> List[int]:
        """Every feasible ``k``, ascending."""
        return [k for k in range(1, self.total_gpus) if self.feasible(k)]

    def _experts_of_uncached(self, k: int) -> Tuple[Tuple[int, ...], ...]:
        plan = place(self.num_nodes, self.gpus_per_node, k, self.num_heads, self.num_experts)
        return tuple(g.experts for g in plan.moe_workers())

    # -- features -----------------------------------------------------------------------------

    def normalized_load(self, load: Optional[Sequence[float]]) -> Optional[Tuple[float, ...]]:
        """``load`` (anything proportional to the tokens routed to each expert) as shares that
        sum to 1; None stays None (a uniform router). Raises ValueError on a malformed load."""
        if load is None:
            return None
        values = [float(v) for v in load]
        if len(values) != self.num_experts:
            raise ValueError(f"expert load has {len(values)} entries, the model has {self.num_experts} experts")
        if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
            raise ValueError("expert load must be finite, non-negative and not all zero")
        total = sum(values)
        return tuple(v / total for v in values)

    def shape(self, k: int, load: Optional[Sequence[float]] = None) -> SplitShape:
        """Physical per-stage work of the busiest GPU of each pool at split ``k``."""
        if not self.feasible(k):
            raise ValueError(f"{k} attention GPUs do not fit {self.total_gpus} GPUs, "
                             f"{self.num_heads} heads and {self.num_experts} experts")
        shares = self.normalized_load(load)
        moe_gpus = self.total_gpus - k
        tokens = math.ceil(self.tokens / k)
        routed = self.tokens * self.top_k
        if shares is None:
            per_expert = [min(self.capacity, routed / self.num_experts)] * self.num_experts
        else:
            per_expert = [min(self.capacity, s * routed) for s in shares]
        rows = max(sum(per_expert[e] for e in group) for group in self._experts_of(k))
        return SplitShape(
            attention_gpus=k, heads=math.ceil(self.num_heads / k), tokens=tokens,
            attention_vectors=2.0 * (self.tokens - tokens) + 2.0 * self.top_k * tokens,
            experts=math.ceil(self.num_experts / moe_gpus), rows=float(rows), sources=k)

    def features(self, k: int, load: Optional[Sequence[float]] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """(attention features, MoE features) of split ``k``; both all ones at the reference split
        under a uniform router. Order: ``ATTENTION_TERMS`` and ``MOE_TERMS``."""
        return self.features_of(self.shape(k, load))

    def features_of(self, s: SplitShape) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """The features of the busiest GPUs ``s``, relative to this workload's reference split.
        ``s`` may come from another topology's ``Workload`` (a replica of another size): the
        features are per-GPU work, so they mean the same there (the planner, ``parallel.search``)."""
        r = self._reference
        attention = (1.0, s.heads / r.heads, s.tokens / r.tokens, _ratio(s.attention_vectors, r.attention_vectors))
        moe = (1.0, s.experts / r.experts, _ratio(s.rows, r.rows), s.sources / r.sources)
        return attention, moe

    # -- prior --------------------------------------------------------------------------------

    def methodology_times(self) -> Tuple[float, float]:
        """The methodology's formula at the reference split: (T_attention, T_moe) in seconds."""
        return (attention_time(self.attn_time_coef, self.seq_length, self.hidden_size),
                moe_time(self.moe_time_coef, self.expert_hidden, self._reference.experts))

    def methodology_prior(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Prior means of the coefficients (seconds each term takes at the reference split),
        summing to the methodology's prediction there. See the module docstring for the allocation."""
        (a0, a1, a2), (m0, m1, m2) = self.attn_time_coef, self.moe_time_coef
        shape_terms = a1 * self.seq_length + a2 * self.hidden_size
        head_share, token_share = self.work_shares()
        attention = (a0, shape_terms * head_share, shape_terms * token_share, 0.0)
        moe = (m0, m2 * self._reference.experts, m1 * self.expert_hidden, 0.0)
        return attention, moe

    def prior_stage_times(self, s: SplitShape) -> Tuple[float, float]:
        """(T_attention, T_moe) seconds per stage of the busiest GPUs ``s`` under the prior:
        ``methodology_prior . features_of(s)``. It is what the controller's predictor predicts before its
        first measurement (``control.predictor``: scale x shares . features, the same product),
        and what the planner scores layouts with, so the two cannot disagree."""
        x_a, x_m = self.features_of(s)
        prior_a, prior_m = self.methodology_prior()
        return (sum(w * x for w, x in zip(prior_a, x_a)), sum(w * x for w, x in zip(prior_m, x_m)))

    def work_shares(self) -> Tuple[float, float]:
        """Fractions of the attention shape terms given to heads and to tokens (for reports)."""
        r = self._reference
        head_flops, token_flops = r.heads * self.flops_per_head, r.tokens * self.flops_per_token
        return head_flops / (head_flops + token_flops), token_flops / (head_flops + token_flops)


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else 0.0
