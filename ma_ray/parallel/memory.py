"""Memory estimate per GPU: parameters, gradients, AdamW states and activations of one worker.

What an attention GPU holds
    Its heads' slices of every layer: per head, Q, K and V rows (weight [head_dim, hidden] each,
    bias [head_dim] for Q and V only: the model has no key bias, see ``ma_ray.model.attention``)
    and the head's columns of the output projection ([hidden, head_dim], no bias), plus the pieces the attention side keeps whole (replicated on every attention GPU):
    token and position embeddings, both LayerNorms of every layer, the attention output bias
    [hidden], the router gate [num_experts, hidden] (no bias), the final LayerNorm and the untied
    LM head [vocab, hidden] (no bias).

What a MoE GPU holds
    Its experts of every layer: fc1 [intermediate, hidden] + bias [intermediate] and fc2
    [hidden, intermediate] + bias [hidden].

Precision (bytes per parameter)
    bf16 mixed precision: a bf16 working copy (2) + fp32 master weights (4) + fp32 gradients (4)
    + two fp32 AdamW moments (8) = 18 B; activations in bf16 (2 B), router probabilities and the
    cross-entropy's log-probabilities in fp32. fp32: weights (4) + gradients (4) + moments (8) =
    16 B; activations 4 B. No ZeRO sharding of optimizer states within a pool is assumed.

Activations (bytes that autograd keeps for the backward pass, one micro-batch in flight)
    ``tokens`` = micro_batch_size x seq_length. The attention side is tensor parallel: every
    attention GPU runs the whole micro-batch through its heads (the all-gathered LayerNorm output,
    Q, K, V and the attention context are full-micro-batch tensors of its heads' width), while the
    residual stream, LayerNorms, router, combine and LM head are sequence parallel: each attention
    GPU keeps a ceil(tokens / k) token slice. The core attention is either fused (SDPA / flash
    attention, what ``ma_ray.model.attention`` calls on GPU: it keeps only the output and a fp32
    log-sum-exp per row, and regenerates its dropout mask from the RNG seed) or unfused (the
    [batch, heads, seq, seq] softmax output, dropout mask and dropout output are kept: 2 + 1 + 2
    bytes per score in bf16). A MoE GPU keeps, per layer, the rows routed to its experts at full
    capacity (``capacity = ceil(capacity_factor * tokens * top_k / num_experts)`` per expert, or
    ``moe.expert_capacity``): their input, the fc1 output (for GELU) and the GELU output (for fc2).
    Without checkpointing every layer's terms are kept. With activation checkpointing (full
    recompute, one checkpoint per sub-layer on each worker) only each layer's inputs are kept --
    on an attention GPU its residual slice and the expert outputs it received (these come from the
    other pool and are not recomputed), on a MoE GPU the rows it received -- plus one layer's full
    terms while that layer is recomputed in the backward pass. Workspace adds the largest
    transient buffer: the attention GPU's partial output projection of the whole micro-batch
    before its reduce-scatter, the MoE GPU's outgoing expert outputs. Not counted: CUDA context,
    NCCL and cuBLAS workspaces and allocator fragmentation (together typically a few GB). With
    ``schedule.micro_batches_in_flight`` > 1 (the pipelined schedule) every in-flight micro-batch keeps
    its own saved activations, so those are multiplied by it (the one layer being recomputed and
    the workspace are not); the presets use 1.

The paper preset against the seed's 123.7 GB (``memory.*_budget_gb``; ``ma-ray plan`` prints both)
    bf16, k = 12, micro-batch 64 x 2048 (131,072 tokens), activation checkpointing on, fused
    attention:

    * attention GPU (3 heads): 15.8 GB = 8.0 GB of weights, gradients and AdamW states (445.6 M
      parameters x 18 B, of which 420.4 M are replicated, 411.7 M of them the embeddings and the
      LM head) + 6.7 GB of activations (3.3 GB of LM-head logits for its 10,923-token slice with a
      50,257 vocabulary, 1.1 GB of layer inputs kept over 4 layers, 2.1 GB for the one layer being
      recomputed, 0.2 GB final LayerNorm and embedding mask) + 1.1 GB reduce-scatter buffer. 21.1 GB without checkpointing.
    * MoE GPU (4 experts): 46.2 GB = 38.7 GB of weights, gradients and AdamW states (2.148 B
      parameters x 18 B) + 7.0 GB of activations (4 experts x 16,384 rows) + 0.5 GB. 58.5 GB
      without checkpointing.

    Which activation term dominates on an attention GPU: unfused, the (64, 3, 2048, 2048) score
    tensor, 805 M scores x (2 B softmax output + 1 B dropout mask + 2 B dropout output) = 4.0 GB
    per layer, 16.1 GB over the 4 layers -- the attention GPU then needs 19.8 GB with checkpointing
    and 37.2 GB without. SDPA / flash attention never materialises it (1.6 MB of log-sum-exp per
    layer); then the largest terms are the LM-head logits (3.3 GB) and the all-gathered LayerNorm
    output that feeds Q/K/V (64 x 2048 x 4096 x 2 B = 1.07 GB per layer).

    The seed's 123.7 GB is far above all of these and cannot be rebuilt from its own buffer
    shapes either: they use the whole batch of 1024 rather than the micro-batch of 64 (its
    (1024, 3, 2048, 2048) score tensor alone is 25.8 GB per layer in bf16), and no sum of them
    gives 123.7. It reads as a per-device budget (about 88 % of a 141 GB H200), not a need; the
    plan treats it as a budget and reports the estimate against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

from ma_ray.config import Config, ModelConfig
from ma_ray.parallel.placement import ATTENTION, GpuAssignment, Plan

GB = 1e9  # decimal gigabytes, the unit of the seed's figures


# --- precision -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    name: str
    working_param_bytes: int  # the low-precision copy used for compute (0 when it is the master)
    master_param_bytes: int
    grad_bytes: int
    moment_bytes: int  # per AdamW moment; AdamW keeps two
    activation_bytes: int

    @property
    def bytes_per_param(self) -> int:
        return self.working_param_bytes + self.master_param_bytes + self.grad_bytes + 2 * self.moment_bytes


def precision_of(cfg: Config) -> Precision:
    if cfg.train.mixed_precision == "bf16":
        return Precision("bf16", working_param_bytes=2, master_param_bytes=4, grad_bytes=4,
                         moment_bytes=4, activation_bytes=2)
    if cfg.train.mixed_precision == "fp64":
        return Precision("fp64", working_param_bytes=0, master_param_bytes=8, grad_bytes=8,
                         moment_bytes=8, activation_bytes=8)
    return Precision("fp32", working_param_bytes=0, master_param_bytes=4, grad_bytes=4,
                     moment_bytes=4, activation_bytes=4)


FP32_BYTES = 4
MASK_BYTES = 1  # dropout masks are bool tensors


# --- parameter counts ------------------------------------------------------------------------

def head_params(model: ModelConfig) -> int:
    """One head of one layer: Q, K, V rows, the Q and V biases (no key bias), the head's O columns."""
    hidden, head_dim = model.hidden_size, model.attention_head_size
    return 3 * head_dim * hidden + 2 * head_dim + hidden * head_dim


