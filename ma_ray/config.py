"""The one typed configuration tree of ma-ray: YAML in and out, dotted overrides, validation.

Every number of the methodology (the "paper preset") is a default here or in
``cluster/paper-16gpu.yaml``; no other module keeps its own copy. Errors are
``ConfigError`` with a one-line message that names the key path and the rule.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Literal, Optional, Tuple

import yaml

from ma_ray.errors import MaRayError, is_int, is_number


class ConfigError(MaRayError, ValueError):
    """A configuration the package cannot run; the message is one line naming the key."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 4096
    num_attention_heads: int = 32
    attention_head_size: int = 128
    intermediate_size: int = 16384  # hidden size of each expert's feed-forward
    hidden_act: Literal["gelu", "relu", "silu"] = "gelu"  # the experts' activation
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    # The methodology fixes no vocabulary; GPT-2's BPE size is the usual default for a 4k-hidden model.
    vocab_size: int = 50257


@dataclass
class MoEConfig:
    num_experts: int = 16
    top_k: int = 2
    capacity_factor: float = 1.0
    # Fixed per-expert capacity per micro-batch; null derives it from capacity_factor. The methodology's
    # "expert_capacity: 2048" contradicts its capacity_factor 1.0 (which gives 16384 at micro-batch
    # 64 x 2048, top-2, 16 experts); the presets follow the capacity factor (docs/method.md).
    expert_capacity: Optional[int] = None
    aux_loss_alpha: float = 0.01
    seq_aux: bool = True
    router_z_loss_coef: float = 0.001
    norm_topk_prob: bool = False


@dataclass
class ClusterConfig:
    num_nodes: int = 4
    gpus_per_node: int = 4
    attention_gpus: int = 12
    # Data-parallel copies of the MA group above, each on num_nodes nodes of its own, taking an
    # equal share of the step's micro-batches (train.gradient_accumulation_steps).
    replicas: int = 1
    # Start a private local Ray node that advertises the topology's GPUs as fake resources (the
    # workers then compute on CPU). Says nothing about compute time: see emulation.modelled_compute.
    fake_gpus: bool = False
    # Ray address to join when not emulating ("auto" = the cluster `ray job submit` runs in).
    address: str = "auto"
    placement_timeout_s: float = 60.0
    # Port of the Prometheus endpoint (/metrics) of the private node fake_gpus starts; null =
    # one Ray picks. job.json records the node's endpoint either way.
    metrics_export_port: Optional[int] = None


@dataclass
class BalanceConfig:
    enabled: bool = True
    imbalance_threshold: float = 0.15
    rebalancing_interval: int = 100
    min_attention_gpus: int = 8
    max_attention_gpus: int = 14
    # The methodology's time model, as written: [constant, seq_len, hidden_dim] and
    # [constant, expert_dim, active_experts] coefficients, in seconds.
    attn_time_coef: List[float] = field(default_factory=lambda: [0.0012, 0.000034, 0.0000087])
    moe_time_coef: List[float] = field(default_factory=lambda: [0.0008, 0.000045, 0.000012])
    # The layout the coefficients above describe, [num_nodes, gpus_per_node, attention_gpus]:
    # the methodology's 4 x 4 at 12. Another layout's stage times follow from its GPUs' work relative
    # to this one's (parallel/workload.py), so the planner, the controller's prior and the
    # emulation price every layout alike. null: the configured layout.
    time_coef_layout: Optional[List[int]] = field(default_factory=lambda: [4, 4, 12])
    # Prior of a migration's pause (not in the methodology): seconds any change of split costs (roles
    # and collective groups rebuilt), and the rate at which the busiest receiving GPU takes in
    # moved parameters and moments. Measured pauses refine it (control/migration_cost.py).
    migration_fixed_s: float = 10.0
    migration_gb_per_s: float = 2.0
    # Hysteresis of the balancing policy (control/policy.py). A move must promise a step-time
    # gain of at least min_gain_fraction (relative), return_gain_factor times that to re-enter a
    # split left within the last return_window decisions; no decision before settle_steps steps
    # at the current split (null: a quarter of rebalancing_interval).
    min_gain_fraction: float = 0.02
    return_window: int = 3
    return_gain_factor: float = 3.0
    settle_steps: Optional[int] = None


