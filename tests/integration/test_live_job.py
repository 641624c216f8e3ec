"""A real training job on a local Ray cluster, steered while it runs: the notebook, `ma-ray status`
and `ma-ray rebalance`, and a clean stop that checkpoints.

`ma-ray train` runs as a subprocess (its own emulated cluster, as a user would start it); this
test and the notebook's kernel attach to its job through the run folder (``job.json``).
"""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import pytest
import ray
from nbclient import NotebookClient

import ma_ray

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "live-job.yaml"
NOTEBOOK = ROOT / "notebooks" / "rebalancing.ipynb"


def cli(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "ma_ray.cli", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def live_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("live")
    namespace = f"live-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ma_ray.cli", "train", "--config", str(CONFIG), "--out", str(out),
         "--set", f"control.namespace={namespace}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + 180
    while not (out / "job.json").is_file():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.5)
    address = json.loads((out / "job.json").read_text())["address"]
    client = None
    while client is None:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the job's controller did not come up"
        try:
            client = ma_ray.connect(run=out)
        except ma_ray.control.client.ControllerNotFound:
            time.sleep(1)
    while client.status()["step"] < 1:
        assert time.time() < deadline, "the job did not train"
        time.sleep(0.5)
    yield {"client": client, "proc": proc, "out": out, "namespace": namespace, "address": address,
           "env": {**os.environ, "RAY_ADDRESS": address}}
    if proc.poll() is None:
        proc.kill()
    ray.shutdown()


def test_cli_status_and_rebalance_against_the_running_job(live_job):
    env, ns, run = live_job["env"], live_job["namespace"], str(live_job["out"])
    status = cli("status", "--run", run, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["attention_gpus"] == 4
    assert json.loads(status.stdout)["job_id"] == live_job["client"].job_id

    for bad, rule in (("9", "outside the policy's range [2, 5]"), ("1", "outside the policy's range")):
        result = cli("rebalance", bad, "--run", run, env=env)
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.startswith("ma-ray: error: rebalance: ") and result.stderr.count("\n") == 1
        assert rule in result.stderr
    assert live_job["client"].status()["pending_split"] is None  # a rejected request changes nothing

    missing = cli("status", "--namespace", "no-such-namespace", env=env)
    assert missing.returncode == 2 and "no running ma-ray job" in missing.stderr

    result = cli("rebalance", "3", "--namespace", ns, env=env)  # the one job in its namespace
    assert result.returncode == 0, result.stderr
    deadline = time.time() + 120
    while live_job["client"].status()["attention_gpus"] != 3:
        assert time.time() < deadline
        time.sleep(0.5)


def test_notebook_moves_the_split_and_training_goes_on(live_job):
    client = live_job["client"]
    before = client.status()
    target = 5 if before["attention_gpus"] != 5 else 2
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (f"RUN = {str(live_job['out'])!r}\nADDRESS = None\nTARGET_ATTENTION_GPUS = {target}\n"
                     "NEW_POLICY = {'imbalance_threshold': 0.3, 'rebalancing_interval': 7}\n")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    after = client.status()
    assert after["attention_gpus"] == target and after["moe_gpus"] == 6 - target
    assert after["step"] >= before["step"] + 2
    assert after["policy"]["imbalance_threshold"] == 0.3 and after["policy"]["rebalancing_interval"] == 7
    assert any(m["to"] == target and m["reason"] == "requested" for m in after["migrations"])
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"now {target} attention / {6 - target} MoE GPUs" in outputs
    code = [c for c in nb.cells if c.cell_type == "code"]
    plots = [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in code]
    calls = [c.source.count("plot_history(history)") for c in code]
    assert plots == calls and sum(plots) == 2, plots  # each plot once, none shown twice
    first = "".join(o.get("text", "") for c in code[:2] for o in c.get("outputs", []))
    assert f"job {client.job_id}" in first
    for noise in ("Missing packages", "ipywidgets", "IProgress", "tqdm", "Warning"):
        assert noise not in first, first


def test_stop_checkpoints_and_ends_cleanly(live_job):
    client, proc, out = live_job["client"], live_job["proc"], live_job["out"]
    assert client.stop() == "stopping"
    stdout, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "stopped" and summary["job_id"] == client.job_id
    tail = stdout.strip().splitlines()[-4:]  # a short summary for a person, not the JSON
    assert tail[0].startswith(f"stopped: job {client.job_id}, steps 0-") and tail[1].startswith("loss ")
    assert tail[2].startswith("split: 4 attention / 2 MoE GPUs (steps 0-") and "summary.json" in tail[3]
    assert not any(line.lstrip().startswith("{") for line in stdout.splitlines())
    assert "worker processes have been started" not in stdout  # Ray's worker-pool warning stays off
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(len(rows)))
    assert len({r["attention_gpus"] for r in rows}) >= 2  # the split really changed while it trained
    latest = (out / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((out / "checkpoints" / latest / "meta.json").read_text())
    assert meta["step"] == rows[-1]["step"]
