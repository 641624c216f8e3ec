"""Paper-scale emulation: how long each stage and transfer of a worker would take at the
configured shapes, and the small model that actually runs meanwhile.

With ``emulation.modelled_compute`` the workers run the real model code and collectives on stand-in
tensors (``stand_in_config``: the configured heads, experts, layers and topology, with tiny widths and
a short micro-batch) and queue each stage's predicted duration on an emulated device timeline
(``runtime.device.ModelledDevice``). So the schedule, routing, placement and every message are real,
and the timings the controller sees are those of the configured (e.g. paper) shapes.

Stage durations come from the time model of ``parallel.workload``: the methodology's formula at the
reference split (``cluster.attention_gpus``), split into per-GPU work terms, evaluated at a
worker's own heads, token slice, experts and routed rows. Its coefficients are the balance
section's, or a calibration file's when one is given. A stage (one layer of one micro-batch) is
one third forward and two thirds backward, the usual ratio for matmul-bound layers.

Transfers: a message standing for ``n`` bytes at the configured shapes takes ``n / bandwidth``
on the link between its two GPUs (NVLink within a node, the network between nodes); a worker
receives its messages one after another (one inbound link per GPU). Collectives over the attention
pool are rings: an all-gather or reduce-scatter moves ``(k - 1) / k`` of the full tensor over
each GPU's link, an all-reduce twice that, at the slowest link the ring crosses; in two levels
(``comm.hierarchical_allreduce``), each level at its own link's speed (``parallel.hierarchy``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import yaml

from ma_ray.config import Config, ConfigError
from ma_ray.errors import is_number
from ma_ray.parallel.hierarchy import TwoLevelLayout, flat_ring_s, two_level_s
from ma_ray.parallel.memory import (attention_replicated_params, head_params, moe_gpu_params, precision_of,
                                    tokens_per_micro_batch)
from ma_ray.parallel.placement import replicate
from ma_ray.parallel.workload import Workload


def stand_in_config(cfg: Config) -> Config:
    """The configuration the workers really compute with under emulation: the same layers, heads,
    experts, routing and topology, with the ``emulation.stand_in_*`` widths and micro-batch."""
    e, m = cfg.emulation, cfg.model
    tokens = e.stand_in_seq_length * e.stand_in_micro_batch_size
    capacity = cfg.moe.expert_capacity
    if capacity is not None:  # keep the fixed capacity's share of a micro-batch's rows
        capacity = max(1, round(capacity * tokens / tokens_per_micro_batch(cfg)))
    return cfg.replace(**{
        "model.hidden_size": m.num_attention_heads * e.stand_in_head_size,
        "model.attention_head_size": e.stand_in_head_size,
        "model.intermediate_size": e.stand_in_intermediate_size,
        "model.vocab_size": e.stand_in_vocab_size,
        "model.max_position_embeddings": e.stand_in_seq_length,
        "moe.expert_capacity": capacity,
        "train.seq_length": e.stand_in_seq_length,
        "train.micro_batch_size": e.stand_in_micro_batch_size,
        "train.batch_size": e.stand_in_micro_batch_size * cfg.train.gradient_accumulation_steps,
        "data.kind": "synthetic", "data.path": None,
    })


def load_calibration(path: str) -> Tuple[list, list]:
    """(attn_time_coef, moe_time_coef) from a calibration YAML; ConfigError on a bad file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"emulation.calibration_file: not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"emulation.calibration_file: {p} is not readable YAML ({type(exc).__name__})") from None
    out = []
    for key in ("attn_time_coef", "moe_time_coef"):
        coef = data.get(key) if isinstance(data, dict) else None
        if (not isinstance(coef, list) or len(coef) != 3
                or not all(is_number(c) and math.isfinite(c) and c >= 0
                           for c in coef)):
            raise ConfigError(f"emulation.calibration_file: {p} needs {key}: three non-negative numbers")
        out.append([float(c) for c in coef])
    return out[0], out[1]


