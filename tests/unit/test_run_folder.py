"""Run folders and attaching to a job, refused before Ray starts: a non-empty or file ``--out``, a
folder a live run holds, a resume that has nothing to do, ``--steps`` as the LR schedule's
length, and a bounded, one-line failure against an address where no job runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ma_ray import run_folder
from ma_ray.cli import _train_config, build_parser, main
from ma_ray.optim import lr_factor

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "live-job.yaml"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    import ray

    t0 = time.monotonic()
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.startswith("ma-ray: error: ") and err.count("\n") == 1, (code, out, err)
    assert time.monotonic() - t0 < 10 and not ray.is_initialized()  # refused before Ray starts
    return err


def test_out_that_is_a_file_or_not_empty_is_refused(capsys, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert "is a file" in refused(capsys, "train", "--config", str(CONFIG), "--out", str(a_file))
    used = tmp_path / "run"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    err = refused(capsys, "train", "--config", str(CONFIG), "--out", str(used))
    assert "not empty" in err and f"use --resume {used}" in err
    assert sorted(p.name for p in used.iterdir()) == ["metrics.jsonl"]  # nothing written
    assert a_file.read_text() == "mine"


def test_a_folder_a_live_run_holds_is_refused(capsys, tmp_path):
    folder = tmp_path / "run"
    lock = run_folder.RunLock(folder, "0123456789ab")
    try:
        assert run_folder.holder(folder) == "0123456789ab"
        for option in ("--out", "--resume"):
            err = refused(capsys, "train", "--config", str(CONFIG), option, str(folder))
            assert "in use by the running job 0123456789ab" in err
        with pytest.raises(run_folder.RunFolderError, match="in use by the running job 0123456789ab"):
            run_folder.RunLock(folder, "ba9876543210")
    finally:
        lock.release()
    assert run_folder.holder(folder) is None  # released (a dead process releases it the same way)
    run_folder.RunLock(folder, "ba9876543210").release()


def test_default_run_folders_are_unique():
    first, second = (run_folder.default_folder(run_folder.new_job_id()) for _ in range(2))
    assert first != second and first.parent == Path("runs")


def _run_at_step_3(tmp_path, split: int) -> Path:
    """A run folder whose one checkpoint (meta only) is step 3's, at ``split`` attention GPUs."""
    folder = tmp_path / "run"
    checkpoints = folder / "checkpoints"
    (checkpoints / "step-00000003").mkdir(parents=True)
    (checkpoints / "step-00000003" / "meta.json").write_text(json.dumps({"step": 3, "attention_gpus": split}))
    (checkpoints / "latest").write_text("step-00000003\n")
    (folder / "config.yaml").write_text(CONFIG.read_text())
    return folder


def test_resume_with_nothing_to_do_says_so_without_ray(capsys, tmp_path):
    import ray

    folder = _run_at_step_3(tmp_path, 4)
    for steps in ("4", "2"):
        t0 = time.monotonic()
        code, out, err = run(capsys, "train", "--resume", str(folder), "--steps", steps)
        assert code == 0 and err == "" and time.monotonic() - t0 < 10 and not ray.is_initialized()
        assert "already at step 4" in out and out.count("\n") == 1


def test_a_resume_runs_at_its_checkpoints_split_unless_another_is_asked(capsys, tmp_path, monkeypatch):
    """The split is settled at the entry point: the checkpoint's (3 here, the config's is 4), or
    --attention-gpus; train() gets it inside the config."""
    import ma_ray.train as T

    folder = _run_at_step_3(tmp_path, 3)
    checkpoints = folder / "checkpoints"
    seen = []
    monkeypatch.setattr(T, "resume_point", lambda root, step=None: root / "step-00000003")
    monkeypatch.setattr(T, "train", lambda cfg, out, job_id, resume=None: seen.append((cfg, resume)) or {"text": ""})
    assert run(capsys, "train", "--resume", str(folder), "--steps", "10")[0] == 0
    assert seen[-1][0].cluster.attention_gpus == 3 and seen[-1][1] == checkpoints / "step-00000003"
    assert run(capsys, "train", "--resume", str(folder), "--steps", "10", "--attention-gpus", "5")[0] == 0
    assert seen[-1][0].cluster.attention_gpus == 5
    code, _, err = run(capsys, "train", "--resume", str(folder), "--steps", "10", "--attention-gpus", "6")
    assert code == 2 and err.startswith("ma-ray: error: --attention-gpus: 6 is outside")


def test_steps_is_the_lr_schedules_length():
    def cfg(*argv):
        return _train_config(build_parser().parse_args(["train", "--config", str(CONFIG), *argv]))

    forty, sixty = cfg("--steps", "40").train, cfg("--steps", "60").train
    assert (forty.num_train_steps, sixty.num_train_steps) == (40, 60)
    assert lr_factor(39, sixty) > lr_factor(39, forty)  # step 39 is the end of one schedule only
    assert "--steps 1" in str(pytest.raises(Exception, cfg, "--steps", "1", "--set", "train.warmup_steps=2").value)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_a_dead_address_fails_in_one_line_within_seconds(tmp_path):
    dead = _dead_address()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_folder.write_job(run_dir, {"job_id": "0123456789ab", "address": dead, "name": "ma-ray-controller-0123456789ab",
                                   "namespace": "ma-ray", "connect_timeout_s": 5.0})
    for argv in (["status", "--address", dead], ["rebalance", "3", "--run", str(run_dir)]):
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "ma_ray.cli", *argv], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert time.monotonic() - t0 < 15
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.startswith(f"ma-ray: error: no ma-ray job reachable at {dead}: ") and \
            proc.stderr.count("\n") == 1, proc.stderr


def test_run_without_job_json_is_one_line(capsys, tmp_path):
    assert "no job.json" in refused(capsys, "status", "--run", str(tmp_path))


def test_a_killed_runs_folder_is_free_again(tmp_path):
    folder = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from ma_ray.run_folder import RunLock; "
            f"RunLock(Path({str(folder)!r}), 'deadbeef0001'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert run_folder.holder(folder) == "deadbeef0001"
    finally:
        proc.kill()  # SIGKILL: no clean-up runs; the kernel drops the flock
        proc.wait(timeout=30)
    assert run_folder.holder(folder) is None
    run_folder.check_resumable(folder)
