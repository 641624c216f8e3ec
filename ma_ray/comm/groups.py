"""What the runtime calls: named groups over lists of workers, and the ops on them.

A worker actor creates each group it belongs to with `create_group(name, members, rank)` (all
members call it concurrently, with the same `members`), uses the ops below with that name, and
`destroy_group(name)` when the split between pools changes. The backend is the caller's choice
(`backend.backend_for_device(cfg.comm.backend, device)`: ``nccl``, ``gloo`` or ``ray_nccl``);
without one, ``comm.backend: auto`` on this process's device.

Blocking ops go through `ray.util.collective`'s public API. The non-blocking ones (`i*`) return a
handle with `.wait()` (`handles.py`). Groups that share members must be created in the same
order by every member: creation blocks until all members arrive.

**Stream order on a GPU** (one rule for every backend; docs/gpu.md says why): compute runs on
the worker's current stream (its pool's priority stream, `runtime.device.RealDevice`); every op
runs on a stream of its own, which waits for an event recorded on the current stream when the
op is issued, and the current stream waits for an event recorded on the op's stream after the
op, at the handle's `wait()` (at once for a blocking op). Nothing waits on the legacy default
stream, so no op waits for an unrelated one, and the host never waits for the device here.

* ``nccl`` and ``gloo`` groups (`torch_backend.TorchGroup`): torch's ProcessGroupNCCL does both
  halves itself (module docstring there); the ops below just call it.
* ``ray_nccl`` (Ray's NCCLGroup): Ray makes its NCCL stream wait for *cupy's* current stream,
  then copies inputs into its reduce-scatter staging buffer on *torch's* current stream after
  that wait was recorded, and copies its all-gather staging buffer out on torch's current stream
  with no wait for the NCCL stream at all; its streams are blocking ones, which order only
  against the legacy default stream, not a priority stream. So each op is issued with Ray's own
  stream for that op (its communicator's, made as the op would make it) current for both torch
  and cupy (`_ray_fenced`): Ray's wait, staging copies and NCCL call then run in order on that
  one stream. Its tensors are recorded on that stream (`Tensor.record_stream`), so the caching
  allocator does not hand their memory to other work before the op is done.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import ray.util.collective as col
from ray.util.collective.types import ReduceOp

from ma_ray.comm.backend import BACKENDS, RAY_NCCL, backend_for_device
from ma_ray.comm.handles import CompletedHandle, QueuedHandle
from ma_ray.comm.torch_backend import (BACKEND_NAME, DEFAULT_INIT_TIMEOUT_MS, DEFAULT_TIMEOUT_MS,
                                       GroupOptions, TorchGroup, ensure_registered, stage_options,
                                       unstage_options)


def _resolve_backend(backend: Optional[str]) -> str:
    """``nccl``, ``gloo`` or ``ray_nccl``: ``backend``, or comm.backend auto on this process."""
    if backend is None:
        import torch

        return backend_for_device("auto", "cuda" if torch.cuda.is_available() else "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)} "
                         f"(comm.backend, as backend.backend_for_device resolves it)")
    return backend


def create_group(name: str, members: Sequence[str], rank: int, *,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 init_timeout_ms: int = DEFAULT_INIT_TIMEOUT_MS,
                 backend: Optional[str] = None, generation: int = 0, strict: bool = False,
                 listen_host: Optional[str] = None) -> str:
    """Join group `name` whose members are `members` (names by rank) as `members[rank]`.

    Blocks until every member has joined (at most `init_timeout_ms`). `timeout_ms` bounds every
    later op of the group (config `comm.synchronization_timeout_ms`; on ``nccl`` through torch's
    watchdog; ``ray_nccl`` has no bound). `generation` must differ between two incarnations of a
    group with the same name and members whose lifetimes may overlap. `backend`: ``nccl``,
    ``gloo`` or ``ray_nccl`` (what `backend.backend_for_device` returns), or None (comm.backend
    auto on this process's device). `strict`: strict NCCL mode (`torch_backend`), for gloo
    groups. `listen_host`: where the group's store (and gloo) listens
    (`GroupOptions.listen_host`). Returns the backend used.
    """
    if not 0 <= rank < len(members):
        raise ValueError(f"group '{name}': rank {rank} outside {len(members)} members")
    backend = _resolve_backend(backend)
    if backend != RAY_NCCL:
        ensure_registered()
        stage_options(name, GroupOptions(timeout_ms=timeout_ms, init_timeout_ms=init_timeout_ms,
                                         members=tuple(members), generation=generation,
                                         strict=strict, listen_host=listen_host,
                                         process_group=backend))
    try:
        col.init_collective_group(len(members), rank, backend=BACKEND_NAME if backend != RAY_NCCL else "NCCL",
                                  group_name=name)
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
    _ordered(group, tensor, lambda: col.allreduce(tensor, group_name=group, op=op), "allreduce").wait()


def reduce(tensor, dst_rank: int, group: str, op: ReduceOp = ReduceOp.SUM) -> None:
    _ordered(group, tensor, lambda: col.reduce(tensor, dst_rank=dst_rank, group_name=group, op=op),
             "reduce").wait()


def broadcast(tensor, src_rank: int, group: str) -> None:
    _ordered(group, tensor, lambda: col.broadcast(tensor, src_rank=src_rank, group_name=group),
             "broadcast").wait()


def allgather(outputs: List[Any], tensor, group: str) -> None:
    """Equal shapes on every rank; see uneven.allgather_uneven for ragged first dims."""
    _ordered(group, [tensor, *outputs], lambda: col.allgather(outputs, tensor, group_name=group),
             "allgather").wait()


def reducescatter(output, inputs: List[Any], group: str, op: ReduceOp = ReduceOp.SUM) -> None:
    _ordered(group, [output, *inputs], lambda: col.reducescatter(output, inputs, group_name=group, op=op),
             "reducescatter").wait()


def barrier(group: str) -> None:
    col.barrier(group_name=group)


def send(tensor, dst_rank: int, group: str) -> None:
    _ordered(group, tensor, lambda: col.send(tensor, dst_rank, group_name=group), "send", peer=dst_rank).wait()


def recv(tensor, src_rank: int, group: str) -> None:
    _ordered(group, tensor, lambda: col.recv(tensor, src_rank, group_name=group), "recv", peer=src_rank).wait()


# -- non-blocking ops ---------------------------------------------------------------------------

def iallreduce(tensor, group: str, op: ReduceOp = ReduceOp.SUM):
    g = _torch_group(group)
    if g is None:
        return _ordered(group, tensor, lambda: col.allreduce(tensor, group_name=group, op=op), "allreduce")
    return g.iallreduce(tensor, op)


def ibroadcast(tensor, src_rank: int, group: str):
    g = _torch_group(group)
    if g is None:
        return _ordered(group, tensor, lambda: col.broadcast(tensor, src_rank=src_rank, group_name=group),
                        "broadcast")
    return g.ibroadcast(tensor, src_rank)


def iallgather(outputs: List[Any], tensor, group: str):
    g = _torch_group(group)
    if g is None:
        return _ordered(group, [tensor, *outputs], lambda: col.allgather(outputs, tensor, group_name=group),
                        "allgather")
    return g.iallgather(outputs, tensor)


def ireducescatter(output, inputs: List[Any], group: str, op: ReduceOp = ReduceOp.SUM):
    g = _torch_group(group)
    if g is None:
        return _ordered(group, [output, *inputs],
                        lambda: col.reducescatter(output, inputs, group_name=group, op=op), "reducescatter")
    return g.ireducescatter(output, inputs, op)


def ibarrier(group: str):
    g = _torch_group(group)
    if g is None:
        barrier(group)
        return CompletedHandle(None, "barrier")
    return g.ibarrier()


def isend(tensor, dst_rank: int, group: str, tag: int = 0):
    """`tag` tells apart messages in flight between the same pair (gloo; NCCL keeps them in
    order and ignores it)."""
    g = _torch_group(group)
    if g is None:
        return _ordered(group, tensor, lambda: col.send(tensor, dst_rank, group_name=group), "send", peer=dst_rank)
    return g.isend(tensor, dst_rank, tag)


def irecv(tensor, src_rank: int, group: str, tag: int = 0):
    g = _torch_group(group)
    if g is None:
        return _ordered(group, tensor, lambda: col.recv(tensor, src_rank, group_name=group), "recv", peer=src_rank)
    return g.irecv(tensor, src_rank, tag)


# -- Ray's NCCL group: its ops fenced on their own streams (module docstring) ------------------

def _ordered(group: str, tensors, run: Callable[[], None], op: str, peer: Optional[int] = None):
    """Issue ``run`` (one op of ``group`` on ``tensors``); a handle whose ``wait()`` orders the
    current stream after it. On a TorchGroup, or on CPU tensors, ``run`` is the whole story: a
    TorchGroup's blocking op has already made the current stream wait (NCCL) or the host (gloo)."""
    first = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
    if not getattr(first, "is_cuda", False) or _torch_group(group) is not None:
        run()
        return CompletedHandle(None, op)
    return _ray_fenced(col.get_group_handle(group), tensors, run, op, peer)


def _ray_fenced(g, tensors, run: Callable[[], None], op: str, peer: Optional[int]) -> QueuedHandle:
    import cupy
    import torch

    tensors = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
    device = tensors[0].device
    ray_stream = ray_op_stream(g, device, peer)
    op_stream = torch.cuda.ExternalStream(ray_stream.ptr, device=device)
    # torch: wait_stream records an event on the current stream and makes op_stream wait for it.
    op_stream.wait_stream(torch.cuda.current_stream(device))
    # With op_stream current for torch and cupy, Ray's _sync_streams waits on its own stream
    # (a no-op), and its staging buffers are allocated and copied on it, in order with NCCL.
    with torch.cuda.stream(op_stream), cupy.cuda.ExternalStream(ray_stream.ptr, device.index):
        run()
    for t in tensors:
        # torch: the caching allocator does not reuse a block recorded on a stream until the
        # work queued there when the block is freed has finished.
        t.record_stream(op_stream)
    done = torch.cuda.Event()
    done.record(op_stream)
    return QueuedHandle(done, device, op)


def ray_op_stream(g, device, peer: Optional[int] = None):
    """The cupy stream Ray's NCCLGroup ``g`` runs an op on ``device`` with: its collective
    communicator's, or with ``peer`` the pair's. Made here if new, exactly as the op would make
    it (Ray 2.60's private communicator caches; backend.RAY_NCCL_INTERNALS checks they exist).
    One GPU per process: Ray's default peer GPU index is 0, as in ``col.send``."""
    from ray.util.collective.collective_group import nccl_collective_group as ng

    index = device.index
    if peer is None:
        key = ng._get_comm_key_from_devices([index])
        g._get_nccl_collective_communicator(key, [index])
    else:
        key = ng._get_comm_key_send_recv(g.rank, index, peer, 0)
        g._get_nccl_p2p_communicator(key, index, peer, 0)
    return g._dev_streams_map[key][0]


def _torch_group(group: str) -> Optional[TorchGroup]:
    """The TorchGroup behind ``group``, or None for Ray's NCCL group."""
    g = col.get_group_handle(group)
    return g if isinstance(g, TorchGroup) else None
