"""Routing math of the MoE block: gate probabilities, top-k, capacity with a fixed drop order,
and the router's auxiliary losses.

The functions are split so that a distributed attention worker, which holds only a slice of the
micro-batch's tokens, can compute its own probabilities and top-k, all-gather the (small) expert
indices, and then apply exactly the reference's capacity rule and loss normalisation:

* ``capacity_keep`` needs the expert indices of the whole micro-batch (the drop order is global);
* ``load_balance_loss`` and ``z_loss`` are sums over tokens scaled by global counts, so each
  worker's share on its slice adds up to the reference value.

Drop order: first choices before second choices (slot-major), then token order (batch-major,
flattened ``b * seq + t``). Tokens past an expert's capacity skip that expert; a token dropped by
all its experts passes through the residual only.

Every output's size follows from the shapes alone (``one_hot`` with ``num_classes`` given reads
nothing back on CUDA), so routing never makes the host wait for the device.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax-like reductions run in fp32 under bf16 autocast, and stay in fp64 when verifying."""
    return x if x.dtype == torch.float64 else x.float()


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float,
             expert_capacity: Optional[int] = None) -> int:
    """Per-expert capacity of one micro-batch: ``ceil(cf * tokens * top_k / experts)`` unless fixed."""
    if expert_capacity is not None:
        return expert_capacity
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over experts (in fp32) and top-k.

    Returns ``probs`` [N, E], ``topk_prob`` [N, k] (renormalised to sum to 1 when
    ``norm_topk_prob`` and ``top_k > 1``) and ``topk_idx`` [N, k].

    ``norm_topk_prob`` means what it means in DeepSeek-MoE's ``MoEGate``, where the key comes
    from: the top-k weights are renormalised only when ``top_k > 1``. A top-1 token keeps its raw
    softmax probability as its weight (renormalising one weight would make it 1.0 and cut the
    router out of the output's gradient).
    """
    probs = torch.softmax(at_least_fp32(logits), dim=-1)
    topk_prob, topk_idx = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob and top_k > 1:
        topk_prob = topk_prob / topk_prob.sum(dim=-1, keepdim=True)
    return probs, topk_prob, topk_idx


def capacity_keep(topk_idx: torch.Tensor, num_experts: int, cap: int) -> torch.Tensor:
    """Boolean [N, k]: which (token, slot) assignments fit their expert's capacity.

    ``topk_idx`` must cover the whole micro-batch in token order.
    """
    n, k = topk_idx.shape
    slot_major = topk_idx.t().reshape(-1)  # all first choices, then all second choices
    one_hot = torch.nn.functional.one_hot(slot_major, num_experts)
    position = (torch.cumsum(one_hot, dim=0) * one_hot).sum(dim=-1) - 1
    return (position < cap).reshape(k, n).t()


def expert_counts(topk_idx: torch.Tensor, num_experts: int, seq_len: int, per_sequence: bool) -> torch.Tensor:
    """Routed assignments per expert (before capacity): [E], or [B, E] per sequence, as exact
    integers (int64); ``load_balance_loss`` takes them to the probabilities' dtype.

    ``topk_idx`` covers the whole micro-batch, flattened batch-major.
    """
    one_hot = torch.nn.functional.one_hot(topk_idx, num_experts).sum(dim=1)  # [N, E], int64
    if per_sequence:
        return one_hot.reshape(-1, seq_len, num_experts).sum(dim=1)
    return one_hot.sum(dim=0)


def load_balance_loss(probs: torch.Tensor, token_offset: int, counts: torch.Tensor, seq_len: int,
                      num_tokens: int, top_k: int, seq_aux: bool) -> torch.Tensor:
    """This slice's share of the load-balancing loss (unweighted).

    ``probs`` [n, E] are the gate probabilities of tokens ``token_offset .. token_offset + n`` of a
    micro-batch of ``num_tokens`` tokens; ``counts`` comes from ``expert_counts`` over the whole
    micro-batch. The loss is ``sum_e f_e * P_e`` with ``f_e = E * count_e / (k * tokens)`` and
    ``P_e`` the mean probability, per sequence and averaged over sequences when ``seq_aux``
    (DeepSeek-style), over the whole micro-batch otherwise. It is linear in ``probs``, so the
    slices' shares add up to the whole. ``f`` is computed in ``probs``' dtype, so an fp64 loss
    is fp64-accurate.
    """
    n, num_experts = probs.shape
    counts = counts.to(probs.dtype)
    if not seq_aux:
        f = counts * num_experts / (top_k * num_tokens)
        return (probs.sum(dim=0) * f).sum() / num_tokens
    batch = num_tokens // seq_len
    seq_of_token = torch.arange(token_offset, token_offset + n, device=probs.device) // seq_len
    f = counts * num_experts / (top_k * seq_len)  # [B, E]
    return (probs * f[seq_of_token]).sum() / (seq_len * batch)


def z_loss(logits: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """This slice's share of the router z-loss ``mean_tokens(logsumexp(logits) ** 2)`` (unweighted)."""
    return torch.logsumexp(at_least_fp32(logits), dim=-1).square().sum() / num_tokens