def expert_params(model: ModelConfig) -> int:
    """One expert of one layer: fc1 and fc2 with biases."""
    hidden, inner = model.hidden_size, model.intermediate_size
    return inner * hidden + inner + hidden * inner + hidden


def attention_layer_replicated_params(cfg: Config) -> int:
    """Per layer, held by every attention GPU: LN1, LN2, attention output bias, router gate."""
    hidden = cfg.model.hidden_size
    return 2 * hidden + 2 * hidden + hidden + cfg.moe.num_experts * hidden


def attention_replicated_params(cfg: Config) -> int:
    """Everything every attention GPU holds whole: embeddings, per-layer pieces, final LN, LM head."""
    m = cfg.model
    embeddings = m.vocab_size * m.hidden_size + m.max_position_embeddings * m.hidden_size
    lm_head = m.vocab_size * m.hidden_size
    final_ln = 2 * m.hidden_size
    return embeddings + m.num_layers * attention_layer_replicated_params(cfg) + final_ln + lm_head


def attention_gpu_params(cfg: Config, num_heads: int) -> int:
    return cfg.model.num_layers * num_heads * head_params(cfg.model) + attention_replicated_params(cfg)


def moe_gpu_params(cfg: Config, num_experts: int) -> int:
    return cfg.model.num_layers * num_experts * expert_params(cfg.model)


def model_params(cfg: Config) -> int:
    """The whole model (what the single-process reference holds)."""
    m = cfg.model
    return (m.num_layers * (m.num_attention_heads * head_params(m) + cfg.moe.num_experts * expert_params(m))
            + attention_replicated_params(cfg))


# --- token counts ----------------------------------------------------------------------------

