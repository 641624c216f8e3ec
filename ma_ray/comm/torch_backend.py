"""ma-ray's backend of ray.util.collective: every group owns its own torch process group,
``ProcessGroupNCCL`` on a CUDA worker, ``ProcessGroupGloo`` otherwise.

One class for both devices, so a GPU runs the code the CPU suite tests. Ray's built-in GLOO
backend builds all groups on the process's default torch process group (a second group over a
subset of the actors returns wrong sums, its send/recv use default-group ranks, its timeout
bounds only the rendezvous), and Ray's NCCL group has no op timeout and orders its buffer copies
only by blocking-stream semantics. Here every group gets its own process group over a
``PrefixStore`` of its own ``TCPStore`` (see rendezvous.py): groups of any membership coexist in
one process, ranks are group ranks, each op is bounded by the group's timeout, and destroying a
group releases its process group and store.

What each process group guarantees (torch's, not ours):

* gloo: ops run on gloo's threads; ``CommHandle.wait()`` blocks the host for at most the group's
  timeout (``Work.wait(timeout)``).
* NCCL: an op makes its NCCL stream wait for the issuing thread's current CUDA stream
  (ProcessGroupNCCL's ``syncStreams``), stages and copies on its own stream, records its end
  event there, and ``Work.wait()`` without a timeout makes the current stream wait for that event
  without blocking the host; the caching allocator keeps its tensors alive until the op is done
  (``recordStream``). A timeout passed to ``Work.wait`` would make the host spin until the op
  ends, so NCCL handles never pass one: the group's timeout goes to the process group's watchdog,
  which aborts the communicator (by torch's default, ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, it
  also ends the process) when an op has not finished that long after it was issued.

**Strict NCCL mode** (``GroupOptions.strict``; config ``comm.strict_nccl``, or
``MA_RAY_STRICT_NCCL=1`` for a whole run) makes a gloo group as unforgiving as NCCL, so that a
schedule that would hang on GPUs fails here, in seconds, with the cycle spelled out (on an NCCL
group, NCCL itself is the strict one and the option does nothing):

* NCCL runs each communicator's ops in issue order on one stream (one communicator for a
  group's collectives; for send/recv one per pair, or the group's own), and the roles compute
  between any two of their ops; so every op of a worker runs to completion in issue order, whatever its pair or group.
  Here every op completes before the call returns.
* A send completes only when the peer reaches the matching receive, with the same element
  count and dtype (a mismatch is an error on both sides); nothing is buffered. Each send waits
  for its receiver's "ready" (the receive's count and dtype) before it moves the payload.
* A wait that passes the group's timeout is a **deadlock** (``CommDeadlockError``): the message
  names what this worker's op waits for and what its peers' current ops are, read from where
  every strict worker publishes its current op (its groups' stores).

The class plugs into ``ray.util.collective`` through ``register_collective_backend``, so
``ray.util.collective.allreduce(t, group_name=...)`` etc. dispatch here. Ray constructs custom
backends with ``(world_size, rank, group_name)`` only, so per-group options (process group kind,
device, timeout, member names) are staged in this process by ``stage_options`` just before
``init_collective_group``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.util.collective import register_collective_backend
from ray.util.collective.collective_group.base_collective_group import BaseGroup
from ray.util.collective.types import (AllGatherOptions, AllReduceOptions, BarrierOptions,
                                       BroadcastOptions, RecvOptions, ReduceOp, ReduceOptions,
                                       ReduceScatterOptions, SendOptions)
# torch.distributed does not re-export AllgatherOptions; its c10d module does.
from torch.distributed.distributed_c10d import AllgatherOptions as _TorchAllgatherOptions

from ma_ray.comm import rendezvous
from ma_ray.comm.errors import CommDeadlockError, CommError, GroupIdentity, group_broken
from ma_ray.comm.handles import CommHandle, CompletedHandle, FailedLaunch

BACKEND_NAME = "MA_TORCH"
# The process group a TorchGroup owns: comm.backend's values for it (comm/backend.py).
NCCL, GLOO = "nccl", "gloo"
DEFAULT_TIMEOUT_MS = 5000
DEFAULT_INIT_TIMEOUT_MS = 60000
STRICT_ENV = "MA_RAY_STRICT_NCCL"  # "1": every group of the run is strict

# Strict mode's handshake of one send/recv: the receiver's ready (its count and dtype), the
# sender's verdict, then the payload; each on its own tag, so the three never cross.
_READY_TAG, _VERDICT_TAG, _PAYLOAD_TAG = 1_000_001, 1_000_002, 1_000_003
_DTYPE_CODES = {dtype: code for code, dtype in enumerate(
    (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
     torch.int16, torch.int32, torch.int64, torch.bool))}
_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

_TORCH_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.PRODUCT: dist.ReduceOp.PRODUCT,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
}


@dataclass(frozen=True)
class GroupOptions:
    """Per-group settings Ray's constructor call cannot carry.

    timeout_ms: bound on every op's wait (config `comm.synchronization_timeout_ms`).
    init_timeout_ms: bound on the rendezvous (all members must arrive; actors start slowly).
    members: the members' names, by rank, for error messages.
    worker_name: this worker's name in error messages (default: members[rank] or actor name).
    generation: distinguishes re-creations of the same group with the same members.
    strict: strict NCCL mode (gloo groups only; see the module docstring).
    process_group: "gloo" or "nccl" (``ProcessGroupNCCL``, on ``device``).
    device: the CUDA device of an NCCL group (default: this process's current one).
    listen_host: the address the group's store and gloo's pairs listen on (default: this node's
    Ray address); loopback when every member is on this machine (an emulated cluster).
    """

    timeout_ms: int = DEFAULT_TIMEOUT_MS
    init_timeout_ms: int = DEFAULT_INIT_TIMEOUT_MS
    members: Optional[Tuple[str, ...]] = None
    worker_name: Optional[str] = None
    generation: int = 0
    strict: bool = False
    listen_host: Optional[str] = None
    process_group: str = GLOO
    device: Optional[torch.device] = None


def strict_requested(setting: bool) -> bool:
    """Strict NCCL mode for a run: the config's ``comm.strict_nccl`` or ``MA_RAY_STRICT_NCCL=1``."""
    return bool(setting) or os.environ.get(STRICT_ENV, "") == "1"


_staged: dict = {}
_staged_lock = threading.Lock()
_registered = False
_strict_groups: List["TorchGroup"] = []  # this process's strict groups, where it publishes its op


def stage_options(group_name: str, options: GroupOptions) -> None:
    """Options for the next construction of `group_name` in this process."""
    with _staged_lock:
        _staged[group_name] = options


def unstage_options(group_name: str) -> None:
    with _staged_lock:
        _staged.pop(group_name, None)


def _take_options(group_name: str) -> GroupOptions:
    with _staged_lock:
        return _staged.pop(group_name, None) or GroupOptions()


def ensure_registered() -> None:
    """Register the backend with ray.util.collective in this process; idempotent.

    Call it on the driver and in every actor before any group of this backend is created
    (`groups.create_group` calls it for you)."""
    global _registered
    if _registered:
        return
    with _staged_lock:
        if _registered:
            return
        try:
            register_collective_backend(BACKEND_NAME, TorchGroup)
        except ValueError:
            pass  # registered earlier in this process (e.g. this module was re-imported)
        _registered = True


class TorchGroup(BaseGroup):
    """One collective group with its own TCPStore and process group: NCCL or gloo, as staged."""

    def __init__(self, world_size: int, rank: int, group_name: str, *_ignored: Any):
        super().__init__(world_size, rank, group_name)
        opts = _take_options(group_name)
        if opts.members is not None and len(opts.members) != world_size:
            raise ValueError(f"group '{group_name}': {len(opts.members)} member names for "
                             f"world size {world_size}")
        if opts.process_group not in (NCCL, GLOO):
            raise ValueError(f"group '{group_name}': process group {opts.process_group!r}, not nccl or gloo")
        self._kind = opts.process_group
        self._device = (opts.device if opts.device is not None else torch.device("cuda", torch.cuda.current_device())
                        ) if self._kind == NCCL else torch.device("cpu")
        self._timeout_ms = int(opts.timeout_ms)
        self._ident = GroupIdentity(group_name, rank, world_size,
                                    opts.worker_name or _default_worker_name(opts.members, rank),
                                    opts.members)
        self._broken: Optional[CommError] = None
        self._store: Optional[dist.Store] = None
        self._pg = None  # torch's ProcessGroupNCCL or ProcessGroupGloo
        self._store_address: Optional[Tuple[str, int]] = None
        self._strict = opts.strict and self._kind == GLOO
        self._heads: Optional[dist.Store] = None  # strict: every member's current op
        self._ops = 0  # strict: ops issued, numbering them in messages
        self._connect(opts)
        if self._strict:
            self._heads = dist.PrefixStore(f"{self.group_name}/heads/", self._store)
            _strict_groups.append(self)

    def _connect(self, opts: GroupOptions) -> None:
        key = rendezvous.rendezvous_key(self.group_name, self.world_size, opts.members,
                                        opts.generation)
        deadline = time.monotonic() + opts.init_timeout_ms / 1000.0
        host = opts.listen_host or ray.util.get_node_ip_address()
        try:
            store = rendezvous.open_store(key, self.rank, self.world_size, deadline,
                                          self.group_name, host)
            self._store_address = (store.host, store.port)
            prefixed = dist.PrefixStore(f"{self.group_name}/", store)
            rendezvous.wait_for_all(prefixed, self.rank, self.world_size, deadline)
            self._pg = (self._nccl_process_group(prefixed) if self._kind == NCCL
                        else self._gloo_process_group(prefixed, host))
            self._store = store
        except Exception as exc:  # noqa: BLE001 - re-raised with the group named
            raise CommError(
                f"comm setup failed: group '{self.group_name}' (worker {self._ident.worker}, "
                f"rank {self.rank} of {self.world_size}) did not connect within "
                f"{opts.init_timeout_ms} ms: {exc}",
                group=self.group_name, rank=self.rank, worker=self._ident.worker,
                op="create") from exc
        finally:
            if self.rank == 0:
                # Everyone has read the address once the process group exists (its handshake
                # needs all ranks); after a failure the address is useless.
                rendezvous.retire(key)

    def _gloo_process_group(self, store: dist.Store, host: str):
        pg_opts = process_group_class(GLOO)._Options()
        # The context timeout bounds every transport step inside gloo, so an op abandoned
        # by Work.wait(timeout) also ends by itself and its worker thread is freed.
        pg_opts._timeout = self._td()
        # Bind gloo to the address chosen above: hostname resolution could pick any.
        pg_opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, self.rank, self.world_size, pg_opts)

    def _nccl_process_group(self, store: dist.Store):
        cls = process_group_class(NCCL)
        pg_opts = cls.Options()
        # The watchdog's bound on every op, counted from its issue (NCCL waits take none).
        pg_opts._timeout = self._td()
        pg_opts.group_name = self.group_name  # names the group in the watchdog's reports
        pg = cls(store, self.rank, self.world_size, pg_opts)
        # The communicator is made now, while every member is here in create_group, not at the
        # first op, where the members may be anywhere in their schedules; this also binds the
        # group to the worker's device.
        pg.eager_connect_single_device(self._device)
        return pg

    # -- identity ---------------------------------------------------------------------------

    @classmethod
    def backend(cls) -> str:
        return BACKEND_NAME

    @classmethod
    def check_backend_availability(cls) -> bool:
        return dist.is_available()

    @property
    def timeout_ms(self) -> int:
        return self._timeout_ms

    @property
    def process_group(self) -> str:
        """"nccl" or "gloo": which torch process group this group owns."""
        return self._kind

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def identity(self) -> GroupIdentity:
        return self._ident

    @property
    def store_address(self) -> Optional[Tuple[str, int]]:
        """(host, port) of the group's TCPStore (served by rank 0); for diagnostics."""
        return self._store_address

    @property
    def broken(self) -> Optional[CommError]:
        """The failure that broke the group, or None while it is usable."""
        return self._broken

    def destroy_group(self) -> None:
        """Release the process group and the store (rank 0 stops serving it)."""
        broken = self._broken is not None
        if not broken:
            self._broken = CommError(f"group '{self.group_name}' was destroyed",
                                     group=self.group_name, rank=self.rank,
                                     worker=self._ident.worker, op="destroy")
        if self._kind == NCCL and self._pg is not None:
            try:
                # shutdown lets ops still queued on the device finish (a stuck one is ended by
                # the watchdog); after a failure the peers are out of step: abort at once.
                self._pg.abort() if broken else self._pg.shutdown()
            except Exception:  # noqa: BLE001 - releasing must not fail on a communicator already gone
                pass
        self._pg = None
        self._store = None
        if self in _strict_groups:
            _strict_groups.remove(self)

    # -- non-blocking ops: torch tensors in, CommHandle out ----------------------------------

    def iallreduce(self, tensor: torch.Tensor, op: Any = ReduceOp.SUM) -> CommHandle:
        o = dist.AllreduceOptions()
        o.reduceOp = _torch_op(op)
        o.timeout = self._td()
        return self._issue(f"allreduce({_op_name(op)})", lambda pg: pg.allreduce([tensor], o))

    def ireduce(self, tensor: torch.Tensor, dst_rank: int, op: Any = ReduceOp.SUM) -> CommHandle:
        o = dist.ReduceOptions()
        o.reduceOp = _torch_op(op)
        o.rootRank = dst_rank
        o.rootTensor = 0
        o.timeout = self._td()
        return self._issue(f"reduce({_op_name(op)}) to {self._ident.peer(dst_rank)}",
                           lambda pg: pg.reduce([tensor], o))

    def ibroadcast(self, tensor: torch.Tensor, src_rank: int) -> CommHandle:
        o = dist.BroadcastOptions()
        o.rootRank = src_rank
        o.rootTensor = 0
        o.timeout = self._td()
        return self._issue(f"broadcast from {self._ident.peer(src_rank)}",
                           lambda pg: pg.broadcast([tensor], o))

    def iallgather(self, outputs: List[torch.Tensor], tensor: torch.Tensor) -> CommHandle:
        if len(outputs) != self.world_size:
            raise ValueError(f"allgather in group '{self.group_name}': {len(outputs)} outputs "
                             f"for world size {self.world_size}")
        o = _TorchAllgatherOptions()
        o.timeout = self._td()
        return self._issue("allgather", lambda pg: pg.allgather([list(outputs)], [tensor], o))

    def ireducescatter(self, output: torch.Tensor, inputs: List[torch.Tensor],
                       op: Any = ReduceOp.SUM) -> CommHandle:
        if len(inputs) != self.world_size:
            raise ValueError(f"reducescatter in group '{self.group_name}': {len(inputs)} inputs "
                             f"for world size {self.world_size}")
        reduce = _LOCAL_REDUCE.get(_torch_op(op)) if self._kind == GLOO else None
        if reduce is None:
            o = dist.ReduceScatterOptions()
            o.reduceOp = _torch_op(op)
            o.timeout = self._td()
            return self._issue(f"reducescatter({_op_name(op)})",
                               lambda pg: pg.reduce_scatter([output], [list(inputs)], o))
        # gloo's reduce_scatter moves about as much as an all-reduce of the whole input (measured
        # here, 2 ranks, 1 MiB: ~3.5 ms against ~1.2 ms): an all-to-all hands every rank the other
        # ranks' chunks for it, which it then reduces itself, in rank order (deterministic).
        sent = torch.stack([t.reshape(output.shape) for t in inputs])
        got = torch.empty_like(sent)
        o = dist.AllToAllOptions()
        o.timeout = self._td()

        def finish() -> None:
            output.copy_(reduce(got))

        return self._issue(f"reducescatter({_op_name(op)})",
                           lambda pg: pg.alltoall_base(got, sent, [], [], o), finish=finish)

    def ibarrier(self) -> CommHandle:
        o = dist.BarrierOptions()
        o.timeout = self._td()
        return self._issue("barrier", lambda pg: pg.barrier(o))

    def isend(self, tensor: torch.Tensor, dst_rank: int, tag: int = 0) -> CommHandle:
        self._check_peer(dst_rank, "send to")
        if self._strict:
            return self._strict_send(tensor, dst_rank)
        return self._issue(f"send to {self._ident.peer(dst_rank)}",
                           lambda pg: pg.send([tensor], dst_rank, tag), point_to_point=True)

    def irecv(self, tensor: torch.Tensor, src_rank: int, tag: int = 0) -> CommHandle:
        self._check_peer(src_rank, "recv from")
        if self._strict:
            return self._strict_recv(tensor, src_rank)
        return self._issue(f"recv from {self._ident.peer(src_rank)}",
                           lambda pg: pg.recv([tensor], src_rank, tag), point_to_point=True)

    # -- BaseGroup interface: ray.util.collective wraps tensors in lists ---------------------

    def allreduce(self, tensors, allreduce_options=AllReduceOptions()) -> None:
        self.iallreduce(_one(tensors), allreduce_options.reduceOp).wait()

    def barrier(self, barrier_options=BarrierOptions()) -> None:
        self.ibarrier().wait()

    def reduce(self, tensors, reduce_options=ReduceOptions()) -> None:
        t = _one(tensors)
        # ray.util.collective promises that only the root's tensor changes.
        buf = t if self.rank == reduce_options.root_rank else t.detach().clone()
        self.ireduce(buf, reduce_options.root_rank, reduce_options.reduceOp).wait()

    def allgather(self, tensor_lists, tensors, allgather_options=AllGatherOptions()) -> None:
        self.iallgather(_list(tensor_lists), _one(tensors)).wait()

    def broadcast(self, tensors, broadcast_options=BroadcastOptions()) -> None:
        self.ibroadcast(_one(tensors), broadcast_options.root_rank).wait()

    def reducescatter(self, tensors, tensor_lists,
                      reducescatter_options=ReduceScatterOptions()) -> None:
        self.ireducescatter(_one(tensors), _list(tensor_lists),
                            reducescatter_options.reduceOp).wait()

    def send(self, tensors, send_options: SendOptions) -> None:
        self.isend(_one(tensors), send_options.dst_rank).wait()

    def recv(self, tensors, recv_options: RecvOptions) -> None:
        self.irecv(_one(tensors), recv_options.src_rank).wait()

    # -- internals ---------------------------------------------------------------------------

    def _td(self) -> timedelta:
        return timedelta(milliseconds=self._timeout_ms)

    def _check_peer(self, peer: int, verb: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"{verb} rank {peer} in group '{self.group_name}' (rank "
                             f"{self.rank} of {self.world_size}): not another member")

    def _issue(self, op: str, launch: Callable[[Any], Any],
               finish: Optional[Callable[[], Any]] = None, *, point_to_point: bool = False):
        if self._broken is not None:
            raise group_broken(self._ident, op, self._broken)
        pg = self._pg
        if self._strict:
            self._ops += 1
            op = f"{op} (op #{self._ops})"
            _publish(f"{op} in group '{self.group_name}', waiting for every member")
        if point_to_point:
            work = _launch_on_transport(launch, pg)
        else:
            try:
                work = launch(pg)
            except Exception as exc:  # noqa: BLE001 - bad arguments; the group stays usable
                raise CommError(f"comm failure: {op} {self._ident.where()}: {exc}",
                                group=self.group_name, rank=self.rank, worker=self._ident.worker,
                                op=op) from exc
        handle = CommHandle(work, ident=self._ident, op=op, timeout_ms=self._timeout_ms,
                            on_failure=self._mark_broken, finish=finish, on_device=self._kind == NCCL)
        if not self._strict:
            return handle
        # Blocking, in issue order: what NCCL's blocking streams make of every op.
        value = self._strict_wait(handle, waiting_for=range(self.world_size))
        _publish("idle")
        return CompletedHandle(value, op)

    # -- strict NCCL mode ---------------------------------------------------------------------

    def _strict_send(self, tensor: torch.Tensor, dst: int) -> CompletedHandle:
        self._ops += 1
        op = f"send #{self._ops} to {self._ident.peer(dst)} ({tensor.numel()} x {_dtype_name(tensor.dtype)})"
        _publish(f"{op} in group '{self.group_name}', waiting for {self._ident.peer(dst)} to post the matching receive")
        ready = torch.empty(2, dtype=torch.int64)
        self._handshake(op, dst, lambda pg: pg.recv([ready], dst, _READY_TAG))
        count, code = ready.tolist()
        ok = count == tensor.numel() and code == _DTYPE_CODES.get(tensor.dtype, -1)
        verdict = torch.tensor([1 if ok else 0], dtype=torch.int64)
        self._handshake(op, dst, lambda pg: pg.send([verdict], dst, _VERDICT_TAG))
        if not ok:
            raise self._mismatch(op, f"the matching receive expects {count} x {_dtype_name(_DTYPES.get(code))}")
        self._handshake(op, dst, lambda pg: pg.send([tensor.contiguous()], dst, _PAYLOAD_TAG))
        _publish("idle")
        return CompletedHandle(None, op)

    def _strict_recv(self, tensor: torch.Tensor, src: int) -> CompletedHandle:
        self._ops += 1
        op = f"recv #{self._ops} from {self._ident.peer(src)} ({tensor.numel()} x {_dtype_name(tensor.dtype)})"
        _publish(f"{op} in group '{self.group_name}', waiting for {self._ident.peer(src)} to post the matching send")
        ready = torch.tensor([tensor.numel(), _DTYPE_CODES.get(tensor.dtype, -1)], dtype=torch.int64)
        self._handshake(op, src, lambda pg: pg.send([ready], src, _READY_TAG))
        verdict = torch.empty(1, dtype=torch.int64)
        self._handshake(op, src, lambda pg: pg.recv([verdict], src, _VERDICT_TAG))
        if not int(verdict):
            raise self._mismatch(op, "the matching send has another element count or dtype")
        landing = tensor if tensor.is_contiguous() else torch.empty_like(tensor, memory_format=torch.contiguous_format)
        self._handshake(op, src, lambda pg: pg.recv([landing], src, _PAYLOAD_TAG))
        if landing is not tensor:
            tensor.copy_(landing)
        _publish("idle")
        return CompletedHandle(None, op)

    def _handshake(self, op: str, peer: int, launch: Callable[[Any], Any]) -> None:
        """One message of a strict send/recv with ``peer``, waited for at once."""
        if self._broken is not None:
            raise group_broken(self._ident, op, self._broken)
        handle = CommHandle(_launch_on_transport(launch, self._pg), ident=self._ident, op=op,
                            timeout_ms=self._timeout_ms, on_failure=self._mark_broken)
        self._strict_wait(handle, waiting_for=[peer])

    def _strict_wait(self, handle: CommHandle, waiting_for) -> Any:
        """``handle.wait()``; past the timeout, a deadlock naming what each peer it waits for
        is doing. gloo closes its connections on a timeout, so the peers of the member that
        timed out first see them closed, a little before their own timeout: the member that
        timed out says so in the group's store (``_DEADLOCK``), and a peer whose connection
        closes reports the same deadlock when it finds that there within the timeout."""
        try:
            return handle.wait()
        except CommError as exc:
            if not handle.timed_out and not self._peer_saw_deadlock(waiting_for):
                raise
            heads = "; ".join(f"{self._ident.peer(r)} is in {self._head_of(r)}"
                              for r in waiting_for if r != self.rank)
            error = CommDeadlockError(
                f"deadlock (strict NCCL mode): worker {self._ident.worker} has waited "
                f"{self._timeout_ms} ms in {handle.op} in group '{self.group_name}'; {heads}",
                group=self.group_name, rank=self.rank, worker=self._ident.worker, op=handle.op)
            self._broken = error
            if handle.timed_out and self._heads is not None:
                try:
                    self._heads.set(_DEADLOCK, str(self.rank))
                except Exception:  # noqa: BLE001 - the report must not fail on a closing store
                    pass
            raise error from exc

    def _peer_saw_deadlock(self, peers) -> bool:
        """Whether a member of ``peers`` reports a deadlock in this group's store within the
        timeout (a connection it closed by timing out is not a crash)."""
        if self._heads is None:
            return False
        deadline = time.monotonic() + self._timeout_ms / 1000
        while time.monotonic() < deadline:
            try:
                if self._heads.check([_DEADLOCK]):
                    return int(self._heads.get(_DEADLOCK).decode()) in set(peers)
            except Exception:  # noqa: BLE001 - a dead member's store: no verdict
                return False
            time.sleep(0.02)
        return False

    def _head_of(self, rank: int) -> str:
        key = str(rank)
        try:
            if self._heads is not None and self._heads.check([key]):
                return self._heads.get(key).decode()
        except Exception:  # noqa: BLE001 - the report must not fail on a dead peer's store
            pass
        return "an unknown op (it published none)"

    def _mismatch(self, op: str, why: str) -> CommError:
        error = CommError(f"comm failure (strict NCCL mode): {op} {self._ident.where()}: {why}",
                          group=self.group_name, rank=self.rank, worker=self._ident.worker, op=op)
        self._broken = error
        return error

    def _mark_broken(self, error: CommError) -> None:
        # After a timeout or a dead peer the ranks are out of step (some finished the op,
        # some did not): any later op could pair with the wrong message.
        if self._broken is None:
            self._broken = error