@dataclass(frozen=True)
class StageDurations:
    """Predicted seconds of a worker's stages and transfers at the configured shapes. Pure and
    picklable: built once by the driver and handed to every worker."""

    attention_terms: Tuple[float, float, float]  # constant, heads, tokens: seconds at the reference
    moe_terms: Tuple[float, float, float]  # constant, experts, rows: seconds at the reference
    reference: Tuple[int, int, int, float]  # heads, tokens, experts, rows of the reference split
    coefficients: Tuple[list, list]  # the methodology-form coefficients used, for the record
    source: str  # where they came from
    token_scale: float  # configured tokens per micro-batch over the stand-in's
    hidden_size: int
    activation_bytes: int
    replicated_grad_bytes: int  # the attention side's replicated gradients, all-reduced each step
    grad_bytes: int  # bytes of one gradient entry
    head_grad_bytes: int  # the gradients of one head in every layer
    expert_grad_bytes: int  # the same of one expert
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    compression_bytes_per_s: float  # the GPU's compress + decode throughput, bytes of gradient input

    # -- compute ------------------------------------------------------------------------------

    def attention_stage_s(self, heads: int, tokens: float) -> float:
        """One layer of one micro-batch, forward and backward, on an attention GPU with ``heads``
        heads and a slice of ``tokens`` tokens (configured scale)."""
        c, h, t = self.attention_terms
        rh, rt, _, _ = self.reference
        return c + h * heads / rh + t * tokens / rt

    def moe_stage_s(self, experts: int, rows: float) -> float:
        """The same for a MoE GPU holding ``experts`` experts that computes ``rows`` rows."""
        c, e, r = self.moe_terms
        _, _, re_, rr = self.reference
        return c + e * experts / re_ + r * rows / rr

    # -- communication ------------------------------------------------------------------------

    def bandwidth(self, same_node: bool) -> float:
        return self.intra_node_bytes_per_s if same_node else self.inter_node_bytes_per_s

    def rows_bytes(self, stand_in_rows: int) -> float:
        """Bytes at the configured shapes of ``stand_in_rows`` stand-in activation rows."""
        return stand_in_rows * self.token_scale * self.hidden_size * self.activation_bytes

    def pool_collective_s(self, plan, full_bytes: float, all_reduce: bool, hierarchical: bool,
                          slice_sizes: Optional[Sequence[int]] = None,
                          cross_factor: Optional[Callable[[int], float]] = None) -> float:
        """One of the attention pool's collectives of a ``full_bytes`` tensor: an all-gather or
        reduce-scatter of token slices (``slice_sizes``: the pool's, by rank), or an all-reduce
        of a flat vector; in one ring, or in two levels, each at its own link's speed
        (``parallel.hierarchy``, whose docstring has the formulas; ``cross_factor``: the bytes a
        compressed cross-node level sends per byte of a piece)."""
        pool = plan.attention_workers()
        if not hierarchical:
            one_node = len({g.node for g in pool}) == 1
            return flat_ring_s(full_bytes, len(pool), all_reduce, self.bandwidth(one_node))
        layout = TwoLevelLayout.of_plan(plan)
        shares = (layout.token_piece_shares(slice_sizes) if slice_sizes is not None
                  else [1.0 / layout.pieces] * layout.pieces)
        parts = layout.token_part_shares(slice_sizes) if slice_sizes is not None else None
        return sum(two_level_s(layout, full_bytes, shares, all_reduce, self.intra_node_bytes_per_s,
                               self.inter_node_bytes_per_s, cross_factor, parts).values())

    def compression_s(self, input_bytes: float) -> float:
        """Compressing and decoding ``input_bytes`` of gradients on the GPU."""
        return input_bytes / self.compression_bytes_per_s

    def replicated_allreduce_s(self, plan, hierarchical: bool, wire_factor: Callable[[int, int, int], float],
                               compresses: bool, held_pieces: int = 1) -> Tuple[float, float]:
        """(seconds, of which compression kernels) of the replicated gradients' all-reduce: its
        cross-node level sends ``wire_factor(members, piece_numel, element_bytes)`` bytes per
        byte of a piece (``comm.cross_node``), and a GPU holding ``held_pieces`` pieces runs
        the kernels on them."""
        pieces = TwoLevelLayout.of_plan(plan).pieces if hierarchical else 1
        element = max(1, self.grad_bytes)
        piece_numel = int(self.replicated_grad_bytes / element / pieces)
        kernels = self.compression_s(self.replicated_grad_bytes * held_pieces / pieces) if compresses else 0.0
        return kernels + self.pool_collective_s(
            plan, self.replicated_grad_bytes, True, hierarchical,
            cross_factor=lambda members: wire_factor(members, piece_numel, element)), kernels

    def moe_inbound_s(self, plan, rows: float) -> float:
        """Seconds of one transfer between the pools, ``T_c`` of the pipeline model
        (``parallel.step_time``): the busiest MoE GPU receives ``rows`` rows (configured scale),
        an equal share from every attention GPU, one message after another on its one inbound
        link, each at the speed of the link between the two GPUs (a uniform router)."""
        pool = plan.attention_workers()
        per_source = rows / len(pool) * self.hidden_size * self.activation_bytes
        return max(sum(per_source / self.bandwidth(a.node == m.node) for a in pool) for m in plan.moe_workers())

    def replicas_allreduce_s(self, plan, replicas: int, hierarchical: bool,
                             wire_factor: Callable[[int, int, int], float], compresses: bool,
                             attention_shard_bytes: float, moe_shard_bytes: float) -> Tuple[float, float]:
        """(seconds, of which compression kernels) of a step's gradient synchronisation when
        ``replicas`` data-parallel copies of ``plan`` (``placement.replicate``) each run part of
        the step's micro-batches: every gradient is summed with its counterparts in the other
        copies, through the same path as one copy's replicated gradients.

        * The attention side's replicated gradients: one all-reduce over the attention GPUs of
          all copies (``replicated_allreduce_s`` of the replicated plan): in two levels, each node
          reduces first and only its pieces cross nodes, ``replicas x num_nodes`` members.
        * The sharded gradients (a GPU's heads' or experts' slices, ``*_shard_bytes`` of the
          busiest GPU of each pool): each GPU with its ``replicas - 1`` counterparts, all on
          other nodes (``counterparts_allreduce_s``), with the same reducer.

        The pools synchronise at once, each GPU on its own link; an attention GPU runs its two
        all-reduces one after the other. At one copy this is ``replicated_allreduce_s``."""
        union = replicate(plan, replicas)
        layout = TwoLevelLayout.of_plan(union)
        held = max(len(layout.pieces_of(r)) for ranks in layout.nodes for r in ranks) if hierarchical else 1
        replicated, kernels = self.replicated_allreduce_s(union, hierarchical, wire_factor, compresses, held)

        attention_shard, attention_kernels = self.counterparts_allreduce_s(
            replicas, attention_shard_bytes, wire_factor, compresses)
        moe_shard, moe_kernels = self.counterparts_allreduce_s(replicas, moe_shard_bytes, wire_factor, compresses)
        if replicated + attention_shard >= moe_shard:
            return replicated + attention_shard, kernels + attention_kernels
        return moe_shard, moe_kernels

    def counterparts_allreduce_s(self, replicas: int, full_bytes: float,
                                 wire_factor: Callable[[int, int, int], float],
                                 compresses: bool) -> Tuple[float, float]:
        """(seconds, of which compression kernels) of one GPU's sharded gradients
        (``full_bytes``) summed with its ``replicas - 1`` counterparts, all on other nodes, at
        the network's speed: ``wire_factor(replicas, ...)`` bytes per byte (the reducer's,
        ``comm.cross_node``: the runtime's ``Links.counterpart_reducer``), and the kernels on
        all of them when it ``compresses``."""
        if replicas <= 1 or full_bytes <= 0:
            return 0.0, 0.0
        element = max(1, self.grad_bytes)
        kernels = self.compression_s(full_bytes) if compresses else 0.0
        wire = wire_factor(replicas, int(full_bytes / element), element) * full_bytes / self.inter_node_bytes_per_s
        return kernels + wire, kernels

    def describe(self) -> dict:
        (a0, a1, a2), (m0, m1, m2) = self.coefficients
        return {"source": self.source, "attn_time_coef": [a0, a1, a2], "moe_time_coef": [m0, m1, m2],
                "attention_terms_s": dict(zip(("constant", "heads", "tokens"), self.attention_terms)),
                "moe_terms_s": dict(zip(("constant", "experts", "rows"), self.moe_terms)),
                "token_scale": self.token_scale,
                "intra_node_gb_per_s": self.intra_node_bytes_per_s / 1e9,
                "inter_node_gb_per_s": self.inter_node_bytes_per_s / 1e9}


