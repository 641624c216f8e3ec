"""Writing into a run folder as a runtime failure sees it: a write that fails is one
``StorageError`` line naming the path and the cause (a full disk, a read-only folder), an
appended record is on disk whole or not at all, and the disk's write speed is measured for the
deadlines of saves (``control.faults.save_deadline_s``). No Ray, no torch.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from ma_ray.errors import MaRayError, message_line

LOW_SPACE_BYTES = 1 << 20  # below it, a failed write is put down to a full disk
PROBE_BYTES = 4 << 20  # what the write-speed probe writes: past a disk's small-write latency, quick everywhere


class StorageError(MaRayError, RuntimeError):
    """The run folder could not be written (a full disk, a read-only folder): one line naming the
    path and the cause. Not a fault a restart cures."""


def storage_error(path, exc: Exception) -> StorageError:
    """``exc``, raised writing ``path``, as one line. torch reports a full disk only as its
    writer's failure (``unexpected pos ...``), so the free space is looked at too."""
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else message_line(exc)
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    # An OSError says what it is; torch's writer errors do not.
    full = (exc.errno == errno.ENOSPC) if isinstance(exc, OSError) and exc.errno else (
        free is not None and free < LOW_SPACE_BYTES)
    if full:
        cause = "no space left on the device" + ("" if free is None else f" ({free // 1024} KiB free)")
    return StorageError(f"cannot write {path}: {cause}")


def append_whole(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a write cut short (a disk that fills up
    midway) is cut back off, so a reader never sees part of a record. Raises StorageError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise storage_error(path, exc) from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:  # one write() unless the disk refuses part of it
                view = view[os.write(fd, view):]
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise storage_error(path, exc) from None
    finally:
        os.close(fd)


def write_speed(folder: Path, nbytes: int = PROBE_BYTES) -> float:
    """Bytes per second a file written into ``folder`` reaches the disk at (written and synced,
    then removed). Raises StorageError when the folder cannot be written."""
    folder = Path(folder)
    probe = folder / f".write-speed-{os.getpid()}"
    block = os.urandom(1 << 20)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(probe, "wb") as f:
            for _ in range(max(1, nbytes // len(block))):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        elapsed = time.perf_counter() - t0
    except OSError as exc:
        raise storage_error(exc.filename or probe, exc) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return max(1, nbytes // len(block)) * len(block) / max(elapsed, 1e-6)
