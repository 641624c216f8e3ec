"""The analytic ping-pong pipeline: the least time a step's passes can take for given stage times.

One pass (forward or backward) of a group of ``m`` micro-batches through ``L`` layers is a
chain per micro-batch of ``L`` attention stages and ``L`` MoE stages, with a transfer of ``T_c``
between every two; each pool works on one stage at a time. Two lower bounds hold for any
schedule, and the round-robin schedule of ``runtime.schedule`` meets the larger one when stage
times are constant and transfers never queue (the assumptions):

* the busier pool must run ``m L`` stages, and before its first and after its last the other
  pool's first (or last) stage and two transfers must happen:
  ``T_a + T_m + 2 T_c + max(T_a, T_m) (m L - 1)``, the formula of issue 5, which is the ideal
  when the group is deep enough to cover a round trip (``m max(T_a, T_m) >= T_a + T_m + 2 T_c``);
* the last micro-batch of the group starts after the other ``m - 1`` have had their first
  attention stage, then runs its own chain: ``(m - 1) T_a + L (T_a + T_m + 2 T_c)``; at ``m = 1``
  this is the whole pass, the pools taking turns.
"""

from __future__ import annotations


def ideal_pass_s(t_attention_s: float, t_moe_s: float, t_transfer_s: float, in_flight: int, layers: int) -> float:
    """Least seconds of one pass of ``in_flight`` micro-batches over ``layers`` layers."""
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


def ideal_overlap_efficiency(compute_attention_s: float, compute_moe_s: float, ideal_s: float) -> float:
    """The overlap efficiency (``runtime.job.overlap_efficiency``) a step taking ``ideal_s``
    would have."""
    lighter = min(compute_attention_s, compute_moe_s)
    return max(0.0, (compute_attention_s + compute_moe_s - ideal_s) / lighter) if lighter > 0 else 0.0
