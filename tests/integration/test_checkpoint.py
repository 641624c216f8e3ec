"""Checkpoints on a real (emulated-GPU) local Ray cluster: a run resumed on another split
continues like the uninterrupted run, a save that fails midway leaves the previous checkpoint
intact, and `ma-ray train --resume` continues a run from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.verify.compare import parameter_error
from ma_ray.runtime import checkpoint, residuals
from ma_ray.runtime.worker_set import WorkerSet
from ma_ray.runtime.worker_group import WorkerCallFailed
from ma_ray.storage import StorageError
from ma_ray.verify import TOLERANCE, exact_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg(ray_cluster):
    base = C.load(ROOT / "tests" / "configs" / "live-job.yaml", ["train.num_train_steps=6", "moe.capacity_factor=0.75"])
    return exact_settings(base, "fp64")



def test_resume_on_another_split_continues_the_run(cfg, tmp_path):
    dataset = build_dataset(cfg)
    straight = WorkerSet(cfg.with_split(4), dataset, torch_threads=1)
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

    resumed = WorkerSet(cfg.with_split(2), dataset, torch_threads=1, checkpoint=str(folder))
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


def test_compression_residuals_are_training_state(cfg, tmp_path):
    """Gradient compression's error-feedback residuals (comm.cross_node): a resume on the same
    split continues bit for bit, and each node's residual survives a resume on another split
    and a rebalance that changes its pieces (runtime.residuals). Step 0 crosses dense (the
    warm-up), so the resumed jobs must also know to compress from step 1 on."""
    cfg = cfg.replace(**{"comm.gradient_compression": "topk", "comm.compression_block_size": 16,
                         "comm.compression_warmup_steps": 1})
    dataset = build_dataset(cfg)
    straight = WorkerSet(cfg.with_split(4), dataset, torch_threads=1)
    try:
        for step in range(2):
            straight.step(step)
        folder = checkpoint.save(straight, tmp_path, 1)
        saved = straight.residuals_by_node()
        losses = [straight.step(step).loss for step in range(2, 4)]
        before_move = straight.residuals_by_node()
        straight.move_to(5)  # 2 + 2 attention GPUs per node become 2 + 3: every piece changes
        after_move = straight.residuals_by_node()
    finally:
        straight.shutdown()
    assert sorted(saved) == [0, 1] and all(float(r.abs().sum()) > 0 for r in saved.values())
    residual_files = sorted(p.relative_to(folder).as_posix() for p in (folder / residuals.FOLDER).glob("*.pt"))
    assert residual_files and set(residual_files) <= set(checkpoint.verify(folder)["shards"])
    for node in before_move:
        assert torch.equal(after_move[node], before_move[node])

    same = WorkerSet(cfg.with_split(4), dataset, torch_threads=1, checkpoint=str(folder))
    try:
        assert [same.step(step).loss for step in range(2, 4)] == losses
    finally:
        same.shutdown()
    other = WorkerSet(cfg.with_split(2), dataset, torch_threads=1, checkpoint=str(folder))  # one attention GPU a node
    try:
        moved = other.residuals_by_node()
    finally:
        other.shutdown()
    for node, residual in saved.items():
        assert torch.equal(moved[node], residual)

    damaged = folder / residual_files[0]  # a residual is checked like a shard
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=f"{residual_files[0]}: the shard's SHA-256 does not match"):
        checkpoint.verify(folder)


def test_failed_save_leaves_the_previous_checkpoint(cfg, tmp_path):
    job = WorkerSet(cfg.with_split(4), build_dataset(cfg), torch_threads=1)
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
    assert " 3/5 " in second.stderr and " 0/" not in second.stderr  # the bar counts the run's steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["attention_gpus"] for r in rows] == [4, 4, 4, 3, 3]
    bad = subprocess.run([sys.executable, "-m", "ma_ray.cli", "train", "--resume", str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--resume" in bad.stderr


def damage(path: Path, how: str) -> None:
    """Damage a shard as disks and crashes do."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(b"\x80\x02garbage" * (len(data) // 9 + 1))[: len(data)]
    elif how == "flipped exponent bit":
        # One bit of a float's exponent, inside the tensor data (the zip's last quarter holds
        # its directory): the file still loads, with one wrong number in it.
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_named_and_passed_over(cfg, tmp_path):
    """Each shard's size and SHA-256 are in the metadata: a truncated, empty, garbage or
    bit-flipped shard is named in one line, the newest intact checkpoint is taken instead, and
    ``at_step`` picks one by hand. Old checkpoints beyond ``keep`` are deleted as new ones land,
    and what a crashed save left behind is cleaned up."""
    job = WorkerSet(cfg.with_split(4), build_dataset(cfg), torch_threads=1)
    try:
        folders = []
        for step in range(3):
            job.step(step)
            folders.append(checkpoint.save(job, tmp_path, step, keep=2))
    finally:
        job.shutdown()
    assert checkpoint.completed(tmp_path) == [folders[2], folders[1]]  # step 0 was pruned
    meta = checkpoint.verify(folders[2])
    shard = sorted(meta["shards"])[0]
    assert meta["shards"][shard]["file_bytes"] == (folders[2] / shard).stat().st_size
    pristine = (folders[2] / shard).read_bytes()
    for how in ("truncated", "empty", "garbage", "flipped exponent bit"):
        damage(folders[2] / shard, how)
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.verify(folders[2])
        assert str(info.value).startswith(f"checkpoint {folders[2] / shard}: ") and "\n" not in str(info.value)
        notes = []
        assert checkpoint.newest_intact(tmp_path, notes.append) == folders[1], how
        assert len(notes) == 1 and str(folders[2] / shard) in notes[0] and "falling back" in notes[0]
        (folders[2] / shard).write_bytes(pristine)
    assert checkpoint.newest_intact(tmp_path, pytest.fail) == folders[2]
    assert checkpoint.at_step(tmp_path, 1) == folders[1]
    with pytest.raises(checkpoint.CheckpointError, match=r"--resume-step 0: no checkpoint of that step .*steps: 2, 1"):
        checkpoint.at_step(tmp_path, 0)

    (tmp_path / ".step-00000003.tmp-0123abcd").mkdir()  # a save cut short by a crash
    (tmp_path / ".latest.tmp-89abcdef").write_text("step-00000003\n")
    assert checkpoint.clean_orphans(tmp_path) == [".latest.tmp-89abcdef", ".step-00000003.tmp-0123abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", folders[1].name, folders[2].name]


def test_a_full_disk_and_a_read_only_folder_are_one_line(cfg, small_mount):
    job = WorkerSet(cfg.with_split(4), build_dataset(cfg), torch_threads=1)
    try:
        job.step(0)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,ro", "tmpfs", str(small_mount)], check=True)
        with pytest.raises(StorageError) as info:
            checkpoint.save(job, small_mount / "checkpoints", 0)
        assert str(info.value) == f"cannot write {small_mount / 'checkpoints'}: Read-only file system"

        subprocess.run(["mount", "-o", "remount,rw", str(small_mount)], check=True)
        (small_mount / "filler").write_bytes(b"\0" * (256 * 1024 - 24 * 1024))  # leaves a few KiB
        with pytest.raises(WorkerCallFailed) as info:
            checkpoint.save(job, small_mount / "checkpoints", 0)
        message = str(info.value)
        assert message.startswith("checkpoint save failed on ") and "\n" not in message
        assert "StorageError: cannot write " in message and "no space left on the device" in message
        assert "unexpected pos" not in message
        assert not list((small_mount / "checkpoints").iterdir())  # nothing half-written stays
    finally:
        job.shutdown()
