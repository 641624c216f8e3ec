"""Paper-scale emulation: how long each stage and transfer of a worker would take at the
configured shapes, and the small model that actually runs meanwhile.

With ``emulation.modelled_compute`` the workers run the real model code and collectives on stand-in
tensors (``stand_in_config``: the configured heads, experts, layers and topology, with tiny widths and
a short micro-batch) and queue each stage's predicted duration on an emulated device timeline
(``runtime.emulated_device``). So the schedule, routing, placement and every message are real,
and the timings the controller sees are those of the configured (e.g. paper) shapes.

Stage durations come from the time model of ``parallel.workload``: the seed's formula at the
reference split (``cluster.attention_gpus``), split into per-GPU work terms, evaluated at a
worker's own heads, token slice, experts and routed rows. Its coefficients are the balance
section's, or a calibration file's when one is given. A stage (one layer of one micro-batch) is
one third forward and two thirds backward, the usual ratio for matmul-bound layers.

Transfers: a message standing for ``n`` bytes at the configured shapes takes ``n / bandwidth``
on the link between its two GPUs (NVLink within a node, the network between nodes); a worker
receives its messages one after another (one inbound link per GPU). Collectives over the attention
pool are rings: an all-gather or reduce-scatter moves ``(k - 1) / k`` of the full tensor over
each GPU's link, an all-reduce twice that, at the slowest link the ring crosses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import yaml

from ma_ray.config import Config, ConfigError
from ma_ray.parallel.memory import attention_replicated_params, precision_of, tokens_per_micro_batch
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
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
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
    coefficients: Tuple[list, list]  # the seed-form coefficients used, for the record
    source: str  # where they came from
    token_scale: float  # configured tokens per micro-batch over the stand-in's
    hidden_size: int
    activation_bytes: int
    replicated_grad_bytes: int  # the attention side's replicated gradients, all-reduced each step
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float

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

    def ring_s(self, full_bytes: float, members: int, same_node: bool) -> float:
        """An all-gather or reduce-scatter of a ``full_bytes`` tensor over a ring of ``members``."""
        if members <= 1:
            return 0.0
        return full_bytes * (members - 1) / members / self.bandwidth(same_node)

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
        hidden_size=cfg.model.hidden_size, activation_bytes=0, replicated_grad_bytes=0,
        intra_node_bytes_per_s=math.inf, inter_node_bytes_per_s=math.inf)


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
    (a0, a_heads, a_tokens, _), (m0, m_experts, m_rows, _) = work.seed_prior()
    ref = work.shape(work.reference_k)
    precision = precision_of(cfg)
    stand_in_tokens = e.stand_in_seq_length * e.stand_in_micro_batch_size
    return StageDurations(
        attention_terms=(a0, a_heads, a_tokens), moe_terms=(m0, m_experts, m_rows),
        reference=(ref.heads, ref.tokens, ref.experts, ref.rows),
        coefficients=(list(cfg.balance.attn_time_coef), list(cfg.balance.moe_time_coef)), source=source,
        token_scale=tokens_per_micro_batch(cfg) / stand_in_tokens, hidden_size=cfg.model.hidden_size,
        activation_bytes=precision.activation_bytes,
        replicated_grad_bytes=attention_replicated_params(cfg) * precision.grad_bytes,
        intra_node_bytes_per_s=e.intra_node_gb_per_s * 1e9, inter_node_bytes_per_s=e.inter_node_gb_per_s * 1e9)
