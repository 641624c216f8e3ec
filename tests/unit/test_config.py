"""Config: loading, dotted overrides, every validation rule, and the CLI's one-line errors."""

from __future__ import annotations

import inspect
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ma_ray import config as config_module
from ma_ray.cli import main
from ma_ray.config import Config, ConfigError, check_split, load

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "cluster" / "paper-16gpu.yaml"
LOCAL = ROOT / "cluster" / "local-cpu.yaml"


def error_of(overrides):
    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- presets and loading -----------------------------------------------------------------------

def test_paper_preset_is_the_defaults():
    assert load(PAPER) == Config()


def test_local_preset_loads():
    cfg = load(LOCAL)
    assert cfg.cluster.fake_gpus and cfg.model.hidden_size == 64 and cfg.train.mixed_precision == "fp32"


def test_empty_file_gives_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load(f) == Config()


def test_yaml_12_floats_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 3e-4\n  min_learning_rate: 1E-5\n")
    cfg = load(f)
    assert cfg.train.learning_rate == 3e-4 and cfg.train.min_learning_rate == 1e-5


def test_dotted_overrides():
    cfg = load(PAPER, ["moe.top_k=1", "model.num_layers=2"])
    assert cfg.moe.top_k == 1 and cfg.model.num_layers == 2
    assert cfg.model.hidden_size == Config().model.hidden_size


def test_override_values_are_yaml():
    cfg = load(None, ["train.learning_rate=2e-4", "moe.expert_capacity=null", "balance.enabled=false",
                      "balance.attn_time_coef=[1, 2, 3]", "data.path=some/file.bin", "data.kind=bin"])
    assert cfg.train.learning_rate == 2e-4 and cfg.moe.expert_capacity is None
    assert cfg.balance.enabled is False and cfg.balance.attn_time_coef == [1.0, 2.0, 3.0]
    assert cfg.data.path == "some/file.bin"


def test_later_override_wins_and_applies_over_file():
    cfg = load(LOCAL, ["moe.top_k=1", "moe.top_k=3"])
    assert cfg.moe.top_k == 3


def test_replace_is_validated():
    cfg = Config().replace(**{"moe.top_k": 1})
    assert cfg.moe.top_k == 1
    with pytest.raises(ConfigError, match="moe.top_k"):
        Config().replace(**{"moe.top_k": 17})


# --- loading errors ------------------------------------------------------------------------------

def test_unknown_key():
    assert "moe.topk: unknown key" in error_of(["moe.topk=2"])
    assert "modle: unknown key" in error_of(["modle.num_layers=2"])


