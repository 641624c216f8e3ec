"""Checkpoints: the layout-independent training state on disk, written atomically.

``ROOT/step-00000050/`` holds one ``<worker>.pt`` per worker with the names it is the single
source of (parameters and AdamW moments by global name, and the optimizer step count),
``shards.json`` (which names each shard holds, so a resuming worker opens only the shards that
hold its names, and maps them rather than reading them: ``runtime.worker``) and ``meta.json``
(the step, the split and plan, the config, and what the caller adds: predictor state, ...). A
checkpoint without ``shards.json`` (written before it existed) still loads: every shard is
opened, and still only the names taken are read. A checkpoint is written into a temporary
folder and renamed into place, and ``ROOT/latest`` names the newest one (replaced atomically),
so a crash during a save leaves the previous checkpoint intact and ``latest`` never points at a
half-written one.

Nothing else needs saving: batches are a function of (seed, step) and each worker's dropout RNG
is reseeded from (seed, step, worker) every step.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

from ma_ray.errors import MaRayError
from ma_ray.runtime.links import worker_name
from ma_ray.runtime.migration import owned_names

LATEST = "latest"
SHARD_INDEX = "shards.json"


class CheckpointError(MaRayError):
    pass


def save(job, root: Path, step: int, extra: Optional[dict] = None) -> Path:
    """Write the job's state after ``step`` into ``root``; returns the checkpoint folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        nbytes = job.save_shards(str(tmp))
        meta = {"step": step, "attention_gpus": job.plan.attention_gpus, "plan": job.plan.to_dict(),
                "config": job.cfg.to_dict(), "bytes": nbytes, **(extra or {})}
        (tmp / SHARD_INDEX).write_text(json.dumps(shard_index(job.cfg, job.plan)))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp-{uuid.uuid4().hex[:8]}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    return final


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
    """The newest complete checkpoint under ``root``; one-line error when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(f"--resume {root}: no checkpoint there (no '{LATEST}' file)")
    folder = root / pointer.read_text().strip()
    if not (folder / "meta.json").is_file():
        raise CheckpointError(f"--resume {root}: '{LATEST}' names {folder.name}, which is incomplete")
    return folder


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())
