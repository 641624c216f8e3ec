"""The layout search behind ``ma-ray plan --search``: every way to run the configured model on a
given cluster, scored by the controller's own models, the best first.

A *layout* is ``replicas`` data-parallel copies of one MA group, each on ``nodes_per_replica``
whole nodes; inside a group ``attention_gpus`` attention and ``moe_gpus`` MoE GPUs (placement as
``placement.place`` puts them), ``in_flight`` micro-batches circulating between the pools, the
attention pool's collectives in one ring or two levels (``hierarchical``), and the gradients'
cross-node level compressed or not (``compression``, a ``comm.gradient_compression`` value;
only with two levels, as the config requires). The global batch and its data order are those of
one copy: each copy runs ``1 / replicas`` of the step's micro-batches, so ``replicas`` must
divide ``train.gradient_accumulation_steps`` -- layouts where it does not are no candidates.

The prediction of a layout, all of it from functions the runtime and the controller use too:

* stage times ``T_a, T_m``: ``Workload.prior_stage_times``, the controller's predictor before
  its first measurement (``control.predictor``), anchored at the configured layout
  (``cluster.*``, the methodology's 4 x 4 at 12 attention GPUs in the paper preset) and evaluated at the
  busiest GPUs' work in the layout (heads, token slice, experts, routed rows), so a group of
  another size is scored by its per-GPU work;
* the attention pool's aggregation (an all-gather and a reduce-scatter of the micro-batch in each
  pass, with activation checkpointing one more all-gather to recompute, the backward
  reduce-scatter of the input's gradient in the master dtype), added to ``T_a`` as the emulation times it, and the pool-to-pool transfer ``T_c``:
  ``StageDurations.pool_collective_s`` and ``moe_inbound_s``;
* the passes: ``step_time.step_time_s`` -- the balancing policy's step-time model -- of the
  copy's micro-batches, layers and micro-batches in flight;
* the gradient synchronisation after the passes, inside a copy and across copies (every gradient,
  not only the replicated ones): ``StageDurations.replicas_allreduce_s``, as the runtime runs it:
  the replicated gradients' cross-node level with the bytes per byte of the reducer of
  ``comm.cross_node`` (passed in as ``reducers``: this layer does not import ``comm``), the
  sharded ones between counterparts with the same reducer;
* memory: ``memory.estimate_gpu`` of each pool's busiest GPU at that many micro-batches in
  flight, against ``memory.attention_gpu_budget_gb`` / ``memory.moe_gpu_budget_gb``. Layouts over
  budget are left out and counted.

Not modelled, as in the policy: the optimizer step and the embedding's lookup (the same for every
layout), and transfers queueing behind each other. The cluster's checks and the layout
arithmetic are here only; a bad cluster or one too small for any layout is one ``ConfigError``
line naming what is missing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Mapping, Optional, Tuple

from ma_ray.config import Config, ConfigError
from ma_ray.errors import is_int
from ma_ray.parallel.emulation import StageDurations, stage_durations
from ma_ray.parallel.memory import budget_gb, estimate_gpu, head_params, moe_gpu_params, precision_of
from ma_ray.parallel.placement import Plan, place
from ma_ray.parallel.shares import share_counts
from ma_ray.parallel.split import split_error
from ma_ray.parallel.step_time import PipelineShape, step_time_s
from ma_ray.parallel.workload import Workload

# Per stage the attention pool all-gathers the micro-batch and reduce-scatters its output in the
# forward pass, and does both again in the backward pass (``runtime.attention_role``); with
# activation checkpointing the backward pass gathers the micro-batch once more, to recompute.
# All move the activation dtype but the backward reduce-scatter of the gathered input's
# gradient, which moves the master dtype (twice the bytes under bf16).
AGGREGATION_OPS_PER_STAGE = 4


def aggregation_ops_per_stage(cfg: Config) -> float:
    """The stage's pool collectives, in collectives of the micro-batch in the activation dtype."""
    p = precision_of(cfg)
    wide = p.residual_bytes / p.activation_bytes - 1  # the gradient scatter's extra bytes
    return AGGREGATION_OPS_PER_STAGE + wide + (1 if cfg.train.activation_checkpointing else 0)


