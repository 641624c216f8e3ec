"""An expert group: any subset of the experts of one layer, computed for the rows routed to it.

The group's experts are stacked along a leading dimension so that a group can be cut and joined
by expert id. Rows arrive sorted by expert (the order the token dispatcher sends them in), with a
count per expert of the group.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ma_ray.model.naming import GlobalSlice, expert_slices

# ``model.hidden_act`` -> the experts' activation; the config's Literal lists the same names.
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class ExpertGroup(nn.Module):
    def __init__(self, model_cfg, experts: Sequence[int]):
        super().__init__()
        self.experts = list(experts)
        self.act = ACTIVATIONS[model_cfg.hidden_act]
        n, hidden, inner = len(self.experts), model_cfg.hidden_size, model_cfg.intermediate_size
        self.fc1_weight = nn.Parameter(torch.empty(n, inner, hidden))
        self.fc1_bias = nn.Parameter(torch.empty(n, inner))
        self.fc2_weight = nn.Parameter(torch.empty(n, hidden, inner))
        self.fc2_bias = nn.Parameter(torch.empty(n, hidden))

    def global_slices(self, layer: int) -> Iterator[GlobalSlice]:
        return expert_slices(f"layers.{layer}", "", self.experts)

    def forward(self, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """``rows`` [sum(counts), hidden] sorted by the group's experts -> outputs, same layout."""
        outs = []
        for i, chunk in enumerate(torch.split(rows, list(counts))):
            if chunk.shape[0] == 0:
                continue
            inner = self.act(F.linear(chunk, self.fc1_weight[i], self.fc1_bias[i]))
            outs.append(F.linear(inner, self.fc2_weight[i], self.fc2_bias[i]))
        if not outs:
            # Still a function of the parameters, so a backward over it runs (and does nothing).
            return rows.new_zeros(rows.shape) + 0.0 * self.fc2_bias.sum()
        return torch.cat(outs)
