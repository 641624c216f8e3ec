"""Step-time arithmetic: the one definition of every figure made from stage times.

A *stage* is one layer of one micro-batch on one pool, forward and backward; ``T_a`` and ``T_m``
are the seconds of an attention stage and a MoE stage (the busiest GPU of each pool), ``T_c`` of
a transfer between the pools. Everything that turns such times into a figure lives here, and the
step metrics (``runtime.step_metrics``), the predictor, the policy, the benchmarks and the tests
all use these functions, so a figure means the same wherever it is printed:

* ``imbalance(T_a, T_m) = |T_a - T_m| / max(T_a, T_m)``, 0 when both are 0;
* ``overlap_efficiency(C_a, C_m, P)``: how much of the lighter pool's work hid under the heavier
  pool's, from a step's measured work and pass time -- or, given the ideal step time for ``P``,
  the best a schedule can do (the "ideal overlap efficiency" is no separate formula);
* ``ideal_pass_s`` / ``ideal_step_s``: the least time the ping-pong schedule can take for given
  stage times (below);
* ``step_time_s(T_a, T_m, shape)``: the balancing policy's step-time model, which is
  ``ideal_step_s`` with each stage split into its forward and backward shares.

The ideal pipeline. One pass (forward or backward) of a group of ``m`` micro-batches through
``L`` layers is a chain per micro-batch of ``L`` attention stages and ``L`` MoE stages, with a
transfer of ``T_c`` between every two; each pool works on one stage at a time. Two lower bounds
hold for any schedule, and the round-robin schedule of ``runtime.schedule`` meets the larger one
when stage times are constant and transfers never queue (the assumptions):

* the busier pool must run ``m L`` stages, and before its first and after its last the other
  pool's first (or last) stage and two transfers must happen:
  ``T_a + T_m + 2 T_c + max(T_a, T_m) (m L - 1)``, which is the ideal
  when the group is deep enough to cover a round trip (``m max(T_a, T_m) >= T_a + T_m + 2 T_c``);
* the last micro-batch of the group starts after the other ``m - 1`` have had their first
  attention stage, then runs its own chain: ``(m - 1) T_a + L (T_a + T_m + 2 T_c)``; at ``m = 1``
  this is the whole pass, the pools taking turns.

Pure arithmetic: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD_SHARE = 1.0 / 3.0  # of a stage's time; backward takes the rest (matmul-bound layers)


def imbalance(t_attention_s: float, t_moe_s: float) -> float:
    """``|T_a - T_m| / max(T_a, T_m)``: 0 when the pools' stages take equally long (both 0
    included), towards 1 as one pool's stage becomes negligible against the other's."""
    larger = max(t_attention_s, t_moe_s)
    return abs(t_attention_s - t_moe_s) / larger if larger > 0 else 0.0


def overlap_efficiency(compute_attention_s: float, compute_moe_s: float, passes_s: float) -> float:
    """The share of the lighter pool's work that ran while the heavier pool worked too:
    ``(C_a + C_m - P) / min(C_a, C_m)``, clipped below at 0, with ``C`` a pool's busiest
    worker's seconds of work in the step (compute, and for the attention pool its own
    collectives) and ``P`` the wall time of the step's forward and backward passes.

    If the pools took turns, ``P = C_a + C_m`` and nothing overlapped: 0 (exposed transfers make
    ``P`` larger still, and count against it). If the lighter pool's work hid entirely under
    the heavier's, ``P = max(C_a, C_m)``: 1. Given ``P = ideal_step_s(...)`` it is the ideal
    overlap efficiency of those stage times, the best any schedule can reach; docs/architecture.md,
    "Pipelining and overlap efficiency", says why this figure. 0 when a pool did no work (nothing to overlap)."""
    lighter = min(compute_attention_s, compute_moe_s)
    if lighter <= 0:
        return 0.0
    return max(0.0, (compute_attention_s + compute_moe_s - passes_s) / lighter)


def ideal_pass_s(t_attention_s: float, t_moe_s: float, t_transfer_s: float, in_flight: int, layers: int) -> float:
    """Least seconds of one pass of ``in_flight`` micro-batches over ``layers`` layers: the larger
    of the busiest-pool and longest-chain bounds (module docstring)."""
    t_a, t_m, t_c, m = t_attention_s, t_moe_s, t_transfer_s, in_flight
    busiest_pool = t_a + t_m + 2 * t_c + max(t_a, t_m) * (m * layers - 1)
    longest_chain = (m - 1) * t_a + layers * (t_a + t_m + 2 * t_c)
    return max(busiest_pool, longest_chain)


def ideal_step_s(forward: tuple, backward: tuple, t_transfer_s: float, micro_batches: int,
                 in_flight: int, layers: int) -> float:
    """Least seconds of a step's passes: every group of ``in_flight`` micro-batches (the last may
    be smaller) runs a forward pass then a backward pass. ``forward`` and ``backward`` are
    ``(T_a, T_m)`` of one stage in that direction."""
    total = 0.0
    for first in range(0, micro_batches, in_flight):
        m = min(in_flight, micro_batches - first)
        total += ideal_pass_s(*forward, t_transfer_s, m, layers) + ideal_pass_s(*backward, t_transfer_s, m, layers)
    return total


@dataclass(frozen=True)
class PipelineShape:
    """What a step's pipeline is made of: ``micro_batches`` per step (gradient accumulation),
    ``layers``, and ``in_flight`` micro-batches circulating between the pools at once."""

    micro_batches: int
    layers: int
    in_flight: int

    @property
    def stages(self) -> int:
        """Stages per pool per step: what a pool's summed stage seconds are divided by to give
        ``T_a`` or ``T_m``."""
        return self.micro_batches * self.layers

    @classmethod
    def from_config(cls, cfg) -> "PipelineShape":
        # Each replica runs its share of the micro-batches, all replicas at once.
        return cls(micro_batches=cfg.micro_batches_per_replica, layers=cfg.model.num_layers,
                   in_flight=cfg.schedule.micro_batches_in_flight)


def step_time_s(t_attention_s: float, t_moe_s: float, shape: PipelineShape, t_transfer_s: float = 0.0) -> float:
    """The step-time model: seconds of a step's passes at stage times ``T_a``, ``T_m`` (forward
    and backward together), the ideal ping-pong pipeline of ``shape`` with each stage split
    ``FORWARD_SHARE`` forward and the rest backward, as the emulation runs it.

    The balancing policy scores splits with it at ``t_transfer_s = 0``: the predictor predicts
    compute stage times only, and a transfer (the same rows cross for every split) moves all
    splits' times alike. With free transfers both bounds of a pass are homogeneous in
    ``(T_a, T_m)``, so the forward/backward split cancels, and the longest chain binds only at
    ``m = 1`` (for ``m >= 2`` it is never above the busier pool's bound). Per group of ``m``
    micro-batches, with ``hi = max(T_a, T_m)`` and ``lo = min(T_a, T_m)``:

        S_group = L (T_a + T_m)      at m = 1: the pools take turns,
        S_group = m L hi + lo        at m >= 2: the slower pool runs all its m L stages, plus
                                     one stage of the lighter pool to fill and drain the group
                                     (its forward share in the forward pass, its backward
                                     share in the backward pass).

    So at one micro-batch in flight the step is ``stages (T_a + T_m)`` and the best split
    minimises the sum; pipelined, it is ``stages hi`` plus a stage of the lighter pool per group,
    and the best split balances the pools. Gradient sync and the optimizer are left out (about
    the same for every split)."""
    forward = (FORWARD_SHARE * t_attention_s, FORWARD_SHARE * t_moe_s)
    backward = ((1 - FORWARD_SHARE) * t_attention_s, (1 - FORWARD_SHARE) * t_moe_s)
    return ideal_step_s(forward, backward, t_transfer_s, shape.micro_batches, max(1, shape.in_flight),
                        shape.layers)