# The ways the cross-node level may run, simplest first (the tie-break between equal times).
COMM_SETTINGS = ((False, "none"), (True, "none"), (True, "bf16"), (True, "topk"))


@dataclass(frozen=True)
class Layout:
    replicas: int
    nodes_per_replica: int
    attention_gpus: int  # per copy
    moe_gpus: int  # per copy
    in_flight: int
    hierarchical: bool
    compression: str

    @property
    def gpus(self) -> int:
        return self.replicas * (self.attention_gpus + self.moe_gpus)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    t_attention_s: float  # compute of one attention stage (the predictor's)
    t_moe_s: float  # compute of one MoE stage (the predictor's)
    t_aggregation_s: float  # the attention pool's collectives per stage
    t_transfer_s: float  # one transfer between the pools (T_c)
    passes_s: float  # forward and backward passes of one copy's micro-batches
    grad_sync_s: float  # gradients within and across copies
    compression_s: float  # of which compression kernels
    step_s: float
    tokens_per_s_per_gpu: float
    peak_attention_gb: float
    peak_moe_gb: float
    budget_attention_gb: float
    budget_moe_gb: float

    @property
    def fits(self) -> bool:
        return self.peak_attention_gb <= self.budget_attention_gb and self.peak_moe_gb <= self.budget_moe_gb

    @property
    def peak_gb(self) -> float:
        return max(self.peak_attention_gb, self.peak_moe_gb)

    def to_dict(self) -> dict:
        out = {**self.layout.to_dict(), "gpus": self.layout.gpus}
        out.update({k: v for k, v in self.__dict__.items() if k != "layout"})
        return {**out, "peak_gb": self.peak_gb, "fits": self.fits}


@dataclass(frozen=True)
class SearchResult:
    nodes: int  # nodes used
    gpus_per_node: int
    candidates: int  # layouts scored
    over_memory: int  # of which left out: over a memory budget
    rows: Tuple[Prediction, ...]  # those that fit, best first
    configured: Optional[Prediction]  # the configured layout on this cluster (None: not applicable)
    configured_note: str  # why not applicable, or what it is

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


# --- the cluster -----------------------------------------------------------------------------

def used_nodes(cfg: Config, nodes: int, gpus: Optional[int]) -> int:
    """How many whole nodes of ``nodes`` x ``cluster.gpus_per_node`` the search uses for
    ``gpus`` GPUs (None: all). ConfigError, one line, on a count that cannot be used."""
    per_node = cfg.cluster.gpus_per_node
    if not is_int(nodes) or nodes < 1:
        raise ConfigError(f"--nodes: must be at least 1, got {nodes!r}")
    if gpus is None:
        return nodes
    if not is_int(gpus) or gpus < 1:
        raise ConfigError(f"--gpus: must be a positive number of GPUs or 'all', got {gpus!r}")
    if gpus > nodes * per_node:
        raise ConfigError(f"--gpus: {gpus} is more than the cluster's {nodes * per_node} GPUs "
                          f"({nodes} nodes x {per_node}, --nodes and cluster.gpus_per_node)")
    if gpus % per_node:
        raise ConfigError(f"--gpus: {gpus} is not a whole number of nodes of {per_node} GPUs "
                          f"(cluster.gpus_per_node): replicas and pools take whole nodes")
    return gpus // per_node


def replica_counts(cfg: Config, nodes: int) -> List[int]:
    """Copies a layout of ``nodes`` nodes may run: whole nodes each, and a whole share of the
    step's micro-batches each."""
    micro = cfg.train.gradient_accumulation_steps
    return [r for r in range(1, nodes + 1) if nodes % r == 0 and micro % r == 0]


# --- scoring ---------------------------------------------------------------------------------

