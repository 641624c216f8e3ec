"""Token dispatch and combine for a slice of tokens (Megatron's token_dispatcher, without the comm).

Kept (token, slot) assignments are sent sorted by expert id, so the rows for any contiguous range
of experts (one MoE worker's group) are one contiguous block, with a count per expert. The combine
step weights each expert output by its gate probability and adds it into the token's row.
"""

from __future__ import annotations

from typing import Tuple

import torch


def expert_order(topk_idx: torch.Tensor, keep: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every flat assignment index (``token * k + slot``), kept ones first, sorted by expert
    (stable, so within an expert the order is token order), the dropped ones after them (in
    token order); and the count of kept assignments per expert [E] (int64).

    The sizes are fixed (``N * k`` and ``E``), so nothing here makes the host wait for the
    device (``nonzero`` and ``bincount`` would, for their output sizes): the kept assignments
    are ``order[:counts.sum()]``, and the caller reads the counts on the host once, where it
    needs them anyway (they size the exchange with the MoE pool).
    """
    flat_expert = topk_idx.reshape(-1)
    key = torch.where(keep.reshape(-1), flat_expert, num_experts)  # a dropped one sorts after every expert
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return order, counts[:num_experts]


def dispatch_order(topk_idx: torch.Tensor, keep: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat assignment indices (``token * k + slot``) of kept assignments, sorted by expert
    (stable, so within an expert the order is token order), and the count per expert [E]:
    ``expert_order`` cut to the kept ones, whose number it reads on the host."""
    order, counts = expert_order(topk_idx, keep, num_experts)
    return order[:int(counts.sum())], counts


def gather_rows(h: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    return h.index_select(0, order // top_k)


def combine(num_tokens: int, expert_out: torch.Tensor, order: torch.Tensor, topk_prob: torch.Tensor,
            top_k: int) -> torch.Tensor:
    """Sum over a token's kept slots of gate probability x expert output -> [num_tokens, hidden]."""
    weight = topk_prob.reshape(-1).index_select(0, order).unsqueeze(-1).to(expert_out.dtype)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, order // top_k, weight * expert_out)