def no_durations(cfg: Config) -> StageDurations:
    """The costs of computing for real: every stage and transfer is timed where it runs, so
    nothing is modelled (all zeros; the stand-in scale is 1)."""
    return StageDurations(
        attention_terms=(0.0, 0.0, 0.0), moe_terms=(0.0, 0.0, 0.0), reference=(1, 1, 1, 1.0),
        coefficients=([0.0] * 3, [0.0] * 3), source="computed for real", token_scale=1.0,
        hidden_size=cfg.model.hidden_size, activation_bytes=0, replicated_grad_bytes=0, grad_bytes=0,
        head_grad_bytes=0, expert_grad_bytes=0,
        intra_node_bytes_per_s=math.inf, inter_node_bytes_per_s=math.inf, compression_bytes_per_s=math.inf)


def compute_setup(cfg: Config) -> Tuple[Config, StageDurations]:
    """What the workers compute with, and the durations their device queues: under
    ``emulation.modelled_compute`` the stand-in config and the modelled durations at ``cfg``'s
    shapes; otherwise ``cfg`` itself and no modelled durations. A bad calibration file fails here."""
    if cfg.emulation.modelled_compute:
        return stand_in_config(cfg), stage_durations(cfg)
    return cfg, no_durations(cfg)


def stage_durations(cfg: Config) -> StageDurations:
    """The emulation's time model for ``cfg`` (the configured shapes, not the stand-in's)."""
    e = cfg.emulation
    if e.calibration_file:
        attn, moe = load_calibration(e.calibration_file)
        cfg = cfg.replace(**{"balance.attn_time_coef": attn, "balance.moe_time_coef": moe})
        source = e.calibration_file
    else:
        source = "balance.attn_time_coef / balance.moe_time_coef"
    work = Workload(cfg)
    (a0, a_heads, a_tokens, _), (m0, m_experts, m_rows, _) = work.methodology_prior()
    ref = work.reference_shape
    precision = precision_of(cfg)
    stand_in_tokens = e.stand_in_seq_length * e.stand_in_micro_batch_size
    return StageDurations(
        attention_terms=(a0, a_heads, a_tokens), moe_terms=(m0, m_experts, m_rows),
        reference=(ref.heads, ref.tokens, ref.experts, ref.rows),
        coefficients=(list(cfg.balance.attn_time_coef), list(cfg.balance.moe_time_coef)), source=source,
        token_scale=tokens_per_micro_batch(cfg) / stand_in_tokens, hidden_size=cfg.model.hidden_size,
        activation_bytes=precision.activation_bytes,
        replicated_grad_bytes=attention_replicated_params(cfg) * precision.grad_bytes, grad_bytes=precision.grad_bytes,
        head_grad_bytes=cfg.model.num_layers * head_params(cfg.model) * precision.grad_bytes,
        expert_grad_bytes=moe_gpu_params(cfg, 1) * precision.grad_bytes,
        intra_node_bytes_per_s=e.intra_node_gb_per_s * 1e9, inter_node_bytes_per_s=e.inter_node_gb_per_s * 1e9,
        compression_bytes_per_s=e.compression_gb_per_s * 1e9)
