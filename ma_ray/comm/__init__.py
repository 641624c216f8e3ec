"""Collectives between worker actors, on top of `ray.util.collective`.

- backend.py: which backend a worker's groups use (`comm.backend`: auto, nccl, gloo, ray_nccl);
- groups.py: create/destroy named groups (on the chosen backend), the ops, their stream order;
- torch_backend.py: ma-ray's backend (one torch process group per group: NCCL on CUDA, gloo);
- rendezvous.py: how a group's members find rank 0's store (Ray's KV);
- handles.py: handles of non-blocking ops (gloo: a bounded host wait; NCCL: a stream wait);
- uneven.py: all-gather / reduce-scatter of slices with different first dims;
- errors.py: CommError / CommTimeoutError, naming group, worker and op.

In a worker actor: `backend = backend_for_device(cfg.comm.backend, device)` once, then
`create_group(name, members, rank, timeout_ms=..., backend=backend)`, the ops with `group=name`,
then `destroy_group(name)`.
"""

from ma_ray.comm.backend import RAY_NCCL, NcclSupport, backend_for_device, choose_backend
from ma_ray.comm.torch_backend import GLOO, NCCL, GroupOptions, TorchGroup, ensure_registered
from ma_ray.comm.errors import CommDeadlockError, CommError, CommTimeoutError
from ma_ray.comm.groups import (allgather, allreduce, barrier, broadcast,
                                create_group, destroy_group, has_group,
                                iallgather, iallreduce, ibarrier, ibroadcast, irecv,
                                ireducescatter, isend, rank, recv, reduce, reducescatter, send,
                                world_size)
from ma_ray.comm.handles import CommHandle, CompletedHandle
from ma_ray.comm.uneven import (allgather_uneven, exchange_sizes, iallgather_uneven,
                                ireducescatter_uneven, reducescatter_uneven)
from ray.util.collective.types import ReduceOp

__all__ = [
    "GLOO", "NCCL", "RAY_NCCL", "CommDeadlockError", "CommError", "CommHandle", "CommTimeoutError",
    "CompletedHandle", "GroupOptions", "NcclSupport", "ReduceOp", "TorchGroup", "allgather",
    "allgather_uneven", "allreduce", "backend_for_device", "barrier", "broadcast", "choose_backend",
    "create_group",
    "destroy_group", "ensure_registered", "exchange_sizes", "has_group", "iallgather",
    "iallgather_uneven", "iallreduce", "ibarrier", "ibroadcast", "irecv", "ireducescatter",
    "ireducescatter_uneven", "isend", "rank", "recv", "reduce", "reducescatter",
    "reducescatter_uneven", "send", "world_size",
]