class _Scorer:
    """Scores layouts of one config; caches what several layouts share (plans, memory)."""

    def __init__(self, cfg: Config, reducers: Mapping[str, object]):
        self.cfg = cfg
        self.reducers = reducers
        self.anchor = Workload(cfg)  # the controller's workload of the configured layout
        self.durations: StageDurations = stage_durations(cfg)
        self.tokens = cfg.train.micro_batch_size * cfg.train.seq_length
        self.micro_batches = cfg.train.gradient_accumulation_steps
        self.layers = cfg.model.num_layers
        self.head_grad_bytes = self.layers * head_params(cfg.model) * self.durations.grad_bytes
        self.budgets = (budget_gb(cfg, "attention"), budget_gb(cfg, "moe"))
        self.plan = lru_cache(maxsize=None)(self._plan)
        self.workload = lru_cache(maxsize=None)(self._workload)
        self.peaks = lru_cache(maxsize=None)(self._peaks)
        self.with_in_flight = lru_cache(maxsize=None)(self._with_in_flight)

    def _plan(self, nodes: int, k: int) -> Plan:
        c = self.cfg
        return place(nodes, c.cluster.gpus_per_node, k, c.model.num_attention_heads, c.moe.num_experts)

    def _workload(self, nodes: int, k: int) -> Workload:
        # A copy of another size: its own topology, for the busiest GPUs' work at k. Built from
        # a copy of the config with only the cluster changed, unvalidated: the policy range of
        # the configured layout means nothing for another group size, and the split is checked
        # by the split rule (Workload and place both ask it).
        cluster = dataclasses.replace(self.cfg.cluster, num_nodes=nodes, attention_gpus=k)
        return Workload(dataclasses.replace(self.cfg, cluster=cluster), reference_k=k)

    def _with_in_flight(self, in_flight: int) -> Config:
        return self.cfg.replace(**{"schedule.micro_batches_in_flight": in_flight})

    def _peaks(self, nodes: int, k: int, in_flight: int) -> Tuple[float, float]:
        """Peak GB of each pool: its first GPU holds the most heads (experts), shares.py."""
        plan, cfg = self.plan(nodes, k), self.with_in_flight(in_flight)
        return (estimate_gpu(cfg, plan, plan.attention_workers()[0]).total_gb,
                estimate_gpu(cfg, plan, plan.moe_workers()[0]).total_gb)

    def score(self, layout: Layout) -> Prediction:
        d, n, k = self.durations, layout.nodes_per_replica, layout.attention_gpus
        plan, shape = self.plan(n, k), self.workload(n, k).shape(k)
        t_a, t_m = self.anchor.prior_stage_times(shape)
        full = self.tokens * self.cfg.model.hidden_size * d.activation_bytes
        aggregation = aggregation_ops_per_stage(self.cfg) * d.pool_collective_s(
            plan, full, False, layout.hierarchical, share_counts(self.tokens, k))
        t_c = d.moe_inbound_s(plan, shape.rows)
        pipeline = PipelineShape(self.micro_batches // layout.replicas, self.layers, layout.in_flight)
        passes = step_time_s(t_a + aggregation, t_m, pipeline, t_c)
        reducer = self.reducers[layout.compression]
        sync, kernels = d.replicas_allreduce_s(
            plan, layout.replicas, layout.hierarchical, reducer.wire_factor, reducer.compresses,
            attention_shard_bytes=shape.heads * self.head_grad_bytes,
            moe_shard_bytes=moe_gpu_params(self.cfg, shape.experts) * d.grad_bytes)
        step = passes + sync
        peak_a, peak_m = self.peaks(n, k, layout.in_flight)
        return Prediction(layout, t_a, t_m, aggregation, t_c, passes, sync, kernels, step,
                          self.cfg.train.batch_size * self.cfg.train.seq_length / step / layout.gpus,
                          peak_a, peak_m, *self.budgets)


def layouts(cfg: Config, nodes: int, kinds: Tuple[str, ...]) -> List[Layout]:
    """Every candidate layout of ``nodes`` whole nodes (``kinds``: the compressions on offer)."""
    c = cfg.cluster
    out = []
    for r in replica_counts(cfg, nodes):
        n = nodes // r
        group = n * c.gpus_per_node
        for k in range(1, group):
            if split_error(k, group, cfg.model.num_attention_heads, cfg.moe.num_experts) is not None:
                continue
            for m in range(1, cfg.train.gradient_accumulation_steps // r + 1):
                for hierarchical, kind in COMM_SETTINGS:
                    if kind in kinds:
                        out.append(Layout(r, n, k, group - k, m, hierarchical, kind))
    return out


def configured_on(cfg: Config, nodes: int) -> Tuple[Optional[Layout], str]:
    """The configured layout on ``nodes`` nodes: as many copies of it as fill them."""
    c, micro = cfg.cluster, cfg.train.gradient_accumulation_steps
    if nodes % c.num_nodes:
        return None, (f"the configured layout takes {c.num_nodes} nodes (cluster.num_nodes), "
                      f"which do not divide the {nodes} used")
    r = nodes // c.num_nodes
    if micro % r:
        return None, (f"{r} copies of the configured layout do not divide the {micro} micro-batches "
                      f"(train.gradient_accumulation_steps)")
    layout = dataclasses.replace(configured_layout(cfg), replicas=r)
    return layout, f"the configured layout (cluster.*, schedule.*, comm.*), {r} cop{'y' if r == 1 else 'ies'}"


def configured_layout(cfg: Config) -> Layout:
    """The layout ``cfg`` runs: ``cluster.replicas`` copies of its MA group."""
    c = cfg.cluster
    return Layout(c.replicas, c.num_nodes, c.attention_gpus, cfg.moe_gpus, cfg.schedule.micro_batches_in_flight,
                  cfg.comm.hierarchical_allreduce, cfg.comm.gradient_compression)


def layout_config(cfg: Config, layout: Layout) -> Config:
    """``cfg`` set to run ``layout`` (the keys a user would ``--set``); the balancing range is
    widened to hold its split if it must be, and the time coefficients keep the reference the
    search priced the layout by (``balance.time_coef_layout``), so a run of it is predicted, and
    emulated, as the search scored it."""
    b = cfg.balance
    return cfg.replace(**{
        "balance.time_coef_layout": list(Workload(cfg).reference_layout),
        "cluster.replicas": layout.replicas, "cluster.num_nodes": layout.nodes_per_replica,
        "cluster.attention_gpus": layout.attention_gpus,
        "balance.min_attention_gpus": min(b.min_attention_gpus, layout.attention_gpus),
        "balance.max_attention_gpus": max(b.max_attention_gpus, layout.attention_gpus),
        "schedule.micro_batches_in_flight": layout.in_flight,
        "comm.hierarchical_allreduce": layout.hierarchical, "comm.gradient_compression": layout.compression})


def predict(cfg: Config, reducers: Mapping[str, object]) -> Prediction:
    """The prediction of the layout ``cfg`` runs, as ``search`` scores it."""
    return _Scorer(cfg, reducers).score(configured_layout(cfg))


def search(cfg: Config, reducers: Mapping[str, object], nodes: Optional[int] = None,
           gpus: Optional[int] = None) -> SearchResult:
    """Score every layout of ``gpus`` GPUs (None: all) of ``nodes`` nodes (None:
    ``cluster.num_nodes``) x ``cluster.gpus_per_node``. ``reducers``: ``comm.gradient_compression``
    value -> an object with ``wire_factor(members, piece_numel, element_bytes)`` and
    ``compresses`` (``comm.cross_node``'s reducers). ConfigError when no layout fits."""
    used = used_nodes(cfg, cfg.cluster.num_nodes if nodes is None else nodes, gpus)
    scorer = _Scorer(cfg, reducers)
    scored = [scorer.score(layout) for layout in layouts(cfg, used, tuple(reducers))]
    fitting = [p for p in scored if p.fits]
    if not fitting:
        raise ConfigError(too_small(cfg, used, scored))
    fitting.sort(key=lambda p: (p.step_s, p.layout.replicas, p.layout.in_flight,
                                COMM_SETTINGS.index((p.layout.hierarchical, p.layout.compression)),
                                p.layout.attention_gpus))
    configured, note = configured_on(cfg, used)
    if configured is not None and configured.compression not in reducers:
        configured, note = None, f"comm.gradient_compression {configured.compression} is not among the reducers given"
    return SearchResult(used, cfg.cluster.gpus_per_node, len(scored), len(scored) - len(fitting), tuple(fitting),
                        scorer.score(configured) if configured is not None else None, note)


# --- a cluster too small ---------------------------------------------------------------------

def minimum_pools(cfg: Config) -> Tuple[Optional[int], Optional[int]]:
    """The fewest attention GPUs whose busiest fits its budget, and the fewest MoE GPUs (one
    micro-batch in flight; None: no count does). More GPUs in a pool never need more memory per
    GPU (fewer heads, a smaller token slice, fewer experts), so any group with at least both
    holds a layout that fits."""
    c = cfg.replace(**{"schedule.micro_batches_in_flight": 1})
    heads, experts = cfg.model.num_attention_heads, cfg.moe.num_experts
    k_min = next((k for k in range(1, heads + 1)
                  if estimate_gpu(c, p := place(1, k + 1, k, heads, experts), p.attention_workers()[0]).total_gb
                  <= budget_gb(cfg, "attention")), None)
    m_min = next((m for m in range(1, experts + 1)
                  if estimate_gpu(c, p := place(1, m + 1, 1, heads, experts), p.moe_workers()[0]).total_gb
                  <= budget_gb(cfg, "moe")), None)
    return k_min, m_min


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def too_small(cfg: Config, nodes: int, scored: List[Prediction]) -> str:
    """One line: why no layout of ``nodes`` nodes fits, naming what is missing."""
    per_node, heads, experts = cfg.cluster.gpus_per_node, cfg.model.num_attention_heads, cfg.moe.num_experts
    gpus = nodes * per_node
    where = f"no layout of {_count(gpus, 'GPU')} ({_count(nodes, 'node')} x {per_node})"
    one_in_flight = cfg.replace(**{"schedule.micro_batches_in_flight": 1})
    k_min, m_min = minimum_pools(cfg)
    if k_min is None:
        one = place(1, heads + 1, heads, heads, experts)
        need = estimate_gpu(one_in_flight, one, one.attention_workers()[0]).total_gb
        return (f"{where}: even one head per attention GPU needs {need:.1f} GB, over "
                f"memory.attention_gpu_budget_gb ({budget_gb(cfg, 'attention'):g} GB): more memory per GPU is missing")
    if m_min is None:
        one = place(1, experts + 1, 1, heads, experts)
        need = estimate_gpu(one_in_flight, one, one.moe_workers()[0]).total_gb
        return (f"{where}: even one expert per MoE GPU needs {need:.1f} GB, over "
                f"memory.moe_gpu_budget_gb ({budget_gb(cfg, 'moe'):g} GB): more memory per GPU is missing")
    need = k_min + m_min
    if gpus < need:
        return (f"{where} fits in memory (memory.attention_gpu_budget_gb {budget_gb(cfg, 'attention'):g} GB, "
                f"memory.moe_gpu_budget_gb {budget_gb(cfg, 'moe'):g} GB): the model needs at least {need} GPUs "
                f"({k_min} attention + {m_min} MoE); {_count(need - gpus, 'GPU')} missing")
    if not scored:
        counts = replica_counts(cfg, nodes)
        return (f"{where}: a copy holds at most {heads + experts} GPUs ({heads} heads + {experts} experts), "
                f"and {_count(nodes, 'node')} split into copies of whole nodes that share the "
                f"{cfg.train.gradient_accumulation_steps} micro-batches only as {'/'.join(map(str, counts))} "
                f"cop{'y' if counts == [1] else 'ies'}: a node count that splits into copies of at most "
                f"{heads + experts} GPUs is missing")
    return (f"{where}: copies of whole {per_node}-GPU nodes that share the "
            f"{cfg.train.gradient_accumulation_steps} micro-batches do not fit in memory, although "
            f"{need} GPUs ({k_min} attention + {m_min} MoE) would: a node count that splits into such copies is missing")


# --- output ----------------------------------------------------------------------------------

def to_dict(result: SearchResult, cfg: Config) -> dict:
    d = stage_durations(cfg)
    return {"cluster": {"nodes": result.nodes, "gpus_per_node": result.gpus_per_node, "gpus": result.gpus,
                        "intra_node_gb_per_s": d.intra_node_bytes_per_s / 1e9,
                        "inter_node_gb_per_s": d.inter_node_bytes_per_s / 1e9,
                        "attention_gpu_budget_gb": budget_gb(cfg, "attention"),
                        "moe_gpu_budget_gb": budget_gb(cfg, "moe")},
            "micro_batches": cfg.train.gradient_accumulation_steps,
            "tokens_per_step": cfg.train.batch_size * cfg.train.seq_length,
            "candidates": result.candidates, "over_memory": result.over_memory,
            "rows": [p.to_dict() for p in result.rows],
            # "seed": the configured layout, as the output has always named it
            "seed": result.configured.to_dict() if result.configured is not None else None,
            "seed_note": result.configured_note}


def format_table(result: SearchResult, cfg: Config, top: int) -> str:
    d = stage_durations(cfg)
    lines = [
        f"Layouts of {result.gpus} GPUs ({result.nodes} nodes x {result.gpus_per_node}; links "
        f"{d.intra_node_bytes_per_s / 1e9:g} GB/s in a node, {d.inter_node_bytes_per_s / 1e9:g} GB/s between; "
        f"{cfg.train.gradient_accumulation_steps} micro-batches of {cfg.train.micro_batch_size} x "
        f"{cfg.train.seq_length} a step)",
        f"{result.candidates} candidates; {result.over_memory} left out: over the memory budget "
        f"(memory.attention_gpu_budget_gb {budget_gb(cfg, 'attention'):g}, memory.moe_gpu_budget_gb "
        f"{budget_gb(cfg, 'moe'):g} GB); best {min(top, len(result.rows))} of {len(result.rows)}:",
        "",
    ]
    header = ("rank", "replicas", "attn/moe", "nodes/replica", "in flight", "hierarchical", "compression",
              "step s", "tokens/s/GPU", "peak GB", "budget GB")
    rows = [header] + [_row(str(i + 1), p) for i, p in enumerate(result.rows[:top])]
    if result.configured is not None:
        rows.append(_row("seed", result.configured))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(r, widths)))
    if result.configured is not None:
        rank = next((i + 1 for i, p in enumerate(result.rows) if p.layout == result.configured.layout), None)
        where = f"rank {rank}" if rank is not None else "over the memory budget"
        lines.append(f"seed: {result.configured_note}; {where}")
    else:
        lines.append(f"seed: not applicable: {result.configured_note}")
    return "\n".join(lines)


def _row(rank: str, p: Prediction) -> Tuple[str, ...]:
    lay = p.layout
    budget = p.budget_attention_gb if p.peak_attention_gb >= p.peak_moe_gb else p.budget_moe_gb
    return (rank, str(lay.replicas), f"{lay.attention_gpus}/{lay.moe_gpus}", str(lay.nodes_per_replica),
            str(lay.in_flight), "on" if lay.hierarchical else "off", lay.compression, f"{p.step_s:.3f}",
            f"{p.tokens_per_s_per_gpu:.0f}", f"{p.peak_gb:.1f}" + ("" if p.fits else " OVER"), f"{budget:g}")
