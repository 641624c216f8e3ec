"""What the runtime calls: named groups over lists of workers, and the ops on them.

A worker actor creates each group it belongs to with `create_group(name, members, rank)` (all
members call it concurrently, with the same `members`), uses the ops below with that name, and
`destroy_group(name)` when the split between pools changes. The backend is the caller's choice
(`backend.backend_for_device(cfg.comm.backend, device)`); without one, NCCL when this process sees
a GPU and cupy is installed, else the CPU backend of `cpu_backend.py`.

Blocking ops go through `ray.util.collective`'s public API. The non-blocking ones (`i*`) return
a handle with `.wait()`; on the CPU backend they are truly asynchronous and `.wait()` is bounded
by the group's timeout; on NCCL they are queued at call time (Ray's NCCL group queues the kernel on
its own CUDA stream, and the host goes on) and `.wait()` makes torch's current stream wait for
them on the device (`handles.QueuedHandle`), so compute posted between the two runs alongside.

Groups that share members must be created in the same order by every member: creation blocks
until all members arrive.

Stream order on GPU (`stream_ordered`, around every op): Ray's NCCL group makes its stream wait
for *cupy's* current stream before an op, and its streams are blocking CUDA streams. Nothing here
relies on the latter by accident: before an op, cupy's current stream is set to torch's current
stream, so the op waits for the torch work that produced its buffers; after it, torch's current
stream waits on an event recorded on the legacy default stream, which every blocking stream's
earlier work (the op) precedes, so the torch work that consumes the buffers waits for the op.
For a non-blocking op that second half waits for its handle's `.wait()`. The event is recorded
on the legacy default stream because Ray keeps its streams to itself; it fires once every
earlier op on a blocking stream is done, a superset of the one op (correct, and it can only
make a wait longer). Compute on streams with priorities then needs no host synchronisation to
stay race-free. On CPU tensors it does nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, List, Optional, Sequence

import ray.util.collective as col
from ray.util.collective.types import ReduceOp

from ma_ray.comm.backend import backend_for_device
from ma_ray.comm.cpu_backend import (BACKEND_NAME as CPU_BACKEND, DEFAULT_INIT_TIMEOUT_MS,
                                     DEFAULT_TIMEOUT_MS, CpuGlooGroup, GroupOptions,
                                     ensure_registered, stage_options, unstage_options)
from ma_ray.comm.handles import CompletedHandle, QueuedHandle


def _resolve_backend(backend: Optional[str]) -> str:
    if backend is None:
        import torch

        backend = backend_for_device("auto", "cuda" if torch.cuda.is_available() else "cpu")
    backend = backend.upper()
    # Ray's built-in GLOO is never what a caller asking for "gloo" wants (see cpu_backend.py).
    return CPU_BACKEND if backend in ("CPU", "GLOO", "TORCH_GLOO") else backend


def create_group(name: str, members: Sequence[str], rank: int, *,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 init_timeout_ms: int = DEFAULT_INIT_TIMEOUT_MS,
                 backend: Optional[str] = None, generation: int = 0, strict: bool = False,
                 listen_host: Optional[str] = None) -> str:
    """Join group `name` whose members are `members` (names by rank) as `members[rank]`.

    Blocks until every member has joined (at most `init_timeout_ms`). `timeout_ms` bounds every
    later op of the group (config `comm.synchronization_timeout_ms`; CPU backend only).
    `generation` must differ between two incarnations of a group with the same name and members
    whose lifetimes may overlap. `backend`: what `backend.backend_for_device` returned (NCCL or
    the CPU backend), "nccl", "cpu" / "gloo" (both mean this package's CPU backend), or None
    (comm.backend auto on this process's device). `strict`: the CPU backend's strict NCCL mode
    (`cpu_backend`), for CPU groups. `listen_host`: where a CPU group listens
    (`GroupOptions.listen_host`). Returns the backend used.
    """
    if not 0 <= rank < len(members):
        raise ValueError(f"group '{name}': rank {rank} outside {len(members)} members")
    backend = _resolve_backend(backend)
    if backend == CPU_BACKEND:
        ensure_registered()
        stage_options(name, GroupOptions(timeout_ms=timeout_ms, init_timeout_ms=init_timeout_ms,
                                         members=tuple(members), generation=generation,
                                         strict=strict, listen_host=listen_host))
    try:
        col.init_collective_group(len(members), rank, backend=backend, group_name=name)
    finally:
        unstage_options(name)  # construction consumed them, or it never happened
    return backend


def destroy_group(name: str) -> None:
    """Leave group `name` and release its resources in this process (no-op if absent)."""
    if col.is_group_initialized(name):
        col.destroy_collective_group(name)


def has_group(name: str) -> bool:
    return col.is_group_initialized(name)


def rank(name: str) -> int:
    return col.get_rank(name)


def world_size(name: str) -> int:
    return col.get_collective_group_size(name)


# -- blocking ops: ray.util.collective, argument order as there --------------------------------

def allreduce(tensor, group: str, op: ReduceOp = ReduceOp.SUM) -> None:
    with stream_ordered(tensor):
        col.allreduce(tensor, group_name=group, op=op)


def reduce(tensor, dst_rank: int, group: str, op: ReduceOp = ReduceOp.SUM) -> None:
    with stream_ordered(tensor):
        col.reduce(tensor, dst_rank=dst_rank, group_name=group, op=op)


def broadcast(tensor, src_rank: int, group: str) -> None:
    with stream_ordered(tensor):
        col.broadcast(tensor, src_rank=src_rank, group_name=group)


def allgather(outputs: List[Any], tensor, group: str) -> None:
    """Equal shapes on every rank; see uneven.allgather_uneven for ragged first dims."""
    with stream_ordered(outputs):
        col.allgather(outputs, tensor, group_name=group)


def reducescatter(output, inputs: List[Any], group: str, op: ReduceOp = ReduceOp.SUM) -> None:
    with stream_ordered(output):
        col.reducescatter(output, inputs, group_name=group, op=op)


def barrier(group: str) -> None:
    col.barrier(group_name=group)


def send(tensor, dst_rank: int, group: str) -> None:
    with stream_ordered(tensor):
        col.send(tensor, dst_rank, group_name=group)


def recv(tensor, src_rank: int, group: str) -> None:
    with stream_ordered(tensor):
        col.recv(tensor, src_rank, group_name=group)


# -- non-blocking ops ---------------------------------------------------------------------------

def iallreduce(tensor, group: str, op: ReduceOp = ReduceOp.SUM):
    g = _cpu(group)
    if g is None:
        return _queued(lambda: col.allreduce(tensor, group_name=group, op=op), tensor, "allreduce")
    return g.iallreduce(tensor, op)


def ibroadcast(tensor, src_rank: int, group: str):
    g = _cpu(group)
    if g is None:
        return _queued(lambda: col.broadcast(tensor, src_rank=src_rank, group_name=group), tensor, "broadcast")
    return g.ibroadcast(tensor, src_rank)


def iallgather(outputs: List[Any], tensor, group: str):
    g = _cpu(group)
    if g is None:
        return _queued(lambda: col.allgather(outputs, tensor, group_name=group), outputs, "allgather")
    return g.iallgather(outputs, tensor)


def ireducescatter(output, inputs: List[Any], group: str, op: ReduceOp = ReduceOp.SUM):
    g = _cpu(group)
    if g is None:
        return _queued(lambda: col.reducescatter(output, inputs, group_name=group, op=op), output, "reducescatter")
    return g.ireducescatter(output, inputs, op)


def ibarrier(group: str):
    g = _cpu(group)
    if g is None:
        return _done(barrier(group), "barrier")
    return g.ibarrier()


def isend(tensor, dst_rank: int, group: str, tag: int = 0):
    """`tag` tells apart messages in flight between the same pair (CPU backend; NCCL keeps
    them in order and ignores it)."""
    g = _cpu(group)
    if g is None:
        return _queued(lambda: col.send(tensor, dst_rank, group_name=group), tensor, "send")
    return g.isend(tensor, dst_rank, tag)


def irecv(tensor, src_rank: int, group: str, tag: int = 0):
    g = _cpu(group)
    if g is None:
        return _queued(lambda: col.recv(tensor, src_rank, group_name=group), tensor, "recv")
    return g.irecv(tensor, src_rank, tag)


@contextmanager
def stream_ordered(tensor):
    """Order a blocking op on ``tensor`` (or a list of tensors) against torch's current CUDA
    stream, both ways (see the module docstring); nothing for CPU tensors."""
    device = _cuda_device(tensor)
    if device is None:
        yield
        return
    with _after_torch_work(device):
        yield
    QueuedHandle(_op_done_event(device), device, "").wait()


def _queued(run, tensor, op: str):
    """Queue a non-blocking NCCL op (``run``) after the torch work that produced its buffers;
    its consumers wait at the handle's ``wait()``."""
    device = _cuda_device(tensor)
    if device is None:
        run()
        return CompletedHandle(None, op)
    with _after_torch_work(device):
        run()
    return QueuedHandle(_op_done_event(device), device, op, keep=tensor)


def _cuda_device(tensor):
    first = tensor[0] if isinstance(tensor, (list, tuple)) else tensor
    return first.device if getattr(first, "is_cuda", False) else None


@contextmanager
def _after_torch_work(device):
    """Ray's NCCL ops issued inside make their stream wait for cupy's current stream: make that
    torch's current stream."""
    import cupy
    import torch

    with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream, device.index):
        yield


def _op_done_event(device):
    """An event that fires once the ops issued so far on Ray's (blocking) streams are done."""
    import torch

    done = torch.cuda.Event()
    done.record(torch.cuda.default_stream(device))
    return done


def _cpu(group: str) -> Optional[CpuGlooGroup]:
    """The CPU backend's group object, or None for other backends."""
    g = col.get_group_handle(group)
    return g if isinstance(g, CpuGlooGroup) else None


def _done(_result: None, op: str) -> CompletedHandle:
    return CompletedHandle(None, op)
