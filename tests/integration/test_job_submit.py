"""``ray job submit ... -- ma-ray train`` end to end, the way a user runs it on a real cluster.

A real Ray head (not ``ray.init()``'s private cluster) with 4 fake GPUs and the dashboard's job
server, started from this venv so the job's entrypoint finds ``ma-ray`` on the head's PATH. The
job joins that cluster (``cluster.fake_gpus: false``, ``address: auto``), reserves one node x 4
GPUs with a STRICT_SPREAD placement group, trains 3 steps, and writes ``metrics.jsonl``.

Isolation from every other Ray on the machine (other test modules' ``ray.init()`` clusters, other
users): the head gets its own short ``--temp-dir``, free ports for everything that listens on a
fixed default, and a marker variable in its environment. ``ray stop`` would kill every Ray
process of the machine, so teardown never calls it: it sends SIGTERM to the ``ray start --block``
process (which shuts down what it started) and then kills whatever still carries the marker
(workers and the job's driver run in their own process groups, so a process-group kill would
miss them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = "tests/configs/job-submit.yaml"  # relative: the job runs in the uploaded working dir
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
MARKER = "MA_RAY_TEST_JOB_SUBMIT_HEAD"
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


def _free_ports(n: int) -> list:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _marked_pids(token: str) -> list:
    """Our user's processes whose environment carries ``MARKER=token``."""
    needle = f"{MARKER}={token}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return pids


def _kill_marked(token: str, grace_s: float = 10.0) -> list:
    """SIGTERM, then SIGKILL, every process left with our marker; returns the pids it found."""
    found = _marked_pids(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_pids(token):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while _marked_pids(token) and time.monotonic() < deadline:
            time.sleep(0.2)
    return found


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Head:
    def __init__(self, proc, url: str, env: dict, temp_dir: Path, log: Path):
        self.proc, self.url, self.env, self.temp_dir, self.log = proc, url, env, temp_dir, log

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture(scope="module")
def head():
    token = uuid.uuid4().hex
    # Short path: Ray's unix sockets live under it and a socket path is limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mrjs-", dir="/tmp"))
    (gcs, dashboard, node_manager, object_manager, client_server, agent_listen, agent_grpc,
     runtime_env_agent, metrics) = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's entrypoint needs ma-ray
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        MARKER: token,
    })
    log = temp_dir / "head.log"
    cmd = [str(RAY), "start", "--head", "--block", "--num-gpus=4", "--num-cpus=2",
           f"--port={gcs}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent_listen}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
           f"--metrics-export-port={metrics}", "--disable-usage-stats"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    h = Head(proc, url, env, temp_dir, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _dashboard_up(url):
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{h.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the dashboard at {url} did not come up within {START_TIMEOUT_S} s:\n{h.log_tail()}")
            time.sleep(0.5)
        yield h
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the --block process shuts down its node
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        _kill_marked(token)
        leftover = _marked_pids(token)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes of the test head survived teardown: {leftover}"


def test_ray_job_submit_trains(head, tmp_path):
    out = tmp_path / "run"
    submission_id = f"ma-ray-test-{uuid.uuid4().hex[:8]}"
    cmd = ["job", "submit", "--address", head.url, "--submission-id", submission_id,
           "--working-dir", str(REPO),
           "--", "ma-ray", "train", "--config", CONFIG, "--steps", "3", "--out", str(out)]
    t0 = time.monotonic()
    try:
        res = head.ray(*cmd, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        head.ray("job", "stop", "--address", head.url, submission_id, timeout=60)
        pytest.fail(f"ray job submit did not finish within {JOB_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    shown = f"exit {res.returncode} after {time.monotonic() - t0:.0f} s\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 0, shown
    # The upload is the source tree only: Ray 2.60 leaves out .git, .venv, venv and __pycache__
    # by default and honours .gitignore (runs/, *.egg-info), so no runtime_env excludes are needed.
    assert "approaching the maximum upload size" not in res.stderr, shown

    # ray job submit exits 0 for STOPPED too: ask the job server for the final status.
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(head.url).get_job_status(submission_id) == JobStatus.SUCCEEDED, shown

    # The job's output (streamed by submit) ends with a short summary; the record is in the folder.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["out"] == str(out) and summary["step"] == 2, summary
    assert math.isfinite(summary["loss"]), summary
    assert f"finished: job {summary['job_id']}, steps 0-2 (3 steps)" in res.stdout, shown
    assert "train 3A/1M" in res.stdout + res.stderr, f"no progress bar in the job's output\n{shown}"

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [m["step"] for m in metrics] == [0, 1, 2], metrics
    assert all(math.isfinite(m["loss"]) for m in metrics), metrics
    assert all(m["attention_gpus"] == 3 for m in metrics), metrics
    assert (out / "config.yaml").is_file()