@dataclass
class CommConfig:
    # nccl: torch's ProcessGroupNCCL (auto on a CUDA worker); gloo: torch's ProcessGroupGloo (auto
    # otherwise); ray_nccl: Ray's cupy NCCL group (ma_ray/comm/backend.py, docs/gpu.md).
    backend: Literal["auto", "nccl", "gloo", "ray_nccl"] = "auto"
    synchronization_timeout_ms: int = 5000
    # Each pool's CUDA compute stream (runtime.device.cuda_priority): 0 CUDA's highest priority,
    # anything else its default, the NCCL streams' own. No effect on CPU.
    attention_stream_priority: int = 0
    moe_stream_priority: int = 1
    sparsification_ratio: float = 0.1
    quantization_bits: int = 8
    compression_overhead: float = 0.05
    overlap_efficiency_target: float = 0.85
    # The attention pool's collectives inside each node, then across nodes (comm.aggregation).
    hierarchical_allreduce: bool = True
    # How gradients cross nodes (the cross-node level of the two-level all-reduce, comm.cross_node):
    # "none" (exact), "bf16" (a dense bf16 ring, torch's bf16 hook's math), or "topk" (the methodology's:
    # the sparsification_ratio largest entries of each block of compression_block_size, in
    # quantization_bits with a scale per block, with error feedback).
    gradient_compression: Literal["none", "bf16", "topk"] = "none"
    compression_block_size: int = 2048
    # Optimizer steps, from step 0, whose gradients cross nodes dense and exact before topk
    # compresses (1-bit Adam's warm-up stage, DGC's warm-up): 20 % of train.num_train_steps,
    # inside the 15-25 % 1-bit Adam found enough; the local preset measured its own
    # (bench/RESULTS.md).
    compression_warmup_steps: int = 10000
    # gloo groups behave like NCCL: every op blocking in issue order, sends that
    # complete only at the matching receive, a wait past the timeout reported as a deadlock
    # (ma_ray/comm/torch_backend.py). MA_RAY_STRICT_NCCL=1 turns it on for a whole run.
    strict_nccl: bool = False


@dataclass
class ScheduleConfig:
    """The step schedule: how many micro-batches circulate between the pools at once and how
    the rows crossing between them are cut into chunks."""
    micro_batches_in_flight: int = 1
    # Tokens per pool-to-pool chunk, and receives a worker keeps posted ahead of the one it waits for.
    communication_chunk_size: int = 1024
    max_concurrent_communications: int = 4


@dataclass
class TrainConfig:
    batch_size: int = 1024
    seq_length: int = 2048
    micro_batch_size: int = 64
    gradient_accumulation_steps: int = 16
    learning_rate: float = 1e-4
    min_learning_rate: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    num_train_steps: int = 50000
    warmup_steps: int = 5000
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    gradient_clipping: float = 1.0
    # bf16: autocast over fp32 master weights; fp32; fp64: everything in double (verification).
    mixed_precision: Literal["bf16", "fp32", "fp64"] = "bf16"
    activation_checkpointing: bool = True
    seed: int = 0
    checkpoint_interval: int = 1000
    # Failures (a worker's death or stall, a failed collective, the controller's death) the run
    # recovers from by itself, restarting every worker from the latest checkpoint; 0 = the first
    # failure ends the run.
    max_failures: int = 3
    # After a failure that leaves the cluster unable to hold the topology (a node is gone), go
    # on with the nodes that are left, at the split the predictor chooses for them.
    elastic: bool = False
    # Checkpoints kept on disk (the newest ones); null keeps them all.
    keep_checkpoints: Optional[int] = None
    # A step whose loss or gradient norm is not finite is never applied. skip: go on with the next
    # step and count it (Megatron's behaviour); stop: end the run with one line.
    on_nonfinite: Literal["skip", "stop"] = "stop"
    # With skip: this many skipped steps in a row end the run with one line (exit 1); training
    # that no longer applies any step is not going on.
    max_consecutive_skips: int = 10


