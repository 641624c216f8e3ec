"""Faults injected into real runs: worker processes killed with SIGKILL or stopped with SIGSTOP at
steps drawn by a seeded random draw, and the controller's process killed. A stall fails within
its step deadline as one line naming the worker, the operation and the cause (exit code 1, the
details in the run folder's log); with ``train.max_failures`` the run recovers by itself from
each fault, and every step's loss equals an uninterrupted run's, with one metrics row per step.

2 nodes x 2 emulated GPUs, a tiny model, synthetic data. The recovery test runs ``train`` in a
thread of this process on the shared cluster; the stall test runs ``ma-ray train`` as a user does.
"""

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.errors import JobFailed
from ma_ray.runtime.worker_set import WorkerSet
from ma_ray.run_folder import new_job_id
from ma_ray.train import LOG, train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "live-job.yaml"
SETTINGS = ["cluster.gpus_per_node=2", "cluster.attention_gpus=2", "balance.min_attention_gpus=1",
            "balance.max_attention_gpus=3", "train.checkpoint_interval=3", "comm.synchronization_timeout_ms=2000"]
FAULT_SEED = 13


def processes(root_pid: int, title: str):
    """The live processes under ``root_pid`` whose title (Ray's ``ray::<Actor>...``) starts with
    ``title``."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def rows(out: Path):
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(out: Path, step: int, alive, timeout_s: float = 300) -> None:
    """Until the row of ``step`` is in ``out``'s metrics (the run is then in the next step)."""
    deadline = time.time() + timeout_s
    while not any(r.get("step") == step for r in rows(out)):
        assert alive(), "the run ended early"
        assert time.time() < deadline, f"no row of step {step} within {timeout_s} s"
        time.sleep(0.05)


def test_a_stall_fails_within_its_deadline_as_one_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ma_ray.cli", "train", "--config", str(CONFIG), "--steps", "40", "--out", str(out),
         *[arg for kv in SETTINGS for arg in ("--set", kv)], "--set", "train.max_failures=0",
         "--set", "control.namespace=stall-test"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_for_step(out, 4, lambda: proc.poll() is None)
        victim = processes(proc.pid, "ray::Worker")[0]
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        stdout, stderr = proc.communicate(timeout=300)
        ended_at = time.time()
    finally:
        if proc.poll() is None:
            proc.kill()
    failure = [r for r in rows(out) if r.get("event") == "failure"]
    assert len(failure) == 1, failure
    failure = failure[0]
    assert 0 < failure["deadline_s"] < 30  # the measured steps' bound, not control.worker_timeout_s
    # Past the deadline, the peers' own timeouts get comm.synchronization_timeout_ms + 1 s to name it.
    bound = failure["deadline_s"] + 2.0 + 1.0
    assert failure["detected_at"] - failure["step_started_at"] <= bound + 0.5
    assert failure["detected_at"] - stopped_at <= bound + 0.5
    assert proc.returncode == 1
    # The progress bar shares stderr; the error is its one last line, and no traceback is there.
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("ma-ray: error: train step failed on ") and "Traceback" not in stderr, stderr[-3000:]
    assert "(a stall)" in line and "node" in line and f"{out / LOG}" in line
    assert "frame #" not in stdout + stderr  # the dying peers' C++ stacks stay in Ray's logs
    assert "Traceback" in (out / LOG).read_text()
    print(f"\nstall: detected {failure['detected_at'] - stopped_at:.1f} s after SIGSTOP "
          f"(deadline {failure['deadline_s']:.1f} s), the run ended {ended_at - stopped_at:.1f} s after it")


@pytest.fixture(scope="module")
def recovery_cfg(ray_cluster):
    return C.load(CONFIG, SETTINGS + ["control.namespace=recovery-test"])


def test_kills_and_a_stall_recover_to_the_uninterrupted_losses(recovery_cfg, tmp_path):
    steps = 14
    straight = tmp_path / "straight"
    train(recovery_cfg.replace(**{"train.num_train_steps": steps}), straight, new_job_id(), progress=False)
    want = {r["step"]: r["loss"] for r in rows(straight)}

    draw = random.Random(FAULT_SEED)
    faults = [("kill a worker", draw.randrange(3, 6), "ray::Worker", signal.SIGKILL),
              ("stall a worker", draw.randrange(7, 10), "ray::Worker", signal.SIGSTOP),
              ("kill the controller", draw.randrange(11, 13), "ray::Controller", signal.SIGKILL)]
    out = tmp_path / "faulty"
    ended = {}
    cfg = recovery_cfg.replace(**{"train.max_failures": 3})

    def run():
        try:
            ended["result"] = train(cfg.replace(**{"train.num_train_steps": steps}), out, new_job_id(), progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            ended["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    injected = []
    stopped = []
    try:
        for what, step, title, sig in faults:
            wait_for_step(out, step - 1, thread.is_alive)
            victim = draw.choice(processes(os.getpid(), title))
            victim.send_signal(sig)
            if sig == signal.SIGSTOP:
                stopped.append(victim)
            injected.append((what, step, time.time()))
        thread.join(timeout=600)
    finally:
        for p in stopped:  # recovery killed it; never leave one behind
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert not thread.is_alive(), "the run did not end"
    assert "error" not in ended, ended.get("error")
    got = rows(out)
    step_rows = [r for r in got if "event" not in r]
    assert [r["step"] for r in step_rows] == list(range(steps))  # one row per step
    assert {r["step"]: r["loss"] for r in step_rows} == want  # bit-identical
    failures = [r for r in got if r.get("event") == "failure"]
    assert len(failures) == len(faults)
    print()
    for (what, step, at), f in zip(injected, failures):
        assert f["resumed_from"] is not None and f["resumed_from"] < step
        assert f["steps_lost"] == f["failed_step"] - f["resumed_from"] - 1 <= recovery_cfg.train.checkpoint_interval
        line = (f"{what} at step {step}: detected in {f['detected_at'] - at:.1f} s, "
                f"operation {f['operation']!r}, steps lost {f['steps_lost']}")
        if f["recover_s"] is not None:
            line += f", recovered in {f['recover_s']:.1f} s"
        print(line)


def test_a_nonfinite_step_is_never_applied(recovery_cfg, tmp_path):
    """A learning rate of 1e30 blows the weights up in one step, so the next step's loss is not
    finite: no worker applies it (skip), and with ``train.on_nonfinite=stop`` the run ends with
    one line naming the step."""
    cfg = recovery_cfg.replace(**{"train.learning_rate": 1e30, "train.on_nonfinite": "skip"})
    job = WorkerSet(cfg, build_dataset(cfg), torch_threads=1)
    try:
        assert not job.step(0).skipped
        before = job.export()
        moments = job.export("state", "exp_avg")
        m = job.step(1)
        assert m.skipped and not (math.isfinite(m.loss) and math.isfinite(m.grad_norm)), m
        after = job.export()
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert all(torch.equal(moments[n], t) for n, t in job.export("state", "exp_avg").items())
    finally:
        job.shutdown()
    with pytest.raises(JobFailed) as info:
        train(cfg.replace(**{"train.on_nonfinite": "stop", "train.num_train_steps": 4}), tmp_path / "run", new_job_id(), progress=False)
    line = str(info.value)
    assert line.startswith("step 1: the loss is ") and "train.on_nonfinite=stop" in line and "\n" not in line
    assert [r["skipped"] for r in rows(tmp_path / "run")] == [False, True]