def tokens_per_micro_batch(cfg: Config) -> int:
    return cfg.train.micro_batch_size * cfg.train.seq_length


def expert_capacity(cfg: Config) -> int:
    """Rows per expert per micro-batch; the same rule as ``ma_ray.model.router.capacity``."""
    moe = cfg.moe
    if moe.expert_capacity is not None:
        return moe.expert_capacity
    return math.ceil(moe.capacity_factor * tokens_per_micro_batch(cfg) * moe.top_k / moe.num_experts)


# --- activations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    kept_when_checkpointing: bool = False  # a layer input that full recompute still keeps


@dataclass(frozen=True)
class ActivationModel:
    """Activation terms of one worker: per layer, outside the layers, and transient workspace."""

    per_layer: Tuple[Term, ...]
    outside_layers: Tuple[Term, ...]
    workspace: Tuple[Term, ...]
    num_layers: int
    in_flight: int = 1  # micro-batches whose activations are alive at once

    def full_bytes(self) -> int:
        """Kept for backward without checkpointing: every layer's terms."""
        return self.in_flight * (self.num_layers * _sum(self.per_layer) + _sum(self.outside_layers))

    def checkpointed_bytes(self) -> int:
        """Kept with full recompute: every layer's inputs plus one layer being recomputed."""
        kept = _sum(t for t in self.per_layer if t.kept_when_checkpointing)
        return self.in_flight * (self.num_layers * kept + _sum(self.outside_layers)) + _sum(self.per_layer)

    def workspace_bytes(self) -> int:
        return _sum(self.workspace)

    def largest_terms(self, count: int = 3) -> List[Tuple[str, int]]:
        """The biggest contributors without checkpointing (per-layer terms summed over layers)."""
        terms = [(t.name, self.num_layers * t.bytes) for t in self.per_layer]
        terms += [(t.name, t.bytes) for t in self.outside_layers]
        return sorted(terms, key=lambda nt: -nt[1])[:count]


def _sum(terms) -> int:
    return sum(t.bytes for t in terms)


def _mask(prob: float, elements: int) -> int:
    # Dropout keeps a mask only when it is on.
    return MASK_BYTES * elements if prob > 0 else 0


def attention_activations(cfg: Config, num_heads: int, attention_gpus: int,
                          fused_attention: bool = True) -> ActivationModel:
    """Activation terms of an attention GPU holding ``num_heads`` heads in a pool of ``attention_gpus``."""
    m, a = cfg.model, precision_of(cfg).activation_bytes
    batch, seq, hidden = cfg.train.micro_batch_size, cfg.train.seq_length, m.hidden_size
    tokens = tokens_per_micro_batch(cfg)
    local = math.ceil(tokens / attention_gpus)  # this GPU's sequence-parallel token slice
    width = num_heads * m.attention_head_size
    scores = batch * num_heads * seq * seq
    p_hidden, p_attn = m.hidden_dropout_prob, m.attention_probs_dropout_prob

    if fused_attention:
        core = [Term("attention log-sum-exp (fused attention)", batch * num_heads * seq * FP32_BYTES)]
    else:
        core = [Term("attention probabilities (softmax output)", scores * a)]
        if p_attn > 0:
            core += [Term("attention dropout mask", scores * MASK_BYTES),
                     Term("attention dropout output", scores * a)]

    per_layer = [
        Term("residual slice (layer input, LN1 input)", local * hidden * a, kept_when_checkpointing=True),
        Term("gathered LN1 output (Q/K/V input, whole micro-batch)", tokens * hidden * a),
        Term("Q, K, V of this GPU's heads", 3 * tokens * width * a),
        *core,
        Term("attention context (kept by attention and by O projection)", 2 * tokens * width * a),
        Term("residual dropout masks", _mask(p_hidden, 2 * local * hidden)),
        Term("LN2 input and output (router and dispatch input)", 2 * local * hidden * a),
        Term("LayerNorm statistics", 2 * 2 * local * FP32_BYTES),
        Term("router logits and fp32 probabilities", local * cfg.moe.num_experts * (a + FP32_BYTES)),
        Term("expert outputs received for the combine", local * cfg.moe.top_k * hidden * a,
             kept_when_checkpointing=True),
    ]
    outside = [
        Term("embedding dropout mask", _mask(p_hidden, local * hidden)),
        Term("final LN input and output", 2 * local * hidden * a),
        Term("LM-head logits (activation dtype + fp32 log-probabilities)",
             local * m.vocab_size * (a + FP32_BYTES)),
    ]
    workspace = [Term("partial O projection of the whole micro-batch (reduce-scatter buffer)",
                      tokens * hidden * a)]
    return ActivationModel(tuple(per_layer), tuple(outside), tuple(workspace), m.num_layers,
                           cfg.schedule.micro_batches_in_flight)


