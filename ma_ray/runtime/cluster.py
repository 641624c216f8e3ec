"""Ray cluster bring-up: join an existing cluster or start an emulated one, and reserve the
topology's GPUs with one placement group.

Emulation starts a real local Ray node that advertises ``num_nodes * gpus_per_node`` GPUs
(fake resources: Ray hands out ``CUDA_VISIBLE_DEVICES`` but torch sees no device, so workers run
on CPU). One local node starts far faster than a multi-node ``cluster_utils.Cluster`` and Ray's
scheduling, placement groups and actors are the same code either way.

The placement group has one bundle per node of ``gpus_per_node`` GPUs; on a real cluster its
strategy is STRICT_SPREAD, so each bundle is a different machine and a worker's (node, local
GPU) from the plan is a real place. The wait for it is bounded: a cluster that cannot hold the
topology gets a one-line error saying what was needed and what is there.
"""

from __future__ import annotations

import os
from typing import Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from ma_ray.errors import MaRayError


class ClusterError(MaRayError, RuntimeError):
    """The Ray cluster cannot run the job; the message is one line."""


def connect(cluster_cfg, num_cpus: Optional[int] = None, namespace: Optional[str] = None) -> None:
    """Attach to Ray: the running session if any, a new emulated node, or ``cluster.address``."""
    if ray.is_initialized():
        return
    if cluster_cfg.fake_gpus:
        # A private single-machine cluster: no token to share with anyone.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus or os.cpu_count(), num_gpus=cluster_cfg.num_nodes * cluster_cfg.gpus_per_node,
                 include_dashboard=False, logging_level="warning", log_to_driver=True, namespace=namespace)
    else:
        try:
            ray.init(address=cluster_cfg.address, logging_level="warning", namespace=namespace)
        except ConnectionError as exc:
            raise ClusterError(f"cannot reach a Ray cluster at cluster.address={cluster_cfg.address!r}: "
                               f"{str(exc).splitlines()[0]}") from None


def describe_cluster() -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = [int(n.get("Resources", {}).get("GPU", 0)) for n in nodes]
    return f"{len(nodes)} node(s) with {sum(gpus)} GPU(s) ({', '.join(map(str, gpus)) or 'none'} per node)"


def reserve_gpus(cluster_cfg):
    """A ready placement group of one ``gpus_per_node``-GPU bundle per node; bundle i is node i."""
    c = cluster_cfg
    need = f"{c.num_nodes} node(s) x {c.gpus_per_node} GPU(s) = {c.num_nodes * c.gpus_per_node} GPUs"
    strategy = "PACK" if c.fake_gpus else "STRICT_SPREAD"
    pg = placement_group([{"GPU": c.gpus_per_node}] * c.num_nodes, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=c.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterError(f"the cluster cannot hold the topology within {c.placement_timeout_s:g} s "
                           f"(cluster.placement_timeout_s): needed {need}, one node each; "
                           f"the cluster has {describe_cluster()}") from None
    return pg
