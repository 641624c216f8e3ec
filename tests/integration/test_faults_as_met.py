"""Faults as an operator meets them, injected into real runs: a worker stopped while it writes its
checkpoint shard, a worker killed and then the controller stopped (what the terminal shows), one
non-finite gradient under top-k compression, and storage that turns read-only or fills up while
a run writes to it (a tmpfs of its own, remounted or filled by this process).

2 nodes x 2 emulated GPUs, the tiny model of ``live-job.yaml``, synthetic data. ``ma-ray train``
runs as a user runs it where the terminal or the exit code is the point; elsewhere ``train`` or a
``WorkerSet`` runs in this process on the shared cluster.
"""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch
from ray import cloudpickle

from ma_ray import config as C
from ma_ray.control.client import controller_name
from ma_ray.control.faults import Failure
from ma_ray.control.metrics_log import MetricsLog
from ma_ray.data import build_dataset
from ma_ray.errors import JobFailed
from ma_ray.run_folder import new_job_id
from ma_ray.runtime.worker_set import WorkerSet
from ma_ray.storage import StorageError
from ma_ray.train import train

from test_recovery import CONFIG, ROOT, SETTINGS, processes, rows, wait_for_step


def cli_train(out: Path, *settings: str, steps: int = 40):
    return subprocess.Popen(
        [sys.executable, "-m", "ma_ray.cli", "train", "--config", str(CONFIG), "--steps", str(steps), "--out", str(out),
         *[arg for kv in SETTINGS + list(settings) for arg in ("--set", kv)]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish(proc, timeout_s: float = 300):
    try:
        return proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def cfg(ray_cluster):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers run this file's injections
    yield C.load(CONFIG, SETTINGS + ["control.namespace=faults-as-met"])
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _stop_in_next_save(worker) -> None:
    """In a worker: the next shard it writes stops its process first (SIGSTOP), as a worker that
    stalls mid-save (a hung filesystem, a paused VM)."""
    original = torch.save

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGSTOP)
        return original(*args, **kwargs)
    torch.save = save


def test_a_worker_stalled_in_a_save_is_found_by_the_saves_own_deadline(cfg, tmp_path):
    steps, out, job_id, ended = 9, tmp_path / "run", new_job_id(), {}
    run_cfg = cfg.replace(**{"train.num_train_steps": steps, "train.max_failures": 1})

    def run():
        try:
            ended["result"] = train(run_cfg, out, job_id, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            ended["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for_step(out, 3, thread.is_alive)  # the save after step 2 is written
        controller = ray.get_actor(controller_name(cfg.control.name, job_id), namespace=cfg.control.namespace)
        workers = ray.get(controller.__ray_call__.remote(lambda c: c.worker_set.workers.actors))
        ray.get(workers[(1, 1)].__ray_call__.remote(_stop_in_next_save))  # after step 5, it stops
        thread.join(timeout=300)
    finally:
        for p in processes(os.getpid(), "ray::Worker"):
            if p.status() == psutil.STATUS_STOPPED:  # recovery killed it; never leave one behind
                p.kill()
    assert not thread.is_alive() and "error" not in ended, ended.get("error")
    got = rows(out)
    assert [r["step"] for r in got if "event" not in r] == list(range(steps))
    (failure,) = [r for r in got if r.get("event") == "failure"]
    assert failure["operation"] == "checkpoint save" and failure["failed_step"] == 5
    assert "(a stall)" in json.dumps(failure["workers"])
    # Steps 3, 4 and 5 had finished (5's save failed): all three are done again.
    assert (failure["resumed_from"], failure["steps_lost"]) == (2, 3)
    # The save's bound: its bytes over the disk's measured speed, with headroom: seconds.
    assert failure["deadline_s"] < 15
    settle_s = run_cfg.comm.synchronization_timeout_ms / 1000 + 1
    assert failure["detected_at"] - failure["step_started_at"] <= failure["deadline_s"] + settle_s + 1.0
    print(f"\nstall in a save: detected {failure['detected_at'] - failure['step_started_at']:.1f} s after the save "
          f"began (deadline {failure['deadline_s']:.1f} s), recovered in {failure['recover_s']:.1f} s")


def test_the_terminal_after_a_workers_death_and_a_controllers_stall(tmp_path):
    out = tmp_path / "run"
    heartbeat_s = 3.0
    proc = cli_train(out, "train.max_failures=2", f"control.heartbeat_timeout_s={heartbeat_s}",
                     "control.namespace=terminal-test", steps=12)
    stopped = []
    try:
        wait_for_step(out, 2, lambda: proc.poll() is None)
        processes(proc.pid, "ray::Worker")[0].send_signal(signal.SIGKILL)
        wait_for_step(out, 8, lambda: proc.poll() is None)
        controller = processes(proc.pid, "ray::Controller")[0]
        controller.send_signal(signal.SIGSTOP)
        stopped.append(controller)
        stopped_at = time.time()
        stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in stopped:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
    assert proc.returncode == 0, stderr[-3000:]
    terminal = stdout + stderr
    worker_death, controller_stall = [r for r in rows(out) if r.get("event") == "failure"]
    # Each failure is on the terminal once it is recovered from, as one line; the controller's stall
    # also when it is found.
    assert Failure(**worker_death).line() in terminal.splitlines(), terminal
    assert Failure(**controller_stall).line() in terminal.splitlines(), terminal
    assert controller_stall["workers"]["controller"].startswith("no answer to a poll of its")
    found = Failure(**{**controller_stall, "resumed_from": None, "notes": []}).line() + "; starting a new controller"
    assert found in terminal.splitlines(), terminal
    assert controller_stall["detected_at"] - stopped_at <= heartbeat_s + 2.0
    assert not controller.is_running() or controller.status() == psutil.STATUS_ZOMBIE  # killed, not left stopped
    # Ray's own multi-line account of the deaths stays in the run folder's log.
    assert "(raylet)" not in terminal and "Traceback" not in terminal and "A worker died" not in terminal
    # The summary covers the whole run, and each failure counts the steps it made redo.
    assert "steps 0-11 (12 steps)" in stdout and "at step 0," in stdout, stdout
    step_rows = [r["step"] for r in rows(out) if "event" not in r]
    assert step_rows == list(range(12))
    print(f"\ncontroller stall: detected {controller_stall['detected_at'] - stopped_at:.1f} s after SIGSTOP "
          f"(heartbeat {heartbeat_s:g} s), recovered in {controller_stall['recover_s']:.1f} s")


def _poison_next_step(worker) -> None:
    """In a worker: its next step's gradients are all NaN before they are reduced."""
    role = worker.role
    original = role.synchronize_gradients

    def poisoned():
        del role.synchronize_gradients  # one step only
        for p in role.module.parameters():
            p.grad.fill_(float("nan"))
        original()
    role.synchronize_gradients = poisoned


def test_a_skipped_step_under_topk_leaves_the_residuals_as_they_were(cfg):
    topk = cfg.replace(**{"comm.gradient_compression": "topk", "comm.compression_warmup_steps": 0,
                          "train.on_nonfinite": "skip"})
    job = WorkerSet(topk, build_dataset(topk), torch_threads=1)
    try:
        for step in range(2):
            assert not job.step(step).skipped
        residuals, params = job.residuals_by_node(), job.export()
        assert len(residuals) == 2 and all(r.abs().sum() > 0 for r in residuals.values())  # two nodes hold some
        attention = job.plan.attention_workers()[0].slot
        ray.get(job.workers.actors[attention].__ray_call__.remote(_poison_next_step))
        assert job.step(2).skipped
        after = job.residuals_by_node()
        assert all(torch.equal(residuals[node], after[node]) for node in residuals)  # not one NaN kept
        assert all(torch.equal(params[n], t) for n, t in job.export().items())
        m = job.step(2)  # the step again: applied, with the residuals of the last applied step
        assert not m.skipped and math.isfinite(m.loss)
        assert all(torch.isfinite(r).all() for r in job.residuals_by_node().values())
    finally:
        job.shutdown()


def test_a_run_that_skips_every_step_from_some_point_fails(cfg, tmp_path):
    """A learning rate of 1e30 blows the weights up in one step: every later step is not finite."""
    bad = cfg.replace(**{"train.learning_rate": 1e30, "train.on_nonfinite": "skip", "train.max_consecutive_skips": 3,
                         "train.num_train_steps": 10})
    with pytest.raises(JobFailed) as info:
        train(bad, tmp_path / "run", new_job_id(), progress=False)
    line = str(info.value)
    assert line.startswith("steps 1-3: 3 steps in a row had a non-finite loss or gradient norm and were skipped "
                           "(train.max_consecutive_skips=3); the last applied step is 0"), line
    assert [r["skipped"] for r in rows(tmp_path / "run")] == [False, True, True, True]


@pytest.fixture
def tmpfs(small_mount):
    def mount(size: str):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small_mount)], check=True)
        return small_mount
    return mount


