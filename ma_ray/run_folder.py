"""A run folder: where one training job writes its config, metrics, checkpoints and ``job.json``.

Everything here is plain file work, done before Ray starts, so a folder that cannot take the run
is refused in a line and leaves nothing behind:

- a new run (``--out``) takes a folder that does not exist or is empty; the default name
  (``runs/<time>-<job id>``) is unique, so two runs started in the same second get two folders;
- ``--resume DIR`` takes a folder with a config and a checkpoint;
- a folder in use by a live run is refused: the run holds an exclusive ``flock`` on
  ``DIR/job.lock``, which names its job id, for as long as its process lives. The kernel drops
  the lock when the process dies, however it dies, so a crashed run's folder can be resumed.

``job.json`` is where a client finds the job: its id, the cluster address, the controller's
name and namespace (``ma_ray.connect(run=DIR)``, ``ma-ray status --run DIR``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from ma_ray.errors import MaRayError

LOCK = "job.lock"
JOB_FILE = "job.json"


class RunFolderError(MaRayError):
    pass


def new_job_id() -> str:
    """A job's id: 12 hex digits, unique for every run (a resumed run is a new job)."""
    return uuid.uuid4().hex[:12]


def default_folder(job_id: str, root: Path = Path("runs")) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<job id>``: sorted by time, and never the same for two jobs."""
    return root / f"{time.strftime('%Y%m%d-%H%M%S')}-{job_id}"


def holder(folder: Path) -> Optional[str]:
    """The id of the live job that holds ``folder``, or None when no live process holds it."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return os.read(fd, 256).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # closing drops a lock we took
    return None


def check_new(folder: Path, option: str = "--out") -> None:
    """A new run may write into ``folder``: it does not exist or is an empty directory."""
    _check_not_file(folder, option)
    _check_not_held(folder, option)
    if folder.is_dir() and any(folder.iterdir()):
        raise RunFolderError(f"{option} {folder}: the folder is not empty (a run folder? use --resume {folder} "
                             f"to continue it, or give a new folder)")


def check_resumable(folder: Path) -> None:
    """``--resume`` may continue ``folder``: a directory no live run holds (its config and
    checkpoints are checked by the caller)."""
    _check_not_file(folder, "--resume")
    if not folder.is_dir():
        raise RunFolderError(f"--resume {folder}: no such folder")
    _check_not_held(folder, "--resume")


def _check_not_file(folder: Path, option: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{option} {folder}: is a file, not a folder")


def _check_not_held(folder: Path, option: str) -> None:
    job = holder(folder)
    if job is not None:
        raise _in_use(folder, option, job)


def _in_use(folder: Path, option: str, job: str) -> RunFolderError:
    return RunFolderError(f"{option} {folder}: in use by the running job {job} ({folder / LOCK}); "
                          f"stop it first, or give another folder")


class RunLock:
    """The exclusive hold of a live run on its folder (see the module docstring)."""

    def __init__(self, folder: Path, job_id: str, option: str = "--out"):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.read(self._fd, 256).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise _in_use(folder, option, other) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{job_id}\n".encode())
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays, naming the last job
            self._fd = None


def write_job(folder: Path, record: dict) -> None:
    """Write ``job.json`` atomically (a client never reads half of it)."""
    tmp = folder / f".{JOB_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, folder / JOB_FILE)


def read_job(folder: Path) -> dict:
    """The ``job.json`` of run folder ``folder``; one-line error when there is none."""
    path = Path(folder) / JOB_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"--run {folder}: no {JOB_FILE} there; is it a run folder of a job "
                             f"that has started?") from None
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"--run {folder}: cannot read {JOB_FILE}: {exc}") from None
    if not isinstance(record, dict) or not {"job_id", "address", "name", "namespace"} <= set(record):
        raise RunFolderError(f"--run {folder}: {JOB_FILE} lacks job_id, address, name or namespace "
                             f"(written by an older ma-ray?)")
    return record
