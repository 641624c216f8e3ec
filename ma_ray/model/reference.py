"""The single-process reference model: the oracle every distributed layout must match.

A decoder-only MoE language model as the methodology configures it, written plainly (nanoGPT
style) and independently of the sharded pieces:

* token + learned position embeddings, embedding dropout;
* pre-LN blocks: ``x += drop(attn(ln1(x)))``, ``x += drop(moe(ln2(x)))`` (pre-LN because it trains
  stably without warm-up tricks at small scale, and its residual stream is what crosses between
  the pools);
* causal multi-head attention through ``scaled_dot_product_attention`` (scale 1/sqrt(head_dim));
* MoE feed-forward: linear gate without bias, softmax, top-k, capacity with a fixed drop order
  (``ma_ray.model.router``), experts hidden -> intermediate -> hidden with ``model.hidden_act``
  (GELU by default) between;
* final LayerNorm and an untied LM head without bias; cross-entropy loss.

Loss of a micro-batch = CE + aux_loss_alpha * sum_layers(aux) + router_z_loss_coef * sum_layers(z).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import nn
from torch.nn import functional as F

from ma_ray.model import router as R
from ma_ray.model.naming import GlobalSlice, initialize


@dataclass
class LossParts:
    """A micro-batch's loss and its parts (aux and z summed over layers, unweighted)."""
    total: torch.Tensor
    ce: torch.Tensor
    aux: torch.Tensor
    z: torch.Tensor

    def detached(self) -> Dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "ce", "aux", "z")}


def combine_loss(cfg, ce, aux, z) -> LossParts:
    return LossParts(ce + cfg.moe.aux_loss_alpha * aux + cfg.moe.router_z_loss_coef * z, ce, aux, z)


# ``model.hidden_act`` -> activation module (kept apart from experts.py's table on purpose: the
# tests compare the two).
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class Expert(nn.Module):
    def __init__(self, hidden: int, inner: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = ACTIVATIONS[hidden_act]()
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MoEBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m, moe = cfg.model, cfg.moe
        self.moe = moe
        self.gate = nn.Linear(m.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(m.hidden_size, m.intermediate_size, m.hidden_act)
                                     for _ in range(moe.num_experts))

    def forward(self, h: torch.Tensor):
        b, t, hidden = h.shape
        flat = h.reshape(b * t, hidden)
        logits = self.gate(flat)
        probs, topk_prob, topk_idx = R.route(logits, self.moe.top_k, self.moe.norm_topk_prob)
        cap = R.capacity(b * t, self.moe.top_k, self.moe.num_experts, self.moe.capacity_factor,
                         self.moe.expert_capacity)
        keep = R.capacity_keep(topk_idx, self.moe.num_experts, cap)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((topk_idx == e) & keep, as_tuple=True)
            if token.numel():
                weight = topk_prob[token, slot].unsqueeze(-1).to(flat.dtype)
                out = out.index_add(0, token, weight * expert(flat[token]))
        counts = R.expert_counts(topk_idx, self.moe.num_experts, t, self.moe.seq_aux)
        aux = R.load_balance_loss(probs, 0, counts, t, b * t, self.moe.top_k, self.moe.seq_aux)
        z = R.z_loss(logits, b * t)
        return out.reshape(b, t, hidden), aux, z


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.heads, self.head_dim = m.num_attention_heads, m.attention_head_size
        self.dropout = m.attention_probs_dropout_prob
        self.q = nn.Linear(m.hidden_size, m.hidden_size)
        self.k = nn.Linear(m.hidden_size, m.hidden_size, bias=False)  # see attention.py: no key bias
        self.v = nn.Linear(m.hidden_size, m.hidden_size)
        self.o = nn.Linear(m.hidden_size, m.hidden_size)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.ln1 = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.moe = MoEBlock(cfg)
        self.drop = nn.Dropout(m.hidden_dropout_prob)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        y, aux, z = self.moe(self.ln2(x))
        return x + self.drop(y), aux, z


class MoETransformer(nn.Module):
    def __init__(self, cfg, seed: int | None = None):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.positions = nn.Embedding(m.max_position_embeddings, m.hidden_size)
        self.drop = nn.Dropout(m.hidden_dropout_prob)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(m.num_layers))
        self.final_ln = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.lm_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        initialize(self, self.global_slices(), m.initializer_range, cfg.train.seed if seed is None else seed)

    def global_slices(self) -> List[GlobalSlice]:
        m = self.cfg.model
        d = m.attention_head_size
        out = [GlobalSlice("embed.tokens", "tokens.weight"), GlobalSlice("embed.positions", "positions.weight")]
        for l in range(m.num_layers):
            p = f"blocks.{l}."
            out += [GlobalSlice(f"layers.{l}.ln1.weight", p + "ln1.weight"),
                    GlobalSlice(f"layers.{l}.ln1.bias", p + "ln1.bias")]
            for h in range(m.num_attention_heads):
                lo, hi = h * d, (h + 1) * d
                for part in "qkv":
                    out.append(GlobalSlice(f"layers.{l}.attn.heads.{h}.{part}_weight", f"{p}attn.{part}.weight", 0, lo, hi))
                    if part != "k":
                        out.append(GlobalSlice(f"layers.{l}.attn.heads.{h}.{part}_bias", f"{p}attn.{part}.bias", 0, lo, hi))
                out.append(GlobalSlice(f"layers.{l}.attn.heads.{h}.o_weight", f"{p}attn.o.weight", 1, lo, hi))
            out += [GlobalSlice(f"layers.{l}.attn.o_bias", p + "attn.o.bias"),
                    GlobalSlice(f"layers.{l}.ln2.weight", p + "ln2.weight"),
                    GlobalSlice(f"layers.{l}.ln2.bias", p + "ln2.bias"),
                    GlobalSlice(f"layers.{l}.router.weight", p + "moe.gate.weight")]
            for e in range(self.cfg.moe.num_experts):
                q = f"{p}moe.experts.{e}."
                out += [GlobalSlice(f"layers.{l}.experts.{e}.fc1_weight", q + "fc1.weight"),
                        GlobalSlice(f"layers.{l}.experts.{e}.fc1_bias", q + "fc1.bias"),
                        GlobalSlice(f"layers.{l}.experts.{e}.fc2_weight", q + "fc2.weight"),
                        GlobalSlice(f"layers.{l}.experts.{e}.fc2_bias", q + "fc2.bias")]
        out += [GlobalSlice("final_ln.weight", "final_ln.weight"), GlobalSlice("final_ln.bias", "final_ln.bias"),
                GlobalSlice("lm_head.weight", "lm_head.weight")]
        return out

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> LossParts:
        b, t = ids.shape
        x = self.drop(self.tokens(ids) + self.positions(torch.arange(t, device=ids.device)))
        aux = z = R.at_least_fp32(x.new_zeros(()))
        for block in self.blocks:
            x, a, zz = block(x)
            aux, z = aux + a, z + zz
        logits = self.lm_head(self.final_ln(x))
        ce = F.cross_entropy(R.at_least_fp32(logits.reshape(b * t, -1)), targets.reshape(-1))
        return combine_loss(self.cfg, ce, aux, z)