def moe_activations(cfg: Config, num_experts: int) -> ActivationModel:
    """Activation terms of a MoE GPU holding ``num_experts`` experts, every expert at capacity."""
    m, a = cfg.model, precision_of(cfg).activation_bytes
    # An expert sees each token at most once, so a fixed capacity above the token count is not reached.
    rows = num_experts * min(expert_capacity(cfg), tokens_per_micro_batch(cfg))
    per_layer = [
        Term("rows received (fc1 input)", rows * m.hidden_size * a, kept_when_checkpointing=True),
        Term("fc1 output (GELU input)", rows * m.intermediate_size * a),
        Term("GELU output (fc2 input)", rows * m.intermediate_size * a),
    ]
    workspace = [Term("expert outputs to send back", rows * m.hidden_size * a)]
    return ActivationModel(tuple(per_layer), (), tuple(workspace), m.num_layers, cfg.schedule.micro_batches_in_flight)


# --- per-GPU estimate ------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    gpu: int
    role: str
    parameters: int  # count
    params_bytes: int  # working copy + master weights
    grads_bytes: int
    optimizer_bytes: int
    activations_full_bytes: int  # without activation checkpointing
    activations_checkpointed_bytes: int  # with activation checkpointing
    workspace_bytes: int
    checkpointing: bool  # which of the two the total uses (train.activation_checkpointing)
    fused_attention: bool

    @property
    def activations_bytes(self) -> int:
        return self.activations_checkpointed_bytes if self.checkpointing else self.activations_full_bytes

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes \
            + self.workspace_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def to_dict(self) -> dict:
        """Sizes in GB (1e9 bytes)."""
        return {"parameters": self.parameters, "params_gb": self.params_bytes / GB,
                "grads_gb": self.grads_bytes / GB, "optimizer_gb": self.optimizer_bytes / GB,
                "activations_gb": self.activations_bytes / GB,
                "activations_full_gb": self.activations_full_bytes / GB,
                "activations_checkpointed_gb": self.activations_checkpointed_bytes / GB,
                "workspace_gb": self.workspace_bytes / GB, "total_gb": self.total_gb,
                "checkpointing": self.checkpointing, "fused_attention": self.fused_attention}


def activation_model(cfg: Config, plan: Plan, gpu: GpuAssignment, fused_attention: bool = True) -> ActivationModel:
    if gpu.role == ATTENTION:
        return attention_activations(cfg, len(gpu.heads), plan.attention_gpus, fused_attention)
    return moe_activations(cfg, len(gpu.experts))


def estimate_gpu(cfg: Config, plan: Plan, gpu: GpuAssignment, fused_attention: bool = True) -> MemoryEstimate:
    """The memory estimate of one GPU of ``plan``."""
    p = precision_of(cfg)
    if gpu.role == ATTENTION:
        params = attention_gpu_params(cfg, len(gpu.heads))
    else:
        params = moe_gpu_params(cfg, len(gpu.experts))
    acts = activation_model(cfg, plan, gpu, fused_attention)
    return MemoryEstimate(
        gpu=gpu.gpu, role=gpu.role, parameters=params,
        params_bytes=params * (p.working_param_bytes + p.master_param_bytes),
        grads_bytes=params * p.grad_bytes, optimizer_bytes=params * 2 * p.moment_bytes,
        activations_full_bytes=acts.full_bytes(), activations_checkpointed_bytes=acts.checkpointed_bytes(),
        workspace_bytes=acts.workspace_bytes(), checkpointing=cfg.train.activation_checkpointing,
        fused_attention=fused_attention)


def estimate_plan(cfg: Config, plan: Plan, fused_attention: bool = True) -> Tuple[MemoryEstimate, ...]:
    """Estimates of every GPU of ``plan``, indexed by global id."""
    return tuple(estimate_gpu(cfg, plan, g, fused_attention) for g in plan.gpus)


def budget_gb(cfg: Config, role: str) -> float:
    """The configured per-GPU memory budget of a pool (the seed's figures by default)."""
    return cfg.memory.attention_gpu_budget_gb if role == ATTENTION else cfg.memory.moe_gpu_budget_gb
