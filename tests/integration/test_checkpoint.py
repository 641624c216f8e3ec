"""Checkpoints on a real (emulated-GPU) local Ray cluster: a run resumed on another split
continues like the uninterrupted run, a save that fails midway leaves the previous checkpoint
intact, and `ma-ray train --resume` continues a run from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.verify.compare import parameter_error
from ma_ray.runtime import checkpoint
from ma_ray.runtime.job import TrainingJob
from ma_ray.runtime.worker_group import WorkerCallFailed
from ma_ray.verify import TOLERANCE, exact_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg(ray_cluster):
    base = C.load(ROOT / "tests" / "configs" / "live-job.yaml", ["train.num_train_steps=6", "moe.capacity_factor=0.75"])
    return exact_settings(base, "fp64")



def test_resume_on_another_split_continues_the_run(cfg, tmp_path):
    dataset = build_dataset(cfg)
    straight = TrainingJob(cfg, dataset, 4, torch_threads=1)
    try:
        for step in range(2):
            straight.step(step)
        folder = checkpoint.save(straight, tmp_path, 1)
        losses = [straight.step(step).loss for step in range(2, 5)]
        want = straight.export()
        want_moments = straight.export("state", "exp_avg_sq")
    finally:
        straight.shutdown()
    assert checkpoint.latest(tmp_path) == folder and checkpoint.read_meta(folder)["attention_gpus"] == 4

    resumed = TrainingJob(cfg, dataset, 2, torch_threads=1, checkpoint=str(folder))
    try:
        assert resumed.plan.attention_gpus == 2
        got_losses = [resumed.step(step).loss for step in range(2, 5)]
        got = resumed.export()
        got_moments = resumed.export("state", "exp_avg_sq")
    finally:
        resumed.shutdown()
    assert max(abs(a - b) / abs(b) for a, b in zip(got_losses, losses)) < TOLERANCE
    assert parameter_error(got, want, cfg.model.initializer_range)[0] < TOLERANCE
    assert max(float((got_moments[n] - want_moments[n]).abs().max() / want_moments[n].abs().max().clamp_min(1e-30))
               for n in want_moments) < TOLERANCE


def test_failed_save_leaves_the_previous_checkpoint(cfg, tmp_path):
    job = TrainingJob(cfg, build_dataset(cfg), 4, torch_threads=1)
    try:
        job.step(0)
        first = checkpoint.save(job, tmp_path, 0)
        job.step(1)
        victim = job.plan.moe_workers()[0]
        ray.kill(job.workers.actors[victim.slot])
        with pytest.raises(WorkerCallFailed, match=f"checkpoint save failed on 1 of 6 workers: "
                                                   f"node{victim.node}-gpu{victim.local_gpu} \\(moe\\): ActorDiedError"):
            checkpoint.save(job, tmp_path, 1)
    finally:
        job.shutdown()
    assert checkpoint.latest(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", first.name]  # no half-written folder
    assert checkpoint.read_meta(first)["step"] == 0


def test_cli_resume_continues_a_run_on_another_split(tmp_path):
    out = tmp_path / "run"
    config = ROOT / "tests" / "configs" / "live-job.yaml"
    common = ["--set", "train.checkpoint_interval=2", "--set", "control.namespace=resume-test"]
    first = subprocess.run([sys.executable, "-m", "ma_ray.cli", "train", "--config", str(config), "--steps", "3",
                            "--out", str(out), *common], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-m", "ma_ray.cli", "train", "--resume", str(out), "--steps", "5",
                             "--attention-gpus", "3", *common], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["attention_gpus"] for r in rows] == [4, 4, 4, 3, 3]
    bad = subprocess.run([sys.executable, "-m", "ma_ray.cli", "train", "--resume", str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--resume" in bad.stderr