@dataclass
class DataConfig:
    # synthetic: seeded random tokens; text: byte-level tokens of a file or folder;
    # bin: a uint16 memmap of token ids. path null with text = the standard library's sources.
    kind: Literal["synthetic", "text", "bin"] = "synthetic"
    path: Optional[str] = None
    # Byte budget of kind text; null = 4 MiB of the standard library, or the whole given path.
    max_text_bytes: Optional[int] = None


@dataclass
class ControlConfig:
    # The controller is a named Ray actor: a notebook or `ma-ray status` finds it by these.
    name: str = "ma-ray-controller"
    namespace: str = "ma-ray"
    # The most seconds the driver waits for the workers' answers to one call (set-up, a step, a
    # migration, a checkpoint, an export); past it the call fails naming who did not answer.
    worker_timeout_s: float = 600.0
    # The most seconds joining a cluster may take (train on cluster.address, `ma-ray status`,
    # ma_ray.connect): past it, one line "no ma-ray job reachable at ADDR" instead of Ray's retries.
    connect_timeout_s: float = 5.0
    # The most seconds the controller may leave the driver's poll unanswered (its control calls
    # run beside the steps and answer in milliseconds); past it the controller counts as stalled
    # and is replaced, as after its death.
    heartbeat_timeout_s: float = 30.0


@dataclass
class MemoryConfig:
    # The methodology's per-GPU memory figures, kept as budgets the plan compares its estimate with.
    attention_gpu_budget_gb: float = 123.7
    moe_gpu_budget_gb: float = 123.7


@dataclass
class EmulationConfig:
    # On: every stage's arithmetic is replaced by a wait of its predicted duration at the shapes
    # configured above (``parallel.emulation``), while small stand-in tensors of the stand_in_* shapes
    # run the real model code and travel through the real collectives.
    modelled_compute: bool = False
    # YAML with attn_time_coef and moe_time_coef (the methodology's formula form, seconds); null = the
    # balance section's coefficients.
    calibration_file: Optional[str] = None
    # Link bandwidths a transfer's wait is computed from, GB/s per direction: NVLink 4 on an
    # H100/H200 SXM node (900 GB/s both ways) and one 400 Gb/s NDR InfiniBand port per GPU.
    intra_node_gb_per_s: float = 450.0
    inter_node_gb_per_s: float = 50.0
    # The GPU's gradient compress + decode throughput (GB/s of fp32 input), for their modelled
    # time: an assumption for a memory-bound kernel pair on an H100-class GPU (this CPU's
    # measured figures are in bench/RESULTS.md).
    compression_gb_per_s: float = 100.0
    # Keep each worker's modelled device clock (``runtime.device``): the step's length on the
    # modelled GPUs without the host's time, reported as the ``device_clock`` timing. Costs one
    # extra all-gather of a float per collective of the attention pool (host time only).
    device_clock: bool = False
    # Shapes of the stand-in tensors (the model's head and expert counts are kept).
    stand_in_head_size: int = 2
    stand_in_intermediate_size: int = 8
    stand_in_seq_length: int = 64
    stand_in_micro_batch_size: int = 2
    stand_in_vocab_size: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    emulation: EmulationConfig = field(default_factory=EmulationConfig)

    @property
    def total_gpus(self) -> int:
        return self.cluster.num_nodes * self.cluster.gpus_per_node

    @property
    def micro_batches_per_replica(self) -> int:
        """The micro-batches each MA group runs a step (all of them with one replica)."""
        return self.train.gradient_accumulation_steps // self.cluster.replicas

    @property
    def moe_gpus(self) -> int:
        return self.total_gpus - self.cluster.attention_gpus

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **dotted: Any) -> "Config":
        """A validated copy with dotted keys replaced, e.g. ``replace(**{"moe.top_k": 1})``."""
        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, key, value)
        return from_dict(data)

    def with_split(self, attention_gpus: int, key: str = "attention GPUs") -> "Config":
        """This config at ``attention_gpus`` attention GPUs: the split a resume's checkpoint or a
        restart runs at, validated as any config is (errors name ``key``). The time model keeps
        its reference, the layout configured here (``balance.time_coef_layout``, pinned when null)."""
        if attention_gpus == self.cluster.attention_gpus:
            return self
        data = self.to_dict()
        if data["balance"]["time_coef_layout"] is None:
            c = self.cluster
            data["balance"]["time_coef_layout"] = [c.num_nodes, c.gpus_per_node, c.attention_gpus]
        return _with_split(_build(Config, data, ""), attention_gpus, key)


