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
    bf16 mixed precision autocasts over fp32 master weights: fp32 weights (4) + fp32 gradients
    (4) + two fp32 AdamW moments (8) = 16 B. Its bf16 weight copies are no state: each op casts
    the weights it uses, and a matmul keeps its copy for backward like any activation. Matmul
    outputs and what crosses between GPUs are bf16 (2 B); the residual stream, LayerNorm inputs
    and statistics stay fp32, softmax and log-sum-exp at least fp32. fp32: 16 B, everything 4 B.
    No ZeRO sharding of optimizer states within a pool is assumed. With top-k gradient
    compression the error-feedback residuals are state too (``residual_bytes``).

Activations: what the roles keep (``runtime.attention_role``, ``runtime.moe_role``)
    Each term below mirrors a tensor the role's graphs save or its state holds from a
    micro-batch's forward to its backward; ``tests/unit/test_memory_kept.py`` measures both
    roles on CPU and holds the sum within 10 % of the count. ``tokens`` = micro_batch_size x
    seq_length; an attention GPU's slice is ceil(tokens / k) of them (sequence parallel), but its
    heads see the whole micro-batch (the pool all-gathers the LayerNorm output in the transfer
    dtype; the heads take it back in the master dtype, whose gradient the pool reduce-scatters). Outputs that backward reaches only as graph roots (the partial output
    projection, the routed rows, the expert outputs) are freed once sent.

    With activation checkpointing (the presets) the attention block is recomputed whole in the
    backward pass -- LayerNorm, the pool's all-gather (one more per layer and micro-batch, which
    the time model counts) and the heads -- so an attention GPU keeps per layer only slice-sized
    tensors: the residual stream, the reduce-scatter output, dropout masks, LN2's input, the
    router's input, logits and choices, and the expert outputs received with their combine; a
    MoE GPU keeps the rows it received. Without checkpointing the heads' terms (gathered input,
    Q, K, V, the attention output, the O projection's input, the weight copies) and the experts'
    (fc1 and GELU outputs, and a copy of an expert's weights per compute batch it has rows in)
    are kept too. With ``schedule.micro_batches_in_flight`` = m every in-flight micro-batch keeps
    its own.

    The peak adds to what is kept the largest transient of one op (``workspace_bytes``): on an
    attention GPU the LM head (its slice's logits in bf16 and fp32 with their gradients, and the
    head's weight copies) or a layer's backward (the recomputed layer and the gathered
    gradients); on a MoE GPU a layer's backward. Not counted: CUDA context, NCCL and cuBLAS
    workspaces and allocator fragmentation (together typically a few GB).

The paper preset against the methodology's 123.7 GB (``memory.*_budget_gb``; ``ma-ray plan`` prints both)
    bf16, k = 12, micro-batch 64 x 2048 (131,072 tokens), activation checkpointing on, fused
    attention, one micro-batch in flight:

    * attention GPU (3 heads): 20.6 GB at the peak = 7.1 GB of weights, gradients and AdamW
      moments (445.6 M parameters x 16 B, of which 420.4 M are replicated, 411.7 M of them the
      embeddings and the LM head) + 4.4 GB kept (1.0 GB a layer, 0.4 GB outside the layers) +
      9.1 GB while a layer is recomputed (the gathered input in fp32 and its three bf16 copies,
      5.4 GB, and the gathered gradients); the LM head of its 10,923-token slice with a 50,257
      vocabulary takes 7.6 GB. 42.6 GB without checkpointing, which keeps that gathered input
      in every layer.
    * MoE GPU (4 experts): 44.6 GB = 34.4 GB of state (2.148 B parameters x 16 B) + 2.7 GB kept
      (4 experts x 16,384 rows) + 7.5 GB for a layer's backward. Without checkpointing 176.6 GB:
      every compute batch (``schedule.communication_chunk_size`` rows) keeps its own bf16 copy
      of its experts' weights.

    Unfused attention (CPU's SDPA with dropout) would keep the (64, 3, 2048, 2048) scores,
    805 M x (2 B softmax output + 1 B dropout mask + 2 B dropout output) = 4.0 GB a layer, 16.1
    GB over the 4 layers without checkpointing; with it, only while one layer is recomputed.

    The methodology's 123.7 GB cannot be rebuilt from its own buffer shapes: they use the whole batch
    of 1024 rather than the micro-batch of 64 (its (1024, 3, 2048, 2048) score tensor alone is
    25.8 GB per layer in bf16), and no sum of them gives 123.7. It reads as a per-device budget
    (about 88 % of a 141 GB H200), not a need; the plan treats it as a budget and reports the
    estimate against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ma_ray.config import Config, ModelConfig
from ma_ray.parallel.hierarchy import TwoLevelLayout
from ma_ray.parallel.placement import ATTENTION, GpuAssignment, Plan, replicate

GB = 1e9  # decimal gigabytes, the unit of the methodology's figures


# --- precision -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    name: str
    working_param_bytes: int  # a low-precision copy kept beside the master weights (none here)
    master_param_bytes: int
    grad_bytes: int
    moment_bytes: int  # per AdamW moment; AdamW keeps two
    activation_bytes: int  # matmul outputs, and what crosses between GPUs (the transfer dtype)
    residual_bytes: int  # the residual stream, LayerNorm inputs and statistics (the master dtype)
    float_bytes: int  # softmax and log-sum-exp inputs and outputs: at least fp32
    cast_bytes: int  # a weight's autocast copy that a matmul saves (0: it saves the weight itself)

    @property
    def bytes_per_param(self) -> int:
        return self.working_param_bytes + self.master_param_bytes + self.grad_bytes + 2 * self.moment_bytes


def precision_of(cfg: Config) -> Precision:
    if cfg.train.mixed_precision == "bf16":
        return Precision("bf16", working_param_bytes=0, master_param_bytes=4, grad_bytes=4, moment_bytes=4,
                         activation_bytes=2, residual_bytes=4, float_bytes=4, cast_bytes=2)
    if cfg.train.mixed_precision == "fp64":
        return Precision("fp64", working_param_bytes=0, master_param_bytes=8, grad_bytes=8, moment_bytes=8,
                         activation_bytes=8, residual_bytes=8, float_bytes=8, cast_bytes=0)
    return Precision("fp32", working_param_bytes=0, master_param_bytes=4, grad_bytes=4, moment_bytes=4,
                     activation_bytes=4, residual_bytes=4, float_bytes=4, cast_bytes=0)


FP32_BYTES = 4
INDEX_BYTES = 8  # int64 indices
CUDA_MASK_BYTES = 1  # CUDA's fused dropout keeps a bool mask


def mask_bytes(device: str, element_bytes: int) -> int:
    """A dropout mask's bytes per element: a bool on CUDA; the CPU kernel keeps its scaled noise
    in the input's dtype."""
    return CUDA_MASK_BYTES if device == "cuda" else element_bytes


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
    kept_when_checkpointing: bool = False  # kept with checkpointing too (else recomputed in backward)
    recomputed: Optional[int] = None  # bytes while checkpointing recomputes it, if not ``bytes``


@dataclass(frozen=True)
class ActivationModel:
    """Activation terms of one worker, per micro-batch in flight: per layer and outside the
    layers, kept from a micro-batch's forward to its backward; and the transients of single
    ops, of which the largest adds to the peak (``backward_layer`` with the terms a checkpointed
    layer recomputes, or any one of ``workspace``)."""

    per_layer: Tuple[Term, ...]
    outside_layers: Tuple[Term, ...]
    workspace: Tuple[Term, ...]
    num_layers: int
    in_flight: int = 1  # micro-batches whose activations are alive at once
    backward_layer: Tuple[Term, ...] = ()  # beside a layer's terms while its backward runs

    def full_bytes(self) -> int:
        """Kept for backward without checkpointing: every layer's terms."""
        return self.in_flight * (self.num_layers * _sum(self.per_layer) + _sum(self.outside_layers))

    def checkpointed_bytes(self) -> int:
        """Kept with checkpointing: every layer's inputs and what no recompute rebuilds."""
        kept = _sum(t for t in self.per_layer if t.kept_when_checkpointing)
        return self.in_flight * (self.num_layers * kept + _sum(self.outside_layers))

    def recomputed_bytes(self) -> int:
        """One layer's terms that checkpointing rebuilds in its backward."""
        return sum(t.bytes if t.recomputed is None else t.recomputed
                   for t in self.per_layer if not t.kept_when_checkpointing)

    def workspace_bytes(self, checkpointing: bool = True) -> int:
        """The largest transient: a layer's backward (with its recompute) or a workspace term."""
        layer = _sum(self.backward_layer) + (self.recomputed_bytes() if checkpointing else 0)
        return max([layer] + [t.bytes for t in self.workspace])

    def largest_terms(self, count: int = 3) -> List[Tuple[str, int]]:
        """The biggest contributors without checkpointing (per-layer terms summed over layers)."""
        terms = [(t.name, self.num_layers * t.bytes) for t in self.per_layer]
        terms += [(t.name, t.bytes) for t in self.outside_layers]
        return sorted(terms, key=lambda nt: -nt[1])[:count]


def _sum(terms) -> int:
    return sum(t.bytes for t in terms)


def attention_activations(cfg: Config, num_heads: int, attention_gpus: int,
                          fused_attention: bool = True, device: str = "cuda") -> ActivationModel:
    """Activation terms of an attention GPU holding ``num_heads`` heads in a pool of
    ``attention_gpus``, as ``runtime.attention_role`` keeps them (``device``: whose dropout)."""
    m, p = cfg.model, precision_of(cfg)
    a, r, f, w = p.activation_bytes, p.residual_bytes, p.float_bytes, p.cast_bytes
    batch, seq, hidden = cfg.train.micro_batch_size, cfg.train.seq_length, m.hidden_size
    tokens = tokens_per_micro_batch(cfg)
    local = math.ceil(tokens / attention_gpus)  # this GPU's sequence-parallel token slice
    width = num_heads * m.attention_head_size
    scores = batch * num_heads * seq * seq
    experts, k = cfg.moe.num_experts, cfg.moe.top_k
    rows = local * k  # the slice's routed rows, none dropped
    dropout = m.hidden_dropout_prob > 0

    if fused_attention:
        core = [Term("attention output and log-sum-exp (fused attention)",
                     tokens * width * a + batch * num_heads * seq * FP32_BYTES)]
    else:
        core = [Term("attention probabilities (softmax output)", scores * a)]
        if m.attention_probs_dropout_prob > 0:
            core += [Term("attention dropout mask", scores * mask_bytes(device, a)),
                     Term("attention dropout output", scores * a)]
        core += [Term("attention output", tokens * width * a)]

    per_layer = [
        # Recomputed with checkpointing: LN1, the pool's all-gather and the heads.
        # Gathered in the activation dtype, taken back to the master dtype (whose gradient the
        # pool sums), and cast by autocast for each of the Q, K and V matmuls.
        Term("gathered LN1 output (Q/K/V input, whole micro-batch)", tokens * hidden * (r + (3 * a if w else 0))),
        Term("LN1 statistics", 2 * local * r),
        Term("Q, K, V of this GPU's heads", 3 * tokens * width * a),
        *core,
        Term("attention context (O projection input)", tokens * width * a),
        Term("autocast copies of the heads' weights", 4 * width * hidden * w),
        # Kept either way: the slice's residual stream, routing and combine.
        Term("residual slice (layer input, LN1 input)", local * hidden * r, True),
        Term("attention output slice (reduce-scatter output)", local * hidden * a, True),
        Term("residual dropout masks", (mask_bytes(device, r) + mask_bytes(device, a)) * local * hidden
             if dropout else 0, True),
        Term("residual after attention (LN2 input) and LN2 statistics", local * hidden * r + 2 * local * r, True),
        Term("router input and weight in the matmul dtype", local * hidden * a + experts * hidden * w, True),
        Term("router logits, probabilities and load-balance weights",
             local * experts * f * (3 if cfg.moe.seq_aux else 2) + (0 if cfg.moe.seq_aux else experts * f)
             + local * f, True),
        Term("top-k indices, gate weights and dispatch order",
             local * k * (INDEX_BYTES + f + INDEX_BYTES)
             + (local * k * f + local * f if cfg.moe.norm_topk_prob and k > 1 else 0), True),
        Term("expert outputs received for the combine", rows * hidden * a, True),
        Term("combine weights, weighted expert outputs and row indices",
             rows * (a + hidden * a + 2 * INDEX_BYTES), True),
    ]
    outside = [
        Term("final residual and its gradient", 2 * local * hidden * r),
        Term("embedding dropout mask", mask_bytes(device, r) * local * hidden if dropout else 0),
        Term("token ids and positions", 2 * local * INDEX_BYTES),
    ]
    workspace = [Term("final LN, LM-head logits and their gradients (activation dtype and fp32), "
                      "LM-head weight copies", local * hidden * r + local * m.vocab_size * (2 * a + 2 * f)
                      + 2 * m.vocab_size * hidden * w)]
    backward_layer = [Term("gradients of the partial O projection and of the gathered input",
                           tokens * hidden * (a + r))]
    return ActivationModel(tuple(per_layer), tuple(outside), tuple(workspace), m.num_layers,
                           cfg.schedule.micro_batches_in_flight, tuple(backward_layer))


def moe_rows(cfg: Config, num_experts: int) -> int:
    """Rows a MoE GPU holding ``num_experts`` experts computes per layer and micro-batch, at
    most: each expert full, but never more than every token's ``top_k`` choices."""
    tokens = tokens_per_micro_batch(cfg)
    return min(num_experts * min(expert_capacity(cfg), tokens), tokens * cfg.moe.top_k)


def moe_activations(cfg: Config, num_experts: int, attention_gpus: int, device: str = "cuda") -> ActivationModel:
    """Activation terms of a MoE GPU holding ``num_experts`` experts, every expert at capacity,
    as ``runtime.moe_role`` keeps them, rows coming from ``attention_gpus`` sources."""
    m, p = cfg.model, precision_of(cfg)
    a, w = p.activation_bytes, p.cast_bytes
    rows = moe_rows(cfg, num_experts)
    hidden, inner = m.hidden_size, m.intermediate_size
    sources = attention_gpus
    # Each compute batch casts the weights of every expert it has rows of, and without
    # checkpointing each cast is kept: one per chunk and per expert boundary inside the chunks
    # (each source's rows come sorted by expert, in chunks of communication_chunk_size rows).
    segments = math.ceil(rows / cfg.schedule.communication_chunk_size) + sources * num_experts
    cast = 2 * inner * hidden * w
    per_layer = [
        Term("rows received (fc1 input) and their expert order", rows * (hidden * a + INDEX_BYTES), True),
        Term("fc1 output (GELU input)", rows * inner * a),
        Term("GELU output (fc2 input)", rows * inner * a),
        Term("autocast copies of the experts' weights, per compute batch", segments * cast,
             recomputed=num_experts * cast),
    ]
    outside = [Term("expert outputs on their way back", rows * hidden * a)]
    backward_layer = [Term("output gradients received, input gradients and those still being sent",
                           4 * rows * hidden * a)]
    return ActivationModel(tuple(per_layer), tuple(outside), (), m.num_layers,
                           cfg.schedule.micro_batches_in_flight, tuple(backward_layer))


# --- per-GPU estimate ------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryEstimate:
    gpu: int
    role: str
    parameters: int  # count
    params_bytes: int  # master weights (and a working copy, where a precision keeps one)
    grads_bytes: int
    optimizer_bytes: int
    activations_full_bytes: int  # kept for backward without activation checkpointing
    activations_checkpointed_bytes: int  # kept for backward with activation checkpointing
    workspace_bytes: int  # the largest transient of one op, on top of what is kept
    checkpointing: bool  # which of the two the total uses (train.activation_checkpointing)
    fused_attention: bool
    residual_bytes: int = 0  # top-k compression's error feedback (comm.gradient_compression)

    @property
    def activations_bytes(self) -> int:
        return self.activations_checkpointed_bytes if self.checkpointing else self.activations_full_bytes

    @property
    def state_bytes(self) -> int:
        """Parameters, gradients, AdamW moments and residuals: held for the whole run."""
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.residual_bytes

    @property
    def kept_bytes(self) -> int:
        """What the worker holds between ops at the end of its forward passes."""
        return self.state_bytes + self.activations_bytes

    @property
    def total_bytes(self) -> int:
        """The peak: what is kept plus the largest transient."""
        return self.kept_bytes + self.workspace_bytes

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def to_dict(self) -> dict:
        """Sizes in GB (1e9 bytes)."""
        return {"parameters": self.parameters, "params_gb": self.params_bytes / GB,
                "grads_gb": self.grads_bytes / GB, "optimizer_gb": self.optimizer_bytes / GB,
                "residuals_gb": self.residual_bytes / GB,
                "activations_gb": self.activations_bytes / GB,
                "activations_full_gb": self.activations_full_bytes / GB,
                "activations_checkpointed_gb": self.activations_checkpointed_bytes / GB,
                "workspace_gb": self.workspace_bytes / GB, "kept_gb": self.kept_bytes / GB,
                "total_gb": self.total_gb,
                "checkpointing": self.checkpointing, "fused_attention": self.fused_attention}


def activation_model(cfg: Config, plan: Plan, gpu: GpuAssignment, fused_attention: bool = True,
                     device: str = "cuda") -> ActivationModel:
    if gpu.role == ATTENTION:
        return attention_activations(cfg, len(gpu.heads), plan.attention_gpus, fused_attention, device)
    return moe_activations(cfg, len(gpu.experts), plan.attention_gpus, device)


def residual_bytes(cfg: Config, plan: Plan, gpu: GpuAssignment) -> int:
    """Top-k compression's residuals on ``gpu``: of the replicated gradients, the pieces it sums
    across nodes (``comm.aggregation``: two levels only); of its sharded gradients, all of them,
    where replicas sum them with the same reducer."""
    if cfg.comm.gradient_compression != "topk":
        return 0
    grad = precision_of(cfg).grad_bytes
    out = 0
    if gpu.role == ATTENTION and cfg.comm.hierarchical_allreduce:
        layout = TwoLevelLayout.of_plan(replicate(plan.for_replica(0), plan.replicas))
        if layout.crosses_nodes:
            numel = attention_replicated_params(cfg)
            pieces = layout.flat_pieces(numel)
            out += max(sum(len(pieces[j]) for j in layout.pieces_of(rank)) for ranks in layout.nodes for rank in ranks) * grad
    if plan.replicas > 1:
        sharded = (cfg.model.num_layers * len(gpu.heads) * head_params(cfg.model) if gpu.role == ATTENTION
                   else moe_gpu_params(cfg, len(gpu.experts)))
        out += sharded * grad
    return out


def estimate_gpu(cfg: Config, plan: Plan, gpu: GpuAssignment, fused_attention: bool = True,
                 device: str = "cuda") -> MemoryEstimate:
    """The memory estimate of one GPU of ``plan`` (``device``: the kind its dropout runs on)."""
    p = precision_of(cfg)
    if gpu.role == ATTENTION:
        params = attention_gpu_params(cfg, len(gpu.heads))
    else:
        params = moe_gpu_params(cfg, len(gpu.experts))
    acts = activation_model(cfg, plan, gpu, fused_attention, device)
    checkpointing = cfg.train.activation_checkpointing
    return MemoryEstimate(
        gpu=gpu.gpu, role=gpu.role, parameters=params,
        params_bytes=params * (p.working_param_bytes + p.master_param_bytes),
        grads_bytes=params * p.grad_bytes, optimizer_bytes=params * 2 * p.moment_bytes,
        activations_full_bytes=acts.full_bytes(), activations_checkpointed_bytes=acts.checkpointed_bytes(),
        workspace_bytes=acts.workspace_bytes(checkpointing), checkpointing=checkpointing,
        fused_attention=fused_attention, residual_bytes=residual_bytes(cfg, plan, gpu))


def estimate_plan(cfg: Config, plan: Plan, fused_attention: bool = True) -> Tuple[MemoryEstimate, ...]:
    """Estimates of every GPU of ``plan``, indexed by global id."""
    return tuple(estimate_gpu(cfg, plan, g, fused_attention) for g in plan.gpus)


def budget_gb(cfg: Config, role: str) -> float:
    """The configured per-GPU memory budget of a pool (the methodology's figures by default)."""
    return cfg.memory.attention_gpu_budget_gb if role == ATTENTION else cfg.memory.moe_gpu_budget_gb
