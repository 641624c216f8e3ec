"""The parameters every attention worker holds whole, and the per-token stages that use them.

Besides its heads, the attention side owns the pieces that act on single tokens: embeddings, both
LayerNorms of every layer, the attention output bias, the router gate, the final LayerNorm and the
LM head. An attention worker applies them to its own *slice* of the micro-batch's tokens (as
Megatron's sequence parallelism does), so no token-wise work is repeated across the pool, and each
worker's gradient of these parameters is a partial sum: the pool all-reduces it.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ma_ray.model.naming import GlobalSlice
from ma_ray.model.router import at_least_fp32


class AttentionSideParams(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m, layers = cfg.model, cfg.model.num_layers
        self.tokens = nn.Parameter(torch.empty(m.vocab_size, m.hidden_size))
        self.positions = nn.Parameter(torch.empty(m.max_position_embeddings, m.hidden_size))
        self.ln1 = nn.ModuleList(nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps) for _ in range(layers))
        self.ln2 = nn.ModuleList(nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps) for _ in range(layers))
        self.o_bias = nn.ParameterList(nn.Parameter(torch.empty(m.hidden_size)) for _ in range(layers))
        self.router = nn.ParameterList(nn.Parameter(torch.empty(cfg.moe.num_experts, m.hidden_size)) for _ in range(layers))
        self.final_ln = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.lm_head = nn.Parameter(torch.empty(m.vocab_size, m.hidden_size))
        self.drop = nn.Dropout(m.hidden_dropout_prob)

    def global_slices(self) -> List[GlobalSlice]:
        out = [GlobalSlice("embed.tokens", "tokens"), GlobalSlice("embed.positions", "positions")]
        for l in range(len(self.ln1)):
            out += [GlobalSlice(f"layers.{l}.ln1.weight", f"ln1.{l}.weight"),
                    GlobalSlice(f"layers.{l}.ln1.bias", f"ln1.{l}.bias"),
                    GlobalSlice(f"layers.{l}.attn.o_bias", f"o_bias.{l}"),
                    GlobalSlice(f"layers.{l}.ln2.weight", f"ln2.{l}.weight"),
                    GlobalSlice(f"layers.{l}.ln2.bias", f"ln2.{l}.bias"),
                    GlobalSlice(f"layers.{l}.router.weight", f"router.{l}")]
        out += [GlobalSlice("final_ln.weight", "final_ln.weight"), GlobalSlice("final_ln.bias", "final_ln.bias"),
                GlobalSlice("lm_head.weight", "lm_head")]
        return out

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids and their positions (a flat slice of the micro-batch) -> residual stream [n, hidden]."""
        return self.drop(F.embedding(ids, self.tokens) + F.embedding(positions, self.positions))

    def pre_attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.ln1[layer](x)

    def post_attention(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual after attention, the MoE block's input, and the router logits of this slice."""
        x1 = x + self.drop(attn + self.o_bias[layer])
        h2 = self.ln2[layer](x1)
        return x1, h2, F.linear(h2, self.router[layer])

    def post_moe(self, x1: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
        return x1 + self.drop(moe_out)

    def ce_sum(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum (not mean) of this slice's cross-entropy; divide by the micro-batch's token count."""
        logits = F.linear(self.final_ln(x), self.lm_head)
        return F.cross_entropy(at_least_fp32(logits), targets, reduction="sum")