# --- YAML ------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``1e-4`` (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None


def load(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
         attention_gpus: Optional[int] = None, attention_gpus_key: str = "--attention-gpus") -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    ``attention_gpus``: the split the command line asks for (``--attention-gpus``), settled here
    into ``cluster.attention_gpus``: it is the split validated, errors naming
    ``attention_gpus_key``, and the config's own value is then only type-checked.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        data = _parse_yaml(text, str(p))
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. moe.top_k=1")
        _set_dotted(data, key.strip(), _parse_yaml(raw, f"override {key.strip()}"))
    if attention_gpus is None:
        return from_dict(data)
    return _with_split(_build(Config, data, ""), attention_gpus, attention_gpus_key)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


# --- typed construction ----------------------------------------------------------------------

# Keys that were renamed: a config that still uses the old name gets one line naming the new one.
RENAMED = {
    "cluster.emulate": "cluster.fake_gpus",
    "emulation.enabled": "emulation.modelled_compute",
    **{f"emulation.wire_{k}": f"emulation.stand_in_{k}"
       for k in ("head_size", "intermediate_size", "seq_length", "micro_batch_size", "vocab_size")},
    **{f"comm.{k}": f"schedule.{k}"
       for k in ("micro_batches_in_flight", "communication_chunk_size", "max_concurrent_communications")},
}