def process_group_class(kind: str):
    """torch's class of the process group of ``kind`` ("nccl" or "gloo"); a ConfigError naming
    comm.backend where this torch has none (CPU wheels have no ``ProcessGroupNCCL``)."""
    from ma_ray.config import ConfigError

    name = {NCCL: "ProcessGroupNCCL", GLOO: "ProcessGroupGloo"}[kind]
    cls = getattr(dist, name, None) if dist.is_available() else None
    if cls is None:
        raise ConfigError(f"comm.backend: {kind} needs torch.distributed.{name}, and torch "
                          f"{torch.__version__} was built without it")
    return cls


# Reductions over the leading (rank) dimension of a reduce-scatter's received chunks.
_LOCAL_REDUCE = {
    dist.ReduceOp.SUM: lambda t: t.sum(dim=0),
    dist.ReduceOp.PRODUCT: lambda t: t.prod(dim=0),
    dist.ReduceOp.MIN: lambda t: t.amin(dim=0),
    dist.ReduceOp.MAX: lambda t: t.amax(dim=0),
}


def _launch_on_transport(launch: Callable[[Any], Any], pg):
    """``launch(pg)`` for a gloo send or recv, which touches the peer's connection at once: a
    failure there is the peer's (a closed connection), not bad arguments, so it is deferred to
    ``wait()`` and reported there like any transfer that broke."""
    try:
        return launch(pg)
    except Exception as exc:  # noqa: BLE001 - reported by CommHandle.wait with the group named
        return FailedLaunch(exc)


