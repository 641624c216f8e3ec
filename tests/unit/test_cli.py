"""The ``ma-ray`` command line: ``plan`` as a table and as JSON, ``config``, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ma_ray.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster" / "local-cpu.yaml"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, *argv):
    code, out, err = run(capsys, "plan", "--json", *argv)
    assert code == 0 and err == ""
    return json.loads(out)


def test_plan_table_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "ma_ray.cli", "plan"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    header = next(l for l in lines if l.startswith("gpu"))
    for column in ("node", "local gpu", "role", "heads", "experts", "memory GB"):
        assert column in header
    rows = [l.split() for l in lines if l[:4].strip().isdigit()]
    assert len(rows) == 16
    assert rows[0][:5] == ["0", "0", "0", "attention", "0-2"]
    assert rows[11][:5] == ["11", "3", "2", "attention", "30-31"]
    assert rows[12][:6] == ["12", "0", "3", "moe", "-", "0-3"]
    assert rows[15][:6] == ["15", "3", "3", "moe", "-", "12-15"]
    text = proc.stdout
    assert "attention 0.1065 s" in text and "MoE 0.7381 s" in text
    assert "123.7 GB budget" in text and "memory.attention_gpu_budget_gb" in text


def test_plan_json_paper(capsys):
    data = plan_json(capsys)
    assert data["attention_gpus"] == 12 and data["moe_gpus"] == 4
    gpus = data["gpus"]
    assert [g["gpu"] for g in gpus] == list(range(16))
    for g in gpus:
        assert {"gpu", "node", "local_gpu", "role", "heads", "experts", "memory_gb"} <= set(g)
    assert gpus[0]["heads"] == [0, 1, 2] and gpus[0]["experts"] == [] and gpus[0]["role"] == "attention"
    assert gpus[12] == {**gpus[12], "node": 0, "local_gpu": 3, "role": "moe", "experts": [0, 1, 2, 3], "heads": []}
    assert abs(data["predicted"]["t_attention_s"] - 0.1064672) < 1e-12
    assert abs(data["predicted"]["t_moe_s"] - 0.738128) < 1e-12
    assert data["memory"]["attention"]["budget_gb"] == 123.7
    assert data["memory"]["attention"]["peak_gb"] < data["memory"]["attention"]["budget_gb"]
    assert gpus[0]["memory_gb"] == pytest.approx(data["memory"]["attention"]["peak_gb"], abs=1e-3)


def test_plan_other_split_and_config(capsys):
    data = plan_json(capsys, "--attention-gpus", "13")
    assert data["attention_gpus"] == 13 and data["moe_gpus"] == 3
    assert [g["experts"][0] for g in data["gpus"] if g["role"] == "moe"] == [0, 6, 11]
    local = plan_json(capsys, "--config", str(LOCAL), "--attention-gpus", "10", "--set", "moe.top_k=1")
    assert local["attention_gpus"] == 10
    assert sorted(h for g in local["gpus"] for h in g["heads"]) == list(range(16))


def test_plan_shows_every_replicas_gpus(capsys):
    data = plan_json(capsys, "--set", "cluster.replicas=2")
    assert data["topology"] == {"num_nodes": 4, "gpus_per_node": 4, "replicas": 2}
    gpus = data["gpus"]
    assert [(g["replica"], g["gpu"]) for g in gpus] == [(r, i) for r in range(2) for i in range(16)]
    for g0, g1 in zip(gpus[:16], gpus[16:]):  # counterparts: the same heads and experts, 4 nodes on
        assert (g1["node"], g1["heads"], g1["experts"]) == (g0["node"] + 4, g0["heads"], g0["experts"])
    code, out, err = run(capsys, "plan", "--set", "cluster.replicas=2")
    assert code == 0 and err == "" and "Plan: 2 replicas" in out
    rows = [l.split() for l in out.splitlines() if l[:8].strip().isdigit()]
    assert len(rows) == 32 and rows[31][:5] == ["1", "15", "7", "3", "moe"]
    code, out, err = run(capsys, "plan", "--set", "cluster.replicas=3")
    assert code == 2 and out == "" and err == (
        "ma-ray: error: cluster.replicas: 3 replicas cannot share the step's 16 micro-batches "
        "(train.gradient_accumulation_steps) equally\n")


def test_plan_table_in_process(capsys):
    code, out, err = run(capsys, "plan", "--config", str(LOCAL), "--attention-gpus", "8")
    assert code == 0 and err == ""
    assert "8 attention GPUs (16 heads), 8 MoE GPUs (16 experts)" in out


# The preset's own split (cluster.attention_gpus 12) does not fit 10 heads; the asked 9 does.
TEN_HEADS = ["--set", "model.num_attention_heads=10", "--set", "model.hidden_size=40"]
ASKED_SPLIT = ["--config", str(LOCAL), "--attention-gpus", "9", *TEN_HEADS]


def test_plan_validates_the_asked_split_not_the_configs(capsys):
    data = plan_json(capsys, *ASKED_SPLIT)
    assert data["attention_gpus"] == 9 and data["moe_gpus"] == 7
    assert sorted(h for g in data["gpus"] for h in g["heads"]) == list(range(10))
    code, out, err = run(capsys, "plan", *ASKED_SPLIT)
    assert code == 0 and err == "" and "9 attention GPUs (10 heads), 7 MoE GPUs (16 experts)" in out
    # Without --attention-gpus the config's own split is validated, and named.
    code, out, err = run(capsys, "plan", "--config", str(LOCAL), *TEN_HEADS)
    assert code == 2 and out == ""
    assert err == ("ma-ray: error: cluster.attention_gpus: 12 attention GPUs exceed the 10 heads "
                   "(model.num_attention_heads)\n")
    # A bad asked split is named as the option.
    code, out, err = run(capsys, "plan", "--config", str(LOCAL), "--attention-gpus", "11", *TEN_HEADS)
    assert code == 2 and out == ""
    assert err == "ma-ray: error: --attention-gpus: 11 attention GPUs exceed the 10 heads (model.num_attention_heads)\n"


def test_train_config_takes_the_asked_split():
    """What ``train`` checks before it starts anything: the config, the plan, the time models
    (emulated compute and the controller's predictor, both referenced to the run's split)."""
    from ma_ray.cli import _train_config
    from ma_ray.control.predictor import StageTimePredictor
    from ma_ray.parallel import make_plan
    from ma_ray.parallel.emulation import stage_durations, stand_in_config

    args = build_parser().parse_args(["train", *ASKED_SPLIT, "--emulate-compute"])
    cfg = _train_config(args)
    assert cfg.cluster.attention_gpus == 9 and cfg.emulation.modelled_compute
    assert make_plan(cfg).attention_gpus == 9
    assert stage_durations(cfg).reference[0] == 2  # 10 heads over 9 GPUs: 2 on the busiest
    assert stand_in_config(cfg).cluster.attention_gpus == 9
    assert StageTimePredictor(cfg).workload.reference_k == 9


def test_verify_config_takes_the_asked_split():
    from ma_ray.cli import _run_config
    from ma_ray.verify import exact_settings

    args = build_parser().parse_args(["verify", *ASKED_SPLIT])
    cfg = exact_settings(_run_config(args), "fp64")  # verify's first step re-validates the config
    assert cfg.cluster.attention_gpus == 9 and cfg.train.mixed_precision == "fp64"


@pytest.mark.parametrize("command", ["train", "verify"])
def test_run_commands_name_a_bad_asked_split(capsys, command):
    code, out, err = run(capsys, command, "--config", str(LOCAL), "--attention-gpus", "11", *TEN_HEADS)
    assert code == 2 and out == ""
    assert err == "ma-ray: error: --attention-gpus: 11 attention GPUs exceed the 10 heads (model.num_attention_heads)\n"


@pytest.mark.parametrize("argv, expected", [
    (["plan", "--attention-gpus", "15"], "--attention-gpus: 15 is outside the policy's range [8, 14] of attention GPUs "
                                         "(balance.min_attention_gpus, balance.max_attention_gpus)"),
    (["plan", "--attention-gpus", "7"], "--attention-gpus: 7 is outside"),
    (["plan", "--attention-gpus", "twelve"], "argument --attention-gpus: invalid int value"),
    # a 3 x 4 cluster cannot give 12 GPUs to attention and keep a MoE GPU
    (["plan", "--set", "cluster.num_nodes=3", "--set", "cluster.attention_gpus=9", "--attention-gpus", "12"],
     "--attention-gpus: 12 leaves 0 MoE GPUs of the 12 in the topology"),
    (["plan", "--config", "/nonexistent.yaml"], "config file not found"),
    (["plan", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--resume-step", "3"], "--resume-step: needs --resume DIR"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("ma-ray: error: ") and err.count("\n") == 1 and expected in err


def test_unreadable_config_is_one_line(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(capsys, "config", "--config", str(f))
    assert code == 2 and err.startswith("ma-ray: error: ") and err.count("\n") == 1


def test_error_exit_code_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "ma_ray.cli", "plan", "--attention-gpus", "15"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("ma-ray: error: --attention-gpus: 15")


def test_config_prints_yaml(capsys):
    code, out, _ = run(capsys, "config", "--config", str(LOCAL))
    assert code == 0 and out.startswith("model:\n") and "fake_gpus: true" in out


def test_commands_are_registered():
    assert {"config", "plan"} <= set(COMMANDS)
    help_text = build_parser().format_help()
    assert "config" in help_text and "plan" in help_text


def test_verify_steps_default_with_and_without_rebalances():
    # `ma-ray verify` with neither --steps nor --rebalance used to die in max() with a traceback.
    from ma_ray.verify import parse_rebalances, steps_to_verify

    assert steps_to_verify(None, {}) == 2
    assert steps_to_verify(None, parse_rebalances("2:10,4:13")) == 5
    assert steps_to_verify(3, parse_rebalances("1:10")) == 3