def from_dict(data: dict) -> Config:
    """Build and validate a Config from nested plain data; unknown keys and wrong types fail."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _with_split(cfg: Config, attention_gpus: int, key: str) -> Config:
    """``cfg`` (built, not yet validated) at ``attention_gpus``, validated; errors about the
    split name ``key``, where it came from."""
    _require(is_int(attention_gpus), f"{key}: expected an integer, got {_describe(attention_gpus)}")
    cfg.cluster.attention_gpus = attention_gpus
    validate(cfg, split_key=key)
    return cfg


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if _join(path, str(key)) in RENAMED:
            raise ConfigError(f"{_join(path, str(key))}: renamed to {RENAMED[_join(path, str(key))]}")
        if key not in names:
            raise ConfigError(f"{_join(path, str(key))}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], _join(path, f.name))
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if not is_int(value):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if not is_number(value):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in this module, not input


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- validation ------------------------------------------------------------------------------

def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, split_key: str = "cluster.attention_gpus") -> None:
    """Check every cross-field rule; raises ConfigError naming the first broken one.
    ``split_key`` names where ``cluster.attention_gpus`` came from in split errors."""
    m, moe, c, b, comm, t = cfg.model, cfg.moe, cfg.cluster, cfg.balance, cfg.comm, cfg.train
    schedule = cfg.schedule

    for path, value in [
        ("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.attention_head_size", m.attention_head_size),
        ("model.intermediate_size", m.intermediate_size),
        ("model.max_position_embeddings", m.max_position_embeddings),
        ("model.vocab_size", m.vocab_size), ("moe.num_experts", moe.num_experts),
        ("moe.top_k", moe.top_k), ("cluster.num_nodes", c.num_nodes), ("cluster.replicas", c.replicas),
        ("cluster.gpus_per_node", c.gpus_per_node),
        ("schedule.max_concurrent_communications", schedule.max_concurrent_communications),
        ("schedule.communication_chunk_size", schedule.communication_chunk_size),
        ("schedule.micro_batches_in_flight", schedule.micro_batches_in_flight),
        ("comm.synchronization_timeout_ms", comm.synchronization_timeout_ms),
        ("comm.quantization_bits", comm.quantization_bits),
        ("train.batch_size", t.batch_size), ("train.seq_length", t.seq_length),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("train.checkpoint_interval", t.checkpoint_interval),
        ("emulation.stand_in_head_size", cfg.emulation.stand_in_head_size),
        ("emulation.stand_in_intermediate_size", cfg.emulation.stand_in_intermediate_size),
        ("emulation.stand_in_seq_length", cfg.emulation.stand_in_seq_length),
        ("emulation.stand_in_micro_batch_size", cfg.emulation.stand_in_micro_batch_size),
        ("emulation.stand_in_vocab_size", cfg.emulation.stand_in_vocab_size),
    ]:
        _require(value >= 1, f"{path}: must be at least 1, got {value}")

    for path, value in [
        ("model.initializer_range", m.initializer_range), ("model.layer_norm_eps", m.layer_norm_eps),
        ("moe.aux_loss_alpha", moe.aux_loss_alpha), ("moe.router_z_loss_coef", moe.router_z_loss_coef),
        ("comm.compression_overhead", comm.compression_overhead),
        ("train.learning_rate", t.learning_rate), ("train.min_learning_rate", t.min_learning_rate),
        ("train.weight_decay", t.weight_decay), ("train.gradient_clipping", t.gradient_clipping),
        ("train.adam_eps", t.adam_eps), ("train.num_train_steps", t.num_train_steps),
        ("train.warmup_steps", t.warmup_steps), ("cluster.placement_timeout_s", c.placement_timeout_s),
        ("balance.migration_fixed_s", b.migration_fixed_s),
        ("memory.attention_gpu_budget_gb", cfg.memory.attention_gpu_budget_gb),
        ("memory.moe_gpu_budget_gb", cfg.memory.moe_gpu_budget_gb),
    ]:
        _require(value >= 0 and math.isfinite(value), f"{path}: must not be negative, got {value}")

    for path, value in [
        ("model.hidden_dropout_prob", m.hidden_dropout_prob),
        ("model.attention_probs_dropout_prob", m.attention_probs_dropout_prob),
        ("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2),
    ]:
        _require(0.0 <= value < 1.0, f"{path}: must be in [0, 1), got {value}")
    _require(0.0 < comm.sparsification_ratio <= 1.0,
             f"comm.sparsification_ratio: must be in (0, 1], got {comm.sparsification_ratio}")
    _require(comm.quantization_bits <= 8, f"comm.quantization_bits: must be in 1..8, got {comm.quantization_bits}")
    for key in ("attention_stream_priority", "moe_stream_priority"):
        _require(getattr(comm, key) >= 0, f"comm.{key}: must be 0 (high) or more (normal), got {getattr(comm, key)}")
    _require(1 <= comm.compression_block_size <= 65536,
             f"comm.compression_block_size: must be in 1..65536 (offsets are 16-bit), got {comm.compression_block_size}")
    _require(comm.compression_warmup_steps >= 0,
             f"comm.compression_warmup_steps: must not be negative, got {comm.compression_warmup_steps}")
    _require(comm.gradient_compression == "none" or comm.hierarchical_allreduce,
             f"comm.gradient_compression: {comm.gradient_compression} compresses the cross-node level of the "
             f"two-level all-reduce; it needs comm.hierarchical_allreduce: true")
    _require(0.0 < comm.overlap_efficiency_target <= 1.0,
             f"comm.overlap_efficiency_target: must be in (0, 1], got {comm.overlap_efficiency_target}")
    for path, value in [("balance.migration_gb_per_s", b.migration_gb_per_s),
                        ("emulation.intra_node_gb_per_s", cfg.emulation.intra_node_gb_per_s),
                        ("emulation.inter_node_gb_per_s", cfg.emulation.inter_node_gb_per_s),
                        ("emulation.compression_gb_per_s", cfg.emulation.compression_gb_per_s)]:
        _require(value > 0 and math.isfinite(value), f"{path}: must be a positive bandwidth, got {value}")
    check_policy(dataclasses.asdict(b), "balance.")
    _require(len(b.attn_time_coef) == 3, f"balance.attn_time_coef: needs 3 coefficients, got {len(b.attn_time_coef)}")
    _require(len(b.moe_time_coef) == 3, f"balance.moe_time_coef: needs 3 coefficients, got {len(b.moe_time_coef)}")

    _require(m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size: {m.hidden_size} is not divisible by model.num_attention_heads ({m.num_attention_heads})")
    _require(m.attention_head_size * m.num_attention_heads == m.hidden_size,
             f"model.attention_head_size: must equal hidden_size / num_attention_heads "
             f"({m.hidden_size // m.num_attention_heads}), got {m.attention_head_size}")
    _require(moe.top_k <= moe.num_experts,
             f"moe.top_k: {moe.top_k} is larger than moe.num_experts ({moe.num_experts})")
    _require(moe.capacity_factor > 0, f"moe.capacity_factor: must be > 0, got {moe.capacity_factor}")
    _require(moe.expert_capacity is None or moe.expert_capacity >= 1,
             f"moe.expert_capacity: must be null or at least 1, got {moe.expert_capacity}")

    check_split(cfg, c.attention_gpus, key=split_key)
    if b.time_coef_layout is not None:
        _require(len(b.time_coef_layout) == 3 and all(v >= 1 for v in b.time_coef_layout),
                 f"balance.time_coef_layout: needs [num_nodes, gpus_per_node, attention_gpus], each at least 1, "
                 f"or null, got {b.time_coef_layout}")
        from ma_ray.parallel.split import split_error  # ma_ray.parallel's package imports this module

        n, g, k = b.time_coef_layout
        problem = split_error(k, n * g, m.num_attention_heads, moe.num_experts,
                              key="balance.time_coef_layout")
        _require(problem is None, f"{problem}; set balance.time_coef_layout to a layout of this model, or null "
                                  f"for the configured one")

    _require(t.batch_size % t.micro_batch_size == 0,
             f"train.micro_batch_size: {t.micro_batch_size} does not divide train.batch_size ({t.batch_size})")
    _require(t.gradient_accumulation_steps * t.micro_batch_size == t.batch_size,
             f"train.gradient_accumulation_steps: must be batch_size / micro_batch_size "
             f"({t.batch_size // t.micro_batch_size}), got {t.gradient_accumulation_steps}")
    _require(t.gradient_accumulation_steps % c.replicas == 0,
             f"cluster.replicas: {c.replicas} replicas cannot share the step's {t.gradient_accumulation_steps} "
             f"micro-batches (train.gradient_accumulation_steps) equally")
    _require(not (t.elastic and c.replicas > 1),
             f"train.elastic: going on with fewer nodes is built for one replica, not cluster.replicas={c.replicas}")
    _require(t.seq_length <= m.max_position_embeddings,
             f"train.seq_length: {t.seq_length} exceeds model.max_position_embeddings ({m.max_position_embeddings})")
    _require(t.min_learning_rate <= t.learning_rate,
             f"train.min_learning_rate: {t.min_learning_rate} exceeds train.learning_rate ({t.learning_rate})")
    _require(t.warmup_steps <= t.num_train_steps,
             f"train.warmup_steps: {t.warmup_steps} exceeds train.num_train_steps ({t.num_train_steps})")
    _require(t.max_failures >= 0, f"train.max_failures: must not be negative, got {t.max_failures}")
    _require(t.max_consecutive_skips >= 1,
             f"train.max_consecutive_skips: must be at least 1, got {t.max_consecutive_skips}")
    _require(t.keep_checkpoints is None or t.keep_checkpoints >= 1,
             f"train.keep_checkpoints: must be null or at least 1, got {t.keep_checkpoints}")
    _require(cfg.control.worker_timeout_s > 0 and math.isfinite(cfg.control.worker_timeout_s),
             f"control.worker_timeout_s: must be a positive number of seconds, got {cfg.control.worker_timeout_s}")
    _require(cfg.control.connect_timeout_s > 0 and math.isfinite(cfg.control.connect_timeout_s),
             f"control.connect_timeout_s: must be a positive number of seconds, got {cfg.control.connect_timeout_s}")
    _require(cfg.control.heartbeat_timeout_s > 0 and math.isfinite(cfg.control.heartbeat_timeout_s),
             f"control.heartbeat_timeout_s: must be a positive number of seconds, "
             f"got {cfg.control.heartbeat_timeout_s}")
    _require(c.metrics_export_port is None or 1 <= c.metrics_export_port <= 65535,
             f"cluster.metrics_export_port: must be null or a port in [1, 65535], got {c.metrics_export_port}")
    _require(bool(cfg.control.name.strip()), "control.name: must not be empty")
    _require(bool(cfg.control.namespace.strip()), "control.namespace: must not be empty")
    _require(cfg.data.max_text_bytes is None or cfg.data.max_text_bytes >= 1,
             f"data.max_text_bytes: must be null or at least 1, got {cfg.data.max_text_bytes}")
    _require(cfg.data.kind != "bin" or cfg.data.path is not None,
             "data.path: required when data.kind is bin")


def check_policy(values: dict, prefix: str) -> None:
    """The balancing policy's rules, on the ``balance`` keys among ``values``: the config's
    section, or a running policy's parameters (``control.policy.PolicyParams``, which a client
    may change). Errors name ``prefix`` + the key."""
    hints = typing.get_type_hints(BalanceConfig)
    for key in ("enabled", "imbalance_threshold", "rebalancing_interval", "min_attention_gpus", "max_attention_gpus",
                "min_gain_fraction", "return_window", "return_gain_factor", "settle_steps"):
        _coerce(hints[key], values[key], prefix + key)
    v = values

    def at_least(key: str, low: float, rule: str) -> None:
        value = v[key]
        _require(value >= low and math.isfinite(value), f"{prefix}{key}: {rule}, got {value}")

    at_least("rebalancing_interval", 1, "must be at least 1")
    at_least("min_attention_gpus", 1, "must be at least 1")
    at_least("imbalance_threshold", 0, "must not be negative")
    at_least("min_gain_fraction", 0, "must not be negative")
    at_least("return_window", 0, "must not be negative")
    at_least("return_gain_factor", 1.0, "must be at least 1")
    _require(v["settle_steps"] is None or v["settle_steps"] >= 0,
             f"{prefix}settle_steps: must be null or not negative, got {v['settle_steps']}")
    _require(v["min_attention_gpus"] <= v["max_attention_gpus"],
             f"{prefix}min_attention_gpus: {v['min_attention_gpus']} is greater than "
             f"{prefix}max_attention_gpus ({v['max_attention_gpus']})")


def check_split(cfg: Config, attention_gpus: int, key: str = "attention GPUs", within_policy: bool = True,
                policy_range: Optional[Tuple[int, int]] = None) -> None:
    """Raise ConfigError unless the topology and model hold ``attention_gpus`` and (``within_policy``)
    it is within ``policy_range`` (default [balance.min_attention_gpus, balance.max_attention_gpus]).
    The rule itself is ``ma_ray.parallel.split.split_error``."""
    # Imported here: ma_ray.parallel's package imports this module.
    from ma_ray.parallel.split import split_error

    if not within_policy:
        policy_range = None
    elif policy_range is None:
        policy_range = (cfg.balance.min_attention_gpus, cfg.balance.max_attention_gpus)
    problem = split_error(attention_gpus, cfg.total_gpus, cfg.model.num_attention_heads, cfg.moe.num_experts,
                          key=key, policy_range=policy_range)
    if problem is not None:
        raise ConfigError(problem)