@pytest.mark.parametrize("override, expected", [
    ("model.num_layers=four", "model.num_layers: expected an integer, got str 'four'"),
    ("model.num_layers=2.5", "model.num_layers: expected an integer"),
    ("model.num_layers=true", "model.num_layers: expected an integer"),
    ("train.learning_rate=fast", "train.learning_rate: expected a number"),
    ("train.learning_rate=true", "train.learning_rate: expected a number"),
    ("train.activation_checkpointing=1", "train.activation_checkpointing: expected true or false"),
    ("cluster.address=5", "cluster.address: expected a string"),
    ("balance.attn_time_coef=3", "balance.attn_time_coef: expected a list"),
    ("balance.attn_time_coef=[1, x, 3]", "balance.attn_time_coef[1]: expected a number"),
    ("train.mixed_precision=fp16", "train.mixed_precision: must be one of bf16, fp32, fp64"),
    ("model=3", "model: expected a mapping"),
    ("moe.expert_capacity=1.5", "moe.expert_capacity: expected an integer"),
])
def test_wrong_type(override, expected):
    assert expected in error_of([override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  num_layers: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML at line"):
        load(f)


def test_malformed_override_value():
    assert "override moe.top_k: malformed YAML" in error_of(["moe.top_k=[1"])


def test_override_without_equals():
    assert "expected KEY=VALUE" in error_of(["moe.top_k"])


def test_override_below_a_value():
    with pytest.raises(ConfigError, match="moe.top_k: is a value, cannot set moe.top_k.x"):
        load(LOCAL, ["moe.top_k.x=1"])  # the file sets moe.top_k
    assert "moe.top_k: expected an integer, got dict" in error_of(["moe.top_k.x=1"])


def test_top_level_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(f)


# --- validation rules ------------------------------------------------------------------------------

AT_LEAST_ONE = [
    "model.num_layers", "model.hidden_size", "model.num_attention_heads", "model.attention_head_size",
    "model.intermediate_size", "model.max_position_embeddings", "model.vocab_size", "moe.num_experts",
    "moe.top_k", "cluster.num_nodes", "cluster.gpus_per_node", "cluster.replicas", "balance.rebalancing_interval",
    "balance.min_attention_gpus",
    "schedule.max_concurrent_communications", "schedule.communication_chunk_size", "schedule.micro_batches_in_flight",
    "comm.synchronization_timeout_ms", "comm.quantization_bits", "train.batch_size", "train.seq_length",
    "train.micro_batch_size", "train.gradient_accumulation_steps", "train.checkpoint_interval",
    "emulation.stand_in_head_size", "emulation.stand_in_intermediate_size", "emulation.stand_in_seq_length",
    "emulation.stand_in_micro_batch_size", "emulation.stand_in_vocab_size",
]


@pytest.mark.parametrize("key", AT_LEAST_ONE)
def test_at_least_one(key):
    assert f"{key}: must be at least 1, got 0" in error_of([f"{key}=0"])


NOT_NEGATIVE = [
    "model.initializer_range", "model.layer_norm_eps", "moe.aux_loss_alpha", "moe.router_z_loss_coef",
    "balance.imbalance_threshold", "comm.compression_overhead", "train.learning_rate",
    "train.min_learning_rate", "train.weight_decay", "train.gradient_clipping", "train.adam_eps",
    "train.num_train_steps", "train.warmup_steps", "cluster.placement_timeout_s",
    "memory.attention_gpu_budget_gb", "memory.moe_gpu_budget_gb", "balance.migration_fixed_s",
]


@pytest.mark.parametrize("key", NOT_NEGATIVE)
def test_negative_rates_and_amounts(key):
    assert f"{key}: must not be negative, got -1" in error_of([f"{key}=-1"])


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_rate(value):
    assert "train.learning_rate: must not be negative" in error_of([f"train.learning_rate={value}"])


PROBABILITIES = ["model.hidden_dropout_prob", "model.attention_probs_dropout_prob",
                 "train.adam_beta1", "train.adam_beta2"]


@pytest.mark.parametrize("key", PROBABILITIES)
@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_probabilities(key, value):
    assert f"{key}: must be in [0, 1)" in error_of([f"{key}={value}"])


@pytest.mark.parametrize("key", ["comm.sparsification_ratio", "comm.overlap_efficiency_target"])
@pytest.mark.parametrize("value", ["0", "1.5"])
def test_fractions(key, value):
    assert f"{key}: must be in (0, 1]" in error_of([f"{key}={value}"])


@pytest.mark.parametrize("key", ["balance.attn_time_coef", "balance.moe_time_coef"])
def test_time_coefficients_need_three(key):
    assert f"{key}: needs 3 coefficients, got 2" in error_of([f"{key}=[1, 2]"])


def test_hidden_size_not_divisible_by_heads():
    message = error_of(["model.hidden_size=4100"])
    assert "model.hidden_size: 4100 is not divisible by model.num_attention_heads (32)" in message


def test_head_size_must_match():
    assert "model.attention_head_size: must equal hidden_size / num_attention_heads (128)" in \
        error_of(["model.attention_head_size=64"])


def test_top_k_larger_than_experts():
    assert "moe.top_k: 17 is larger than moe.num_experts (16)" in error_of(["moe.top_k=17"])


@pytest.mark.parametrize("value", ["0", "-0.5"])
def test_capacity_factor_must_be_positive(value):
    assert "moe.capacity_factor: must be > 0" in error_of([f"moe.capacity_factor={value}"])


def test_expert_capacity_null_or_positive():
    assert "moe.expert_capacity: must be null or at least 1" in error_of(["moe.expert_capacity=0"])
    assert load(None, ["moe.expert_capacity=2048"]).moe.expert_capacity == 2048


@pytest.mark.parametrize("k", [7, 15])
def test_attention_gpus_outside_policy_range(k):
    message = error_of([f"cluster.attention_gpus={k}"])
    assert message == (f"cluster.attention_gpus: {k} is outside the policy's range [8, 14] of attention GPUs "
                       f"(balance.min_attention_gpus, balance.max_attention_gpus)")


def test_min_greater_than_max():
    assert "balance.min_attention_gpus: 15 is greater than balance.max_attention_gpus (14)" in \
        error_of(["balance.min_attention_gpus=15"])


def test_attention_gpus_at_least_one():
    message = error_of(["balance.min_attention_gpus=0", "cluster.attention_gpus=0"])
    assert "balance.min_attention_gpus: must be at least 1, got 0" in message


def test_more_attention_gpus_than_the_topology_holds():
    message = error_of(["cluster.num_nodes=2"])
    assert message == ("cluster.attention_gpus: 12 is more than the 8 GPUs of the topology "
                       "(cluster.num_nodes x cluster.gpus_per_node)")


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  vocab_size: 256 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load(path)


def test_moe_gpus_at_least_one():
    message = error_of(["balance.max_attention_gpus=16", "cluster.attention_gpus=16"])
    assert "leaves 0 MoE GPUs of the 16 in the topology; at least 1 is needed" in message


def test_more_moe_gpus_than_experts():
    message = error_of(["moe.num_experts=4", "cluster.attention_gpus=8"])
    assert "cluster.attention_gpus: 8 leaves 8 MoE GPUs for only 4 experts (moe.num_experts)" in message


def test_more_attention_gpus_than_heads():
    message = error_of(["model.num_attention_heads=8", "model.attention_head_size=512"])
    assert "cluster.attention_gpus: 12 attention GPUs exceed the 8 heads (model.num_attention_heads)" in message


def test_micro_batch_must_divide_batch():
    assert "train.micro_batch_size: 48 does not divide train.batch_size (1024)" in \
        error_of(["train.micro_batch_size=48"])


def test_accumulation_steps_must_match():
    assert "train.gradient_accumulation_steps: must be batch_size / micro_batch_size (16), got 8" in \
        error_of(["train.gradient_accumulation_steps=8"])


def test_the_time_coefficients_layout_must_hold_the_model():
    assert ("balance.time_coef_layout: 12 attention GPUs exceed the 10 heads (model.num_attention_heads); set "
            "balance.time_coef_layout to a layout of this model, or null for the configured one") in \
        error_of(["model.num_attention_heads=10", "model.hidden_size=1280", "cluster.attention_gpus=9"])
    assert "balance.time_coef_layout: needs [num_nodes, gpus_per_node, attention_gpus]" in \
        error_of(["balance.time_coef_layout=[4, 4]"])


def test_replicas_must_share_the_micro_batches_equally():
    assert ("cluster.replicas: 3 replicas cannot share the step's 16 micro-batches "
            "(train.gradient_accumulation_steps) equally") in error_of(["cluster.replicas=3"])
    assert load(None, ["cluster.replicas=4"]).micro_batches_per_replica == 4


def test_elastic_is_for_one_replica():
    assert "train.elastic: going on with fewer nodes is built for one replica, not cluster.replicas=2" in \
        error_of(["cluster.replicas=2", "train.elastic=true"])


def test_seq_length_within_positions():
    assert "train.seq_length: 4096 exceeds model.max_position_embeddings (2048)" in \
        error_of(["train.seq_length=4096"])


def test_min_learning_rate_not_above_learning_rate():
    assert "train.min_learning_rate: 0.001 exceeds train.learning_rate" in \
        error_of(["train.min_learning_rate=1e-3"])


def test_warmup_within_training():
    assert "train.warmup_steps: 60000 exceeds train.num_train_steps (50000)" in \
        error_of(["train.warmup_steps=60000"])


def test_max_text_bytes_null_or_positive():
    assert "data.max_text_bytes: must be null or at least 1, got 0" in error_of(["data.max_text_bytes=0"])
    assert load(None, ["data.max_text_bytes=1000"]).data.max_text_bytes == 1000


def test_every_range_rule_has_a_test():
    """The parametrized lists above cover config.validate's range lists; a key added there needs a test."""
    source = inspect.getsource(config_module.validate)
    blocks = re.findall(r"for path, value in \[(.*?)\]:\s*_require\((.*?)\n", source, re.S)
    listed = {}
    for body, rule in blocks:
        listed[rule.split(",")[0].strip()] = set(re.findall(r'\("([a-z_]+\.[a-z_0-9]+)"', body))
    policy = {"balance.rebalancing_interval", "balance.min_attention_gpus", "balance.imbalance_threshold"}
    assert listed["value >= 1"] == set(AT_LEAST_ONE) - policy  # the policy's rules: config.check_policy
    assert listed["value >= 0 and math.isfinite(value)"] == set(NOT_NEGATIVE) - policy
    assert listed["0.0 <= value < 1.0"] == set(PROBABILITIES)
    assert listed["value > 0 and math.isfinite(value)"] == set(BANDWIDTHS)


BANDWIDTHS = ["balance.migration_gb_per_s", "emulation.intra_node_gb_per_s", "emulation.inter_node_gb_per_s",
              "emulation.compression_gb_per_s"]


@pytest.mark.parametrize("key", BANDWIDTHS)
@pytest.mark.parametrize("value", ["0", "-1", ".inf"])
def test_bandwidths_are_positive(key, value):
    assert f"{key}: must be a positive bandwidth" in error_of([f"{key}={value}"])


def test_bin_data_needs_a_path():
    assert "data.path: required when data.kind is bin" in error_of(["data.kind=bin"])


def test_check_split_names_the_key():
    with pytest.raises(ConfigError, match=r"^--attention-gpus: 15 is outside"):
        check_split(Config(), 15, key="--attention-gpus")
    check_split(Config(), 8)
    check_split(Config(), 14)


def test_an_asked_split_replaces_the_configs_own():
    ten_heads = ["model.num_attention_heads=10", "model.hidden_size=1280", "balance.time_coef_layout=null"]
    assert "cluster.attention_gpus: 12 attention GPUs exceed the 10 heads" in error_of(ten_heads)
    cfg = load(None, ten_heads, attention_gpus=9)
    assert cfg.cluster.attention_gpus == 9 and cfg.moe_gpus == 7
    with pytest.raises(ConfigError) as exc:
        load(None, ten_heads, attention_gpus=11)
    assert str(exc.value) == "--attention-gpus: 11 attention GPUs exceed the 10 heads (model.num_attention_heads)"
    with pytest.raises(ConfigError, match=r"^K: 15 is outside the policy's range \[8, 14\]"):
        load(None, [], attention_gpus=15, attention_gpus_key="K")
    # The config's own value is still type-checked, and every other rule still applies.
    with pytest.raises(ConfigError, match=r"^cluster.attention_gpus: expected an integer, got str 'twelve'$"):
        load(None, ["cluster.attention_gpus=twelve"], attention_gpus=9)
    with pytest.raises(ConfigError, match=r"^moe.top_k: 17 is larger than moe.num_experts \(16\)$"):
        load(None, ["moe.top_k=17"], attention_gpus=9)
    with pytest.raises(ConfigError, match=r"^--attention-gpus: expected an integer, got bool True$"):
        load(None, [], attention_gpus=True)


def test_check_split_with_another_policy_range():
    """The controller's rebalance checks against its live policy's range, not the config's."""
    with pytest.raises(ConfigError) as exc:
        check_split(Config(), 12, key="rebalance", policy_range=(2, 5))
    assert str(exc.value) == ("rebalance: 12 is outside the policy's range [2, 5] of attention GPUs "
                              "(balance.min_attention_gpus, balance.max_attention_gpus)")
    check_split(Config(), 3, key="rebalance", policy_range=(2, 5))  # outside the config's [8, 14]
    check_split(Config(), 15, within_policy=False)
    with pytest.raises(ConfigError, match=r"^rebalance: 16 leaves 0 MoE GPUs"):
        check_split(Config(), 16, key="rebalance", policy_range=(2, 16))


def test_hidden_act_accepts_what_the_experts_implement():
    assert error_of(["model.hidden_act=swish"]) == "model.hidden_act: must be one of gelu, relu, silu, got 'swish'"
    assert load(None, ["model.hidden_act=silu"]).model.hidden_act == "silu"
    assert Config().model.hidden_act == "gelu"


# --- renamed keys ----------------------------------------------------------------------------------

def _lookup(data, dotted):
    for part in dotted.split("."):
        data = data[part]
    return data


@pytest.mark.parametrize("old, new", sorted(config_module.RENAMED.items()))
def test_a_renamed_key_names_its_new_name(tmp_path, old, new):
    defaults = Config().to_dict()
    value = _lookup(defaults, new)  # the new key exists, the old one does not
    with pytest.raises(KeyError):
        _lookup(defaults, old)
    section, leaf = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {leaf}: {json.dumps(value)}\n")
    for source, overrides in ((path, []), (None, [f"{old}={json.dumps(value)}"])):
        with pytest.raises(ConfigError) as info:
            load(source, overrides)
        assert str(info.value) == f"{old}: renamed to {new}"


def test_a_renamed_key_through_the_cli(capsys):
    code, out, err = run_cli(capsys, "config", "--set", "cluster.emulate=true")
    assert (code, out, err) == (2, "", "ma-ray: error: cluster.emulate: renamed to cluster.fake_gpus\n")


# --- the same through the CLI: one line on stderr, exit code 2 ------------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["config", "--set", "moe.topk=2"], "moe.topk: unknown key"),
    (["config", "--set", "model.num_layers=four"], "model.num_layers: expected an integer"),
    (["config", "--config", "/nonexistent/ma-ray.yaml"], "config file not found"),
    (["config", "--set", "moe.top_k=17"], "moe.top_k: 17 is larger than moe.num_experts"),
    (["config", "--set", "model.hidden_size=4100"], "is not divisible by"),
    (["config", "--set", "moe.capacity_factor=0"], "moe.capacity_factor: must be > 0"),
    (["plan", "--set", "cluster.attention_gpus=15"], "cluster.attention_gpus: 15 is outside"),
    (["plan", "--set", "balance.min_attention_gpus=15"], "is greater than balance.max_attention_gpus"),
    (["config", "--set", "train.micro_batch_size=48"], "does not divide train.batch_size"),
    (["config", "--set", "train.learning_rate=-1"], "train.learning_rate: must not be negative"),
    (["config", "--set", "moe.top_k"], "expected KEY=VALUE"),
])
def test_cli_config_errors(capsys, argv, expected):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ma-ray: error: ") and expected in err