def test_a_metrics_row_is_on_disk_whole_or_not_at_all(tmpfs):
    folder = tmpfs("12k")  # three pages
    log = MetricsLog(folder / "metrics.jsonl")
    log.append({"step": 0, "loss": 1.0})
    row = {"step": 1, "notes": "x" * 20000}  # needs five pages of the three: the write is cut short
    with pytest.raises(StorageError) as info:
        log.append(row)
    assert str(info.value).startswith(f"cannot write {log.path}: no space left on the device")
    assert log.path.read_text() == '{"step": 0, "loss": 1.0}\n'  # nothing of the refused row


def _fill(folder: Path) -> None:
    """Write into ``folder`` until its disk is full, as another process would."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.mark.parametrize("what", ["read-only", "full"])
def test_storage_lost_mid_run_is_exit_1_naming_the_path(tmpfs, what):
    folder = tmpfs("64m")
    out = folder / "run"
    proc = cli_train(out, f"control.namespace=storage-{what}")
    try:
        wait_for_step(out, 3, lambda: proc.poll() is None)
        if what == "read-only":
            # A remount would wait for the run's open files: a read-only copy of the folder takes
            # its place instead, which every later open (each metrics row, each save) meets.
            copy = folder.parent / "read-only"
            copy.mkdir()
            for cmd in (["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(copy)], ["cp", "-a", str(out), str(copy)],
                        ["mount", "-o", "remount,ro", str(copy)], ["umount", "-l", str(folder)],
                        ["mount", "--move", str(copy), str(folder)]):
                subprocess.run(cmd, check=True)
        else:
            _fill(folder)
        stdout, stderr = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    cause = "Read-only file system" if what == "read-only" else "no space left on the device"
    assert line.startswith(f"ma-ray: error: cannot write {out / 'metrics.jsonl'}: {cause}"), line
    assert "Traceback" not in stderr
    details = Path(line.rpartition("(details: ")[2].rstrip(")"))
    assert "Traceback" in details.read_text() and "StorageError" in details.read_text()
    for text in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(text)  # every row whole