_DEADLOCK = "deadlock"  # heads-store key: the rank that timed out in a strict op


def _publish(head: str) -> None:
    """This worker's current op, in every strict group it belongs to (read by deadlock reports)."""
    for group in list(_strict_groups):
        try:
            group._heads.set(str(group.rank), head)
        except Exception:  # noqa: BLE001 - a group whose store is gone has nobody to tell
            pass


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "an unknown dtype"


def _default_worker_name(members: Optional[Sequence[str]], rank: int) -> str:
    if members is not None:
        return members[rank]
    try:
        ctx = ray.get_runtime_context()
        name = ctx.get_actor_name()
        if name:
            return name
        actor_id = ctx.get_actor_id()
        if actor_id:
            return f"actor {actor_id[:12]}"
    except Exception:  # noqa: BLE001 - naming must never break group creation
        pass
    return f"pid {os.getpid()}"


def _torch_op(op: Any):
    return _TORCH_OPS.get(op, op)


def _op_name(op: Any) -> str:
    return op.name if isinstance(op, ReduceOp) else str(op).rsplit(".", 1)[-1]


def _as_torch(t: Any) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(t, np.ndarray):
        return torch.from_numpy(t)  # shares memory, so in-place results reach the caller
    raise TypeError(f"{BACKEND_NAME} takes torch.Tensor or numpy.ndarray, got {type(t)}")


def _one(tensors: Any) -> torch.Tensor:
    if isinstance(tensors, (list, tuple)):
        if len(tensors) != 1:
            raise ValueError(f"{BACKEND_NAME} drives one tensor per process, got {len(tensors)}")
        tensors = tensors[0]
    return _as_torch(tensors)


def _list(tensor_lists: Any) -> List[torch.Tensor]:
    if len(tensor_lists) == 1 and isinstance(tensor_lists[0], (list, tuple)):
        tensor_lists = tensor_lists[0]
    return [_as_torch(t) for t in tensor_lists]