def test_cli_malformed_yaml(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("moe: {top_k: 2\n")
    code, _, err = run_cli(capsys, "config", "--config", str(f))
    assert code == 2 and err.count("\n") == 1 and "malformed YAML" in err


def test_cli_error_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "ma_ray.cli", "config", "--set", "unknown.key=1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "ma-ray: error: unknown: unknown key (known: balance, cluster, comm, control, " \
                          "data, emulation, memory, model, moe, schedule, train)\n"


# --- ma-ray config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    [],
    ["--config", str(PAPER)],
    ["--config", str(LOCAL), "--set", "moe.top_k=1", "--set", "model.num_layers=2"],
    ["--set", "balance.attn_time_coef=[1e-7, 2.5e-9, 8.7e-06]", "--set", "moe.expert_capacity=2048"],
])
def test_config_round_trip(tmp_path, capsys, argv):
    code, out, err = run_cli(capsys, "config", *argv)
    assert code == 0 and err == ""
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    expected = load(argv[argv.index("--config") + 1] if "--config" in argv else None,
                    [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    assert load(printed) == expected
    assert load(printed).to_yaml() == out


def test_config_applies_dotted_overrides(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "config", "--set", "moe.top_k=1", "--set", "model.num_layers=2")
    assert code == 0
    printed = tmp_path / "p.yaml"
    printed.write_text(out)
    cfg = load(printed)
    assert cfg.moe.top_k == 1 and cfg.model.num_layers == 2


def test_small_floats_survive_the_round_trip(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "config", "--set", "balance.moe_time_coef=[8.0e-4, 4.5e-5, 1.2e-5]")
    assert code == 0
    printed = tmp_path / "p.yaml"
    printed.write_text(out)
    assert all(math.isclose(a, b) for a, b in zip(load(printed).balance.moe_time_coef, [8e-4, 4.5e-5, 1.2e-5]))


@pytest.mark.parametrize("value", ["0", "-5", ".inf"])
def test_worker_timeout_is_a_positive_finite_time(value):
    assert "control.worker_timeout_s: must be a positive number of seconds" in error_of(
        [f"control.worker_timeout_s={value}"])
    assert load(None, ["control.worker_timeout_s=30"]).control.worker_timeout_s == 30.0


def test_compression_settings_are_checked():
    assert "comm.quantization_bits: must be in 1..8, got 16" in error_of(["comm.quantization_bits=16"])
    assert "comm.compression_block_size: must be in 1..65536 (offsets are 16-bit), got 70000" in \
        error_of(["comm.compression_block_size=70000"])
    assert "comm.gradient_compression: topk compresses the cross-node level of the two-level all-reduce; " \
        "it needs comm.hierarchical_allreduce: true" in \
        error_of(["comm.gradient_compression=topk", "comm.hierarchical_allreduce=false"])
    assert "comm.gradient_compression" in error_of(["comm.gradient_compression=zip"])
    assert "comm.compression_warmup_steps: must not be negative, got -1" in \
        error_of(["comm.compression_warmup_steps=-1"])
    assert "comm.compression_warmup_steps: expected an integer" in error_of(["comm.compression_warmup_steps=0.5"])
    assert load(None).comm.compression_warmup_steps == 10000  # the paper preset's, 20 % of its run
    assert load("cluster/local-cpu.yaml").comm.compression_warmup_steps == 50
    assert load(None, ["comm.gradient_compression=bf16"]).comm.gradient_compression == "bf16"


def test_stream_priorities_are_checked():
    assert "comm.attention_stream_priority: must be 0 (high) or more (normal), got -1" in \
        error_of(["comm.attention_stream_priority=-1"])
    assert "comm.moe_stream_priority: must be 0 (high) or more (normal), got -2" in \
        error_of(["comm.moe_stream_priority=-2"])


def test_a_split_settled_later_keeps_the_time_models_reference():
    """A resume or a restart runs at its checkpoint's split (Config.with_split): the config
    carries the split, and the time model keeps the configured layout as its reference."""
    from ma_ray.parallel.emulation import stage_durations

    cfg = load("cluster/local-cpu.yaml", ["emulation.modelled_compute=true"])
    assert cfg.balance.time_coef_layout is None and cfg.cluster.attention_gpus == 12
    moved = cfg.with_split(10)
    assert moved.cluster.attention_gpus == 10 and moved.balance.time_coef_layout == [4, 4, 12]
    assert stage_durations(moved).describe() == stage_durations(cfg).describe()
    assert cfg.with_split(12) is cfg
    with pytest.raises(ConfigError, match=r"^attention GPUs: 15 is outside the policy's range \[8, 14\]"):
        cfg.with_split(15)
    with pytest.raises(ConfigError, match=r"^K: expected an integer, got bool True$"):
        cfg.with_split(True, key="K")
