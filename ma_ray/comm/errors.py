"""Errors of the collectives layer.

One family, so the runtime can catch every communication failure with one `except`, and every
message names the group, this worker (name and rank) and the operation: a stall in a 16-worker
job must be traceable from the message alone, without reading the other workers' logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class GroupIdentity:
    """Who is talking: the group, this worker's rank and name, and the members' names if known."""

    group: str
    rank: int
    world_size: int
    worker: str
    members: Optional[Sequence[str]] = None

    def peer(self, rank: int) -> str:
        """'rank 3' or 'rank 3 (attn-3)' when the members' names are known."""
        if self.members is not None and 0 <= rank < len(self.members):
            return f"rank {rank} ({self.members[rank]})"
        return f"rank {rank}"

    def where(self) -> str:
        return (f"in group '{self.group}' "
                f"(worker {self.worker}, rank {self.rank} of {self.world_size})")


class CommError(RuntimeError):
    """A collective or point-to-point operation failed (dead peer, broken group, bad setup).

    `group`, `rank`, `worker` and `op` repeat what the message says, for code that wants to
    react (e.g. destroy and rebuild the named group).
    """

    def __init__(self, message: str, *, group: Optional[str] = None, rank: Optional[int] = None,
                 worker: Optional[str] = None, op: Optional[str] = None):
        super().__init__(message)
        self.group = group
        self.rank = rank
        self.worker = worker
        self.op = op

    def __reduce__(self):
        # Errors cross process boundaries (Ray ships them to the caller); keyword-only fields
        # would be lost by the default pickling of exceptions.
        return (_rebuild, (type(self), self.args[0], self.group, self.rank, self.worker, self.op))


class CommTimeoutError(CommError):
    """An operation did not complete within the group's per-op timeout (stalled or dead peer)."""


class CommDeadlockError(CommError):
    """Strict NCCL mode: an operation waited past the timeout for a peer that is blocked in
    another operation; the message names both."""


def _rebuild(cls, message, group, rank, worker, op):
    return cls(message, group=group, rank=rank, worker=worker, op=op)


def op_failed(ident: GroupIdentity, op: str, cause: BaseException, timeout_ms: int,
              *, timed_out: bool) -> CommError:
    """The error to raise when `op` failed; the group cannot be trusted after either kind."""
    fields = dict(group=ident.group, rank=ident.rank, worker=ident.worker, op=op)
    if timed_out:
        return CommTimeoutError(
            f"comm timeout after {timeout_ms} ms: {op} {ident.where()}; a peer stalled or died, "
            f"destroy and re-create the group ({cause})", **fields)
    return CommError(f"comm failure: {op} {ident.where()}: {cause}; "
                     f"destroy and re-create the group", **fields)


def group_broken(ident: GroupIdentity, op: str, earlier: CommError) -> CommError:
    """The error for any op on a group whose earlier op failed: fail fast instead of
    waiting a second time on peers that are known to be out of step."""
    return CommError(f"comm failure: {op} {ident.where()}: the group is broken by an earlier "
                     f"failure ({earlier.op}); destroy and re-create it",
                     group=ident.group, rank=ident.rank, worker=ident.worker, op=op)
