"""Two jobs on one cluster (the shared one), started back to back with the same ``control.name``:
each gets its own controller name; `ma-ray status --run DIR` and ``ma_ray.connect(run=DIR)``
reach the job of that folder and only it; with nothing named, the client refuses in one line
listing both; a rebalance's reply names the step the metrics show it at; and the controller's
gauges, tagged with each job's id, are scraped from the node's Prometheus endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

import ma_ray
from ma_ray import config as C
from ma_ray.control.client import ControllerNotFound
from ma_ray.data import build_dataset
from ma_ray.errors import MaRayError
from ma_ray.run_folder import new_job_id, read_job
from ma_ray.train import launch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "live-job.yaml"
# 2 nodes x 2 emulated GPUs each: 2 attention / 2 MoE, movable to 3 / 1.
SMALL = ["cluster.gpus_per_node=2", "cluster.attention_gpus=2", "balance.min_attention_gpus=1",
         "balance.max_attention_gpus=3"]


def cli(*args, address=None):
    """``ma-ray ARGS`` as a user runs it: RAY_ADDRESS only when ``address`` is given."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-m", "ma_ray.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def one_line_error(result) -> str:
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.startswith("ma-ray: error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


@pytest.fixture(scope="module")
def jobs(ray_cluster, tmp_path_factory):
    cfg = C.load(CONFIG, SMALL)
    dataset = build_dataset(cfg)
    started = {}
    try:
        for key in ("a", "b"):
            out = tmp_path_factory.mktemp(f"job-{key}")
            controller = launch(cfg, dataset, out, new_job_id(), torch_threads=1)
            started[key] = {"out": out, "controller": controller, "run": controller.run.remote(),
                            **read_job(out)}
        deadline = time.time() + 240
        for job in started.values():
            while ray.get(job["controller"].status.remote())["step"] < 1:
                assert time.time() < deadline, "the jobs did not train"
                time.sleep(0.5)
        yield started
    finally:
        for job in started.values():
            job["controller"].stop.remote()
        for job in started.values():
            ray.get(job["run"], timeout=120)
            ray.kill(job["controller"])


def test_two_jobs_have_two_names_and_each_run_folder_reaches_its_own(jobs):
    a, b = jobs["a"], jobs["b"]
    assert a["name"] != b["name"] and a["namespace"] == b["namespace"]
    assert a["name"] == f"ma-ray-controller-{a['job_id']}"

    status = cli("status", "--run", str(b["out"]))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["job_id"] == b["job_id"] and status.stderr == ""
    assert ma_ray.connect(run=a["out"]).job_id == a["job_id"]

    # An explicit name still works, and the id is checked when one is given.
    assert ma_ray.connect(name=a["name"]).job_id == a["job_id"]
    wrong = one_line_error(cli("status", "--name", a["name"], "--job-id", b["job_id"], address=a["address"]))
    assert f"is job {a['job_id']}, not {b['job_id']}" in wrong


def test_a_second_controller_for_a_running_job_is_refused_in_one_line(jobs, tmp_path):
    """The controller's name is the job's claim, taken atomically in Ray's registry of named
    actors: a second start of the same job (a copied job id, a retried submit) is one line, and
    the running job is not disturbed."""
    a = jobs["a"]
    cfg = C.load(CONFIG, SMALL)
    with pytest.raises(MaRayError) as err:
        launch(cfg, build_dataset(cfg), tmp_path, a["job_id"], torch_threads=1)
    assert str(err.value) == f"a job named {a['name']!r} is already running in namespace {a['namespace']!r}"
    assert ray.get(a["controller"].job_identity.remote())["job_id"] == a["job_id"]
    assert ray.get(a["controller"].status.remote())["state"] == "running"


def test_with_two_jobs_and_none_named_the_client_lists_them(jobs):
    a, b = jobs["a"], jobs["b"]
    err = one_line_error(cli("rebalance", "3", address=a["address"]))
    assert "2 ma-ray jobs run on the cluster" in err and a["name"] in err and b["name"] in err
    assert str(a["out"]) in err and "--run DIR" in err
    with pytest.raises(ControllerNotFound, match="2 ma-ray jobs run on the cluster"):
        ma_ray.connect()
    for job in (a, b):  # nothing moved
        assert ray.get(job["controller"].status.remote())["pending_split"] is None


def test_rebalance_reply_names_the_step_the_metrics_show_it_at(jobs):
    a = jobs["a"]
    result = cli("rebalance", "3", "--run", str(a["out"]))
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["job_id"] == a["job_id"] and reply["scheduled"] == 3
    client = ma_ray.connect(run=a["out"])
    deadline = time.time() + 180
    while not [r for r in client.history() if r["attention_gpus"] == 3]:
        assert time.time() < deadline, "the move did not happen"
        time.sleep(0.5)
    rows = client.history()
    first_moved = next(r["step"] for r in rows if r["attention_gpus"] == 3)
    assert first_moved == reply["before_step"], (reply, [(r["step"], r["attention_gpus"]) for r in rows])
    assert all(r["attention_gpus"] == 2 for r in rows if r["step"] < first_moved)
    assert client.status()["migrations"][-1]["before_step"] == reply["before_step"]
    assert ray.get(jobs["b"]["controller"].status.remote())["attention_gpus"] == 2  # the other job stays


def test_gauges_tagged_with_the_job_id_are_scraped(jobs):
    endpoint = jobs["a"]["metrics"]
    assert endpoint, "the cluster has no metrics export port (conftest sets cluster.metrics_export_port)"
    wanted = {"ray_ma_ray_stage_time_seconds", "ray_ma_ray_imbalance", "ray_ma_ray_attention_gpus", "ray_ma_ray_loss"}
    deadline = time.time() + 60
    while True:
        text = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
        samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
        by_job = {job["job_id"]: {s.name: s for s in samples if s.labels.get("job_id") == job["job_id"]}
                  for job in jobs.values()}
        if all(wanted <= set(found) for found in by_job.values()):
            break
        assert time.time() < deadline, f"gauges missing from {endpoint}/metrics: {by_job}"
        time.sleep(1)
    pools = {s.labels["pool"] for s in samples if s.name == "ray_ma_ray_stage_time_seconds"
             and s.labels.get("job_id") == jobs["b"]["job_id"]}
    assert pools == {"attention", "moe"}
    for job_id, found in by_job.items():
        assert found["ray_ma_ray_loss"].value > 0 and 0 <= found["ray_ma_ray_imbalance"].value <= 1
        assert found["ray_ma_ray_attention_gpus"].value in (2, 3)
