"""Checkpoints: the layout-independent training state on disk, written atomically, checked on
load, and kept within ``train.keep_checkpoints``.

``ROOT/step-00000050/`` holds one ``<worker>.pt`` per worker with the names it is the single
source of (parameters and AdamW moments by global name, and the optimizer step count),
``shards.json`` (which names each shard holds, so a resuming worker opens only the shards that
hold its names, and maps them rather than reading them: ``runtime.worker``) and ``meta.json``
(the step, the split and plan, the config, each shard's size and SHA-256 under ``shards``, with
gradient compression's residual files among them, and what the caller adds: predictor state, ...). A
checkpoint without ``shards.json`` (written before it existed) still loads: every shard is
opened, and still only the names taken are read. A checkpoint is written into a temporary
folder and renamed into place, and ``ROOT/latest`` names the newest one (replaced atomically),
so a crash during a save leaves the previous checkpoint intact and ``latest`` never points at a
half-written one. What a crash does leave, a ``.step-*.tmp-*`` folder, is removed by
``clean_orphans`` when the next run in the folder starts.

A checkpoint is used only once every shard matches its recorded size and checksum
(``verify``): a truncated, emptied or overwritten shard, or one flipped bit, is named in one
line, and ``newest_intact`` goes back to the newest checkpoint that is whole, saying so.
Writing one surfaces a full disk or a read-only folder as one ``StorageError`` line naming the
path and the cause.

Nothing else needs saving: batches are a function of (seed, step) and each worker's dropout RNG
is reseeded from (seed, step, worker) every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, List, Optional

from ma_ray.errors import MaRayError, first_line
from ma_ray.runtime.links import worker_name
from ma_ray.runtime.migration import owned_names
from ma_ray.storage import storage_error

LATEST = "latest"
SHARD_INDEX = "shards.json"


META = "meta.json"
STEP_FOLDER = re.compile(r"^step-(\d{8})$")
ORPHAN = re.compile(r"^\.(step-\d{8}|latest)\.tmp-[0-9a-f]{8}$")


class CheckpointError(MaRayError):
    pass


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def save(job, root: Path, step: int, extra: Optional[dict] = None, keep: Optional[int] = None,
         timeout_s: Optional[float] = None) -> Path:
    """Write the job's state after ``step`` into ``root``, the workers' writes bounded by
    ``timeout_s``; returns the checkpoint folder. With ``keep``, only the newest ``keep``
    checkpoints stay."""
    final = step_folder(root, step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise storage_error(exc.filename or tmp, exc) from None
    try:
        shards = job.save_shards(str(tmp), timeout_s=timeout_s)
        meta = {"step": step, "attention_gpus": job.plan.attention_gpus, "plan": job.plan.to_dict(),
                "config": job.cfg.to_dict(), "bytes": sum(s["bytes"] for s in shards.values()),
                "shards": shards, **(extra or {})}
        try:
            (tmp / SHARD_INDEX).write_text(json.dumps(shard_index(job.cfg, job.plan)))
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            pointer = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
            pointer.write_text(final.name + "\n")
            os.replace(pointer, root / LATEST)
        except OSError as exc:
            raise storage_error(exc.filename or tmp, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune(root, keep)
    return final


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(folder: Path) -> dict:
    """``folder``'s metadata once every shard it lists has its recorded size and SHA-256;
    ``CheckpointError`` naming the first file that does not. A checkpoint written before
    checksums were recorded is taken as it is."""
    meta = read_meta(folder)
    for name, want in sorted(meta.get("shards", {}).items()):
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: the shard is missing")
        size = path.stat().st_size
        if size != want["file_bytes"]:
            raise CheckpointError(f"checkpoint {path}: the shard has {size} bytes, {want['file_bytes']} were written")
        if file_digest(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path}: the shard's SHA-256 does not match the one recorded")
    return meta


def completed(root: Path) -> List[Path]:
    """The checkpoint folders under ``root``, newest first."""
    if not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).iterdir() if STEP_FOLDER.match(p.name) and (p / META).is_file()),
                  key=lambda p: p.name, reverse=True)


def newest_intact(root: Path, warn: Callable[[str], None]) -> Path:
    """The newest checkpoint under ``root`` that ``verify`` accepts, starting from the one
    ``latest`` names; each damaged one it passes is reported through ``warn`` in one line."""
    first = latest(root)
    for folder in [first] + [p for p in completed(root) if p.name < first.name]:
        try:
            verify(folder)
            return folder
        except CheckpointError as exc:
            warn(f"{exc}; falling back to an older checkpoint")
    raise CheckpointError(f"{root}: no intact checkpoint there")


def latest_intact(root: Path, warn: Callable[[str], None]) -> Optional[Path]:
    """``newest_intact``, or None when ``root`` has no checkpoint yet (a run that starts over)."""
    return newest_intact(root, warn) if (Path(root) / LATEST).is_file() else None


def at_step(root: Path, step: int) -> Path:
    """The checkpoint of ``step`` under ``root``, verified (``--resume-step``)."""
    folder = step_folder(root, step)
    if not (folder / META).is_file():
        have = ", ".join(str(int(STEP_FOLDER.match(p.name).group(1))) for p in completed(root)) or "none"
        raise CheckpointError(f"--resume-step {step}: no checkpoint of that step in {root} (steps: {have})")
    verify(folder)
    return folder


def clean_orphans(root: Path) -> List[str]:
    """Remove what saves cut short left under ``root`` (``.step-*.tmp-*`` folders and
    ``.latest.tmp-*`` pointers); returns their names. Only while no save runs in ``root``."""
    if not Path(root).is_dir():
        return []
    removed = []
    for p in Path(root).iterdir():
        if ORPHAN.match(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return sorted(removed)


def prune(root: Path, keep: int) -> List[str]:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names);
    returns the names deleted."""
    named = (Path(root) / LATEST).read_text().strip() if (Path(root) / LATEST).is_file() else None
    doomed = [p for p in completed(root)[keep:] if p.name != named]
    for p in doomed:
        shutil.rmtree(p)
    return [p.name for p in doomed]


def shard_file(worker: str) -> str:
    return f"{worker}.pt"


def shard_index(cfg, plan) -> dict:
    """Shard file -> the global names it holds, for a checkpoint of ``plan``."""
    return {shard_file(worker_name(g.node, g.local_gpu)): sorted(owned_names(cfg, g)) for g in plan.gpus}


def read_shard_index(folder: Path) -> Optional[dict]:
    """``shard_index`` of a checkpoint, as sets; None for one written without it."""
    path = folder / SHARD_INDEX
    if not path.is_file():
        return None
    return {shard: set(names) for shard, names in json.loads(path.read_text()).items()}


def latest(root: Path) -> Path:
    """The checkpoint ``latest`` names under ``root`` (not verified); one-line error when there
    is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"--resume {root}: no checkpoint there (no '{LATEST}' file)")
    folder = root / pointer.read_text().strip()
    if not (folder / META).is_file():
        raise CheckpointError(f"--resume {root}: '{LATEST}' names {folder.name}, which is incomplete")
    return folder


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable ({first_line(exc)})") from None
