"""Gradient compression's error-feedback residuals as training state, layout-independent on disk
and across a rebalance. Two kinds: a node's, of the replicated gradients, and, with replicas, a
worker's of its sharded gradients across replicas.

A node's residual is what a node has not yet sent of its node-summed replicated gradients
(``comm.cross_node``). It belongs to the node: each of the node's attention GPUs holds the
residual of the pieces it reduces across nodes, element ranges of the flat vector of replicated
gradients, and that vector is the same for every layout. So a residual's layout-independent form
is parts ``(node, start, stop, tensor)``, and a worker of any later layout takes the overlap of
its node's parts with its own pieces. A node left with no attention GPU hands its parts to the
node of pool rank 0: what matters to the next reductions is the sum over nodes, so nothing
unsent is lost.

On disk: ``residuals/node{n}-gpu{g}.pt`` in a checkpoint folder (``runtime.worker`` writes and
reads them; a worker opens only its node's files), each with its size and SHA-256 in the
checkpoint's table like a shard's, so a damaged one rejects the checkpoint. Across a rebalance: each old attention
worker's parts travel through the object store to the new workers of its node
(``runtime.worker_set``).

A sharded residual is what a worker of replica ``r`` has not yet sent of its heads' or experts'
gradients to its counterparts (``Role.shard_residuals``), by global name, so it is
layout-independent as it is; it is replica ``r``'s own. Across a rebalance it travels with the
heads and experts in their shipments (``migration.SHARD_RESIDUAL``). On disk:
``residuals/replica{r}/node{n}-gpu{g}.pt``, listed in the checkpoint's table too; a worker of
replica ``r`` of a resumed run takes replica ``r``'s, and replica 0's workers also take those of
replicas the run no longer has: the counterparts' reductions only ever see the sum over replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

FOLDER = "residuals"

Part = Tuple[int, int, int, torch.Tensor]  # node, start, stop, residual of elements [start, stop)


def parts_of(node: int, ranges: Dict[int, range], residuals: Dict[int, torch.Tensor]) -> List[Part]:
    """A worker's residuals by piece as parts (host copies)."""
    return [(node, ranges[p].start, ranges[p].stop, r.detach().to("cpu", copy=True)) for p, r in residuals.items()]


def taken_nodes(node: int, new_nodes: Sequence[int], rank0_node: int, old_nodes: Iterable[int]) -> set:
    """The nodes whose parts a worker on ``node`` takes: its own, and, on pool rank 0's node,
    those of old nodes without an attention GPU now."""
    taken = {node}
    if node == rank0_node:
        taken |= set(old_nodes) - set(new_nodes)
    return taken


def assemble(wanted: Dict[int, range], parts: Iterable[Part], nodes: set) -> Dict[int, torch.Tensor]:
    """Each wanted piece's residual: the sum of the overlaps of the parts of ``nodes`` with it
    (zeros where none overlaps)."""
    out = {p: None for p in wanted}
    for node, start, stop, tensor in parts:
        if node not in nodes:
            continue
        for piece, r in wanted.items():
            lo, hi = max(start, r.start), min(stop, r.stop)
            if lo >= hi:
                continue
            if out[piece] is None:
                out[piece] = torch.zeros(len(r), dtype=tensor.dtype)
            out[piece][lo - r.start:hi - r.start] += tensor[lo - start:hi - start]
    return {p: t for p, t in out.items() if t is not None}


def file_name(node: int, local_gpu: int) -> str:
    return f"node{node}-gpu{local_gpu}.pt"


def save(folder: Path, node: int, local_gpu: int, parts: List[Part]) -> Optional[Tuple[Path, int]]:
    """Write a worker's parts into a checkpoint folder; returns the file and its tensors' bytes,
    None when the worker holds none."""
    if not parts:
        return None
    (folder / FOLDER).mkdir(exist_ok=True)
    path = folder / FOLDER / file_name(node, local_gpu)
    torch.save([{"node": n, "start": a, "stop": b, "residual": t} for n, a, b, t in parts], path)
    return path, sum(t.numel() * t.element_size() for *_, t in parts)


def read(folder: Path, nodes: set) -> List[Part]:
    """The parts of ``nodes`` in a checkpoint folder (only their files are opened)."""
    parts: List[Part] = []
    for path in sorted((folder / FOLDER).glob("node*-gpu*.pt")):
        if int(path.name[len("node"):path.name.index("-")]) not in nodes:
            continue
        for item in torch.load(path, map_location="cpu", weights_only=True):
            parts.append((item["node"], item["start"], item["stop"], item["residual"]))
    return parts


def old_nodes_in(folder: Path) -> set:
    return {int(p.name[len("node"):p.name.index("-")]) for p in (folder / FOLDER).glob("node*-gpu*.pt")}


# --- a worker's sharded residuals across replicas -------------------------------------------

def _replica_folder(folder: Path, replica: int) -> Path:
    return folder / FOLDER / f"replica{replica}"


def save_sharded(folder: Path, replica: int, node: int, local_gpu: int,
                 tensors: Dict[str, torch.Tensor]) -> Optional[Tuple[Path, int]]:
    """Write a worker's sharded residuals by global name; returns the file and its tensors'
    bytes, None when it holds none."""
    if not tensors:
        return None
    out = _replica_folder(folder, replica)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name(node, local_gpu)
    torch.save({n: t.detach().to("cpu") for n, t in tensors.items()}, path)
    return path, sum(t.numel() * t.element_size() for t in tensors.values())


def saved_replicas(folder: Path) -> set:
    return {int(p.name[len("replica"):]) for p in (folder / FOLDER).glob("replica*") if p.is_dir()}


def taken_replicas(replica: int, replicas: int, saved: Iterable[int]) -> set:
    """The saved replicas whose sharded residuals a worker of ``replica`` (of ``replicas``)
    takes: its own, and, in replica 0, those past the run's replicas."""
    taken = {replica}
    if replica == 0:
        taken |= {r for r in saved if r >= replicas}
    return taken & set(saved)


def read_sharded(folder: Path, replicas: set, names: set) -> Iterator[Dict[str, torch.Tensor]]:
    """The sharded residuals of ``names`` saved by ``replicas``, a file at a time (mapped: only
    the names taken are read)."""
    for replica in sorted(replicas):
        for path in sorted(_replica_folder(folder, replica).glob("node*-gpu*.pt")):
            whole = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            part = {n: t for n, t in whole.items() if n in names}
            if part:
                yield part
