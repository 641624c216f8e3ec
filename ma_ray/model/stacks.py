"""What one worker of each pool holds of the model, composed from the model's pieces: an
attention worker's heads of every layer with the attention side's replicated pieces, and a MoE
worker's experts of every layer. Their global slices name every parameter layout-independently.
"""

from __future__ import annotations

from typing import List, Sequence

from torch import nn

from ma_ray.model.attention import AttentionShard
from ma_ray.model.attention_side import AttentionSideParams
from ma_ray.model.experts import ExpertGroup
from ma_ray.model.naming import GlobalSlice, prefixed


class AttentionStack(nn.Module):
    """The heads ``heads`` of every layer, plus embeddings, LayerNorms, router and LM head."""

    def __init__(self, cfg, heads: Sequence[int]):
        super().__init__()
        self.side = AttentionSideParams(cfg)
        self.shards = nn.ModuleList(AttentionShard(cfg.model, heads) for _ in range(cfg.model.num_layers))

    def global_slices(self) -> List[GlobalSlice]:
        out = list(prefixed(self.side.global_slices(), "side"))
        for layer, shard in enumerate(self.shards):
            out += prefixed(shard.global_slices(layer), f"shards.{layer}")
        return out


class ExpertStack(nn.Module):
    """The experts ``experts`` of every layer."""

    def __init__(self, cfg, experts: Sequence[int]):
        super().__init__()
        self.groups = nn.ModuleList(ExpertGroup(cfg.model, experts) for _ in range(cfg.model.num_layers))

    def global_slices(self) -> List[GlobalSlice]:
        out: List[GlobalSlice] = []
        for layer, group in enumerate(self.groups):
            out += prefixed(group.global_slices(layer), f"groups.{layer}")
        return out


def stack_for(cfg, assignment) -> nn.Module:
    """The stack a worker of ``assignment`` (``parallel.placement.GpuAssignment``) holds."""
    return AttentionStack(cfg, assignment.heads) if assignment.is_attention else ExpertStack(cfg, assignment.experts)
