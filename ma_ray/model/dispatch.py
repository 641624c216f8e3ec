"""Token dispatch and combine for a slice of tokens (Megatron's token_dispatcher, without the comm).

Kept (token, slot) assignments are sent sorted by expert id, so the rows for any contiguous range
of experts (one MoE worker's group) are one contiguous block, with a count per expert. The combine
step weights each expert output by its gate probability and adds it into the token's row.
"""

from __future__ import annotations

from typing import Tuple

import torch


def dispatch_order(topk_idx: torch.Tensor, keep: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat assignment indices (``token * k + slot``) of kept assignments, sorted by expert
    (stable, so within an expert the order is token order), and the count per expert [E]."""
    flat_expert = topk_idx.reshape(-1)
    kept = torch.nonzero(keep.reshape(-1), as_tuple=True)[0]
    order = kept[torch.argsort(flat_expert[kept], stable=True)]
    counts = torch.bincount(flat_expert[kept], minlength=num_experts)
    return order, counts


def gather_rows(h: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    return h.index_select(0, order // top_k)


def combine(num_tokens: int, expert_out: torch.Tensor, order: torch.Tensor, topk_prob: torch.Tensor,
            top_k: int) -> torch.Tensor:
    """Sum over a token's kept slots of gate probability x expert output -> [num_tokens, hidden]."""
    weight = topk_prob.reshape(-1).index_select(0, order).unsqueeze(-1).to(expert_out.dtype)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, order // top_k, weight * expert_out)
