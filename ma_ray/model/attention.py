"""An attention shard: any subset of the heads of one layer.

It holds its heads' rows of the Q, K and V projections and their columns of the output
projection, and returns its *partial* output projection (without the output bias, which the
attention side holds once). Summing the partials of shards that cover every head once gives the
full multi-head attention block; that sum is the all-reduce (or reduce-scatter) of the attention
pool.

There is no key bias: adding the same vector to every key shifts each query's scores by a
constant, which softmax ignores, so its exact gradient is zero. Kept, it would hold only rounding
noise that AdamW's normalisation blows up to updates of order lr, differently on every layout.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ma_ray.model.naming import GlobalSlice, head_slices


class AttentionShard(nn.Module):
    def __init__(self, model_cfg, heads: Sequence[int]):
        super().__init__()
        self.heads = list(heads)
        self.head_dim = model_cfg.attention_head_size
        self.dropout = model_cfg.attention_probs_dropout_prob
        hidden, width = model_cfg.hidden_size, len(self.heads) * self.head_dim
        self.q_weight = nn.Parameter(torch.empty(width, hidden))
        self.q_bias = nn.Parameter(torch.empty(width))
        self.k_weight = nn.Parameter(torch.empty(width, hidden))
        self.v_weight = nn.Parameter(torch.empty(width, hidden))
        self.v_bias = nn.Parameter(torch.empty(width))
        self.o_weight = nn.Parameter(torch.empty(hidden, width))

    def global_slices(self, layer: int) -> Iterator[GlobalSlice]:
        return head_slices(f"layers.{layer}.attn", "", self.heads, self.head_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` [B, T, hidden] (the whole micro-batch) -> partial output projection [B, T, hidden]."""
        b, t, _ = h.shape
        nh, d = len(self.heads), self.head_dim

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, t, nh, d).transpose(1, 2)

        q = split(F.linear(h, self.q_weight, self.q_bias))
        k = split(F.linear(h, self.k_weight))
        v = split(F.linear(h, self.v_weight, self.v_bias))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return F.linear(out.transpose(1, 2).reshape(b, t, nh * d), self.o_weight)
