"""Rendezvous of a CPU group: rank 0 serves a TCPStore, the other ranks find it through Ray.

Rank 0 opens a `torch.distributed.TCPStore` on a port the OS picks (no fixed ports: several
groups live in one process, and several jobs on one node), listening on this node's Ray address
only (loopback would not be reachable from other nodes; on an emulated cluster, whose members
all run on this machine, the caller passes loopback), and publishes `host:port` in Ray's
internal KV. TCPStore itself would listen on every interface, so rank 0 binds the socket and
hands it over (`master_listen_fd`). The other ranks poll the KV and connect. The store then only serves the process group's own handshake.

The KV key is scoped by job, group name and a digest of the membership and generation, so a
group re-created with other members never reads the address of an earlier incarnation; rank 0
deletes the key once everyone has connected (or the setup failed). All ranks then wait on the
store until every member arrived, so that only the rendezvous timeout governs late members.
"""

from __future__ import annotations

import hashlib
import socket
import time
from datetime import timedelta
from typing import Optional, Sequence

import ray
import torch.distributed as dist
from ray.experimental import internal_kv

KV_NAMESPACE = "ma_ray_comm"
_POLL_S = 0.02


def rendezvous_key(group_name: str, world_size: int, members: Optional[Sequence[str]],
                   generation: int) -> str:
    job = ray.get_runtime_context().get_job_id()
    digest = hashlib.sha1(
        repr((world_size, tuple(members) if members else None, generation)).encode()
    ).hexdigest()[:16]
    return f"{job}/{group_name}/{digest}"


def open_store(key: str, rank: int, world_size: int, deadline: float,
               group_name: str, host: str) -> dist.Store:
    """This rank's handle on the group's store; rank 0 serves it on `host` only. Bounded by
    `deadline` (a time.monotonic() value); raises TimeoutError naming the group when it passes."""
    if rank == 0:
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        # wait_for_workers=False: the workers can only connect once the address is published,
        # which happens after this constructor returns. The store owns the socket from here on.
        store = dist.TCPStore(host, listener.getsockname()[1], world_size, is_master=True,
                              timeout=_remaining(deadline), wait_for_workers=False,
                              master_listen_fd=listener.detach())
        internal_kv._internal_kv_put(key, f"{host}:{store.port}", overwrite=True,
                                     namespace=KV_NAMESPACE)
        return store
    address = _wait_for_address(key, deadline, group_name)
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host.strip("[]"), int(port), world_size, is_master=False,
                         timeout=_remaining(deadline))


def wait_for_all(store: dist.Store, rank: int, world_size: int, deadline: float) -> None:
    """Return once every rank has connected to the store, or raise at `deadline`.

    The process group's own handshake is bounded by the per-op timeout (gloo uses its context
    timeout for it), which is meant for ops, not for members that start a few seconds apart."""
    store.set(f"arrived/{rank}", b"1")
    store.wait([f"arrived/{r}" for r in range(world_size)], _remaining(deadline))


def retire(key: str) -> None:
    """Forget the published address (rank 0, once all ranks connected or setup failed)."""
    try:
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - best effort: a stale key is scoped by job and digest
        pass


def _wait_for_address(key: str, deadline: float, group_name: str) -> str:
    while True:
        value = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        if value is not None:
            return value.decode()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"rank 0 of group '{group_name}' did not publish its store "
                               f"address (is it creating the group with the same members?)")
        time.sleep(_POLL_S)


def _remaining(deadline: float) -> timedelta:
    # TCPStore treats a zero timeout as "none"; keep at least a little.
    return timedelta(seconds=max(deadline - time.monotonic(), 0.1))
