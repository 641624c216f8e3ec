"""Ray cluster bring-up: join an existing cluster or start an emulated one, and reserve the
topology's GPUs with one placement group.

Emulation (``cluster.fake_gpus``) starts a real local Ray node; the topology's nodes are the
placement group's bundles on it. On a machine without GPUs the node advertises
``replicas * num_nodes * gpus_per_node`` GPUs (fake resources: Ray hands out
``CUDA_VISIBLE_DEVICES`` but torch sees no device, so workers run on CPU). On a machine with GPUs
it advertises the real ones (``emulated_gpus``): every worker then gets a GPU that exists, and
NCCL, which takes one rank per GPU, runs between emulated nodes as between real ones. One local
node starts far faster than a multi-node ``cluster_utils.Cluster`` and Ray's scheduling,
placement groups and actors are the same code either way.

The placement group has one bundle per node of ``gpus_per_node`` GPUs; on a real cluster its
strategy is STRICT_SPREAD, so each bundle is a different machine and a worker's (node, local
GPU) from the plan is a real place. The wait for it is bounded: a cluster that cannot hold the
topology gets a one-line error saying what was needed and what is there.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from ma_ray.errors import MaRayError, message_line

AUTH_MODE = "RAY_AUTH_MODE"  # Ray's switch for its token authentication: "token" or "disabled"


class ClusterError(MaRayError, RuntimeError):
    """The Ray cluster cannot run the job; the message is one line."""


class NoJobReachable(MaRayError):
    """Nothing answers at a cluster address (``join_cluster``)."""


def init_ray(cluster_cfg, num_cpus: Optional[int] = None, namespace: Optional[str] = None,
             connect_timeout_s: float = 5.0, log_to_driver: bool = True) -> None:
    """Attach to Ray: the running session if any, a new emulated node, or ``cluster.address``
    (joined within ``connect_timeout_s``, ``control.connect_timeout_s``). ``log_to_driver``:
    print the actors' output here (else it stays in Ray's logs)."""
    if ray.is_initialized():
        return
    _hide_worker_pool_warning()
    if cluster_cfg.fake_gpus:
        # A private single-machine cluster, yet Ray's servers listen on the machine's network
        # (Ray 2.60 replaces a loopback node address with the machine's own), so Ray's token
        # guards them: its default for a new local cluster, set here to say so without Ray's
        # warning. "local": a new cluster even when another Ray runs on this machine.
        _use_token_auth(only_with_a_token=False)
        extra = {} if cluster_cfg.metrics_export_port is None else {"_metrics_export_port": cluster_cfg.metrics_export_port}
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                 num_gpus=emulated_gpus(cluster_cfg, real_gpu_count()),
                 include_dashboard=False,
                 logging_level="warning", log_to_driver=log_to_driver, namespace=namespace, **extra)
    else:
        try:
            join_cluster(cluster_cfg.address, namespace, connect_timeout_s, log_to_driver=log_to_driver)
        except NoJobReachable as exc:
            raise ClusterError(f"cannot reach a Ray cluster at cluster.address={cluster_cfg.address!r}: "
                               f"{str(exc).partition(': ')[2]}") from None


def emulated_gpus(cluster_cfg, real_gpus: int) -> int:
    """The GPUs the private node of ``cluster.fake_gpus`` advertises on a machine with
    ``real_gpus``: the topology's, as fake resources, where there are none; else the real ones,
    which must hold the topology (a fake one beside real ones would hand a worker a
    ``CUDA_VISIBLE_DEVICES`` index that exists for some workers and not for others)."""
    c = cluster_cfg
    need = c.replicas * c.num_nodes * c.gpus_per_node
    if real_gpus == 0:
        return need
    if need > real_gpus:
        raise ClusterError(f"cluster.fake_gpus: the topology needs {need} GPUs ({c.replicas} replica(s) x "
                           f"{c.num_nodes} node(s) x {c.gpus_per_node}) and this machine has {real_gpus}; on a "
                           f"machine with GPUs the emulated nodes stand on real ones: make the topology fit")
    return real_gpus


def real_gpu_count() -> int:
    """CUDA devices this process sees (0 without a CUDA build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def join_cluster(address: Optional[str], namespace: Optional[str], timeout_s: float,
                 log_to_driver: bool = False) -> str:
    """Join the Ray cluster at ``address`` (default ``RAY_ADDRESS``, else the local one) within
    ``timeout_s``; returns its address. Raises NoJobReachable when nothing answers there.

    The address is probed with a plain TCP connection of ``timeout_s`` before Ray is asked:
    Ray's own connect to a dead address retries for minutes, printing as it goes."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    from ray._private.services import canonicalize_bootstrap_address

    given = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        resolved = canonicalize_bootstrap_address(given)
    except (ValueError, ConnectionError) as exc:
        raise NoJobReachable(f"no ma-ray job reachable at {given}: {message_line(exc)}") from None
    if resolved is None:
        raise NoJobReachable("no ma-ray job reachable: no Ray cluster runs on this machine")
    shown = resolved if given == "auto" else given
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except socket.timeout:
        raise NoJobReachable(f"no ma-ray job reachable at {shown}: no answer within {timeout_s:g} s "
                             f"(control.connect_timeout_s)") from None
    except OSError as exc:
        raise NoJobReachable(f"no ma-ray job reachable at {shown}: {exc.strerror or exc} "
                             f"(the job has ended?)") from None
    _use_token_auth(only_with_a_token=True)
    try:
        ray.init(address=resolved, namespace=namespace, logging_level="warning", log_to_driver=log_to_driver)
    except ConnectionError as exc:
        raise NoJobReachable(f"no ma-ray job reachable at {shown}: {message_line(exc)}") from None
    return resolved


def _use_token_auth(only_with_a_token: bool) -> None:
    """Turn Ray's token authentication on for this process and its children, unless
    ``RAY_AUTH_MODE`` says otherwise; ``only_with_a_token``: only when this machine has a token.

    A client joins with the token when this machine has one: the clusters ``init_ray`` starts,
    and Ray's local clusters by default, require it, while Ray sends it on its own only to a
    cluster it finds by itself, never at an address. A cluster without authentication ignores
    it. Ray's own switch, since its config is cached at import: the variable alone would reach
    the servers it starts but not this process's client."""
    if AUTH_MODE in os.environ:
        return
    from ray._private.authentication.authentication_token_setup import (AuthenticationTokenLoader,
                                                                         _enable_token_auth)
    if not only_with_a_token or AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        _enable_token_auth()


def metrics_address() -> Optional[str]:
    """``host:port`` of this node's Prometheus endpoint (``/metrics``), where the controller's
    gauges are served; None when Ray runs without one."""
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here and node.get("MetricsExportPort"):
            return f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    return None


def _hide_worker_pool_warning() -> None:
    """Keep Ray's "N PYTHON worker processes have been started ... the maximum expected startup
    concurrency" off the terminal. The raylet publishes it when a node runs more than four times
    its CPU count of worker processes, which one actor per GPU does by design on a small host;
    it carries no advice for a user of ma-ray. Ray has no switch for it, so the driver's printer
    of published errors (``ray._private.worker.print_to_stdstream``) skips that one message;
    any other goes through, to the terminal or, inside ``published_errors_to``, to a log. Ray's
    own log files keep it."""
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_ma_ray_filter", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        lines = [line for line in data.get("lines", []) if _WORKER_POOL_WARNING not in line]
        sink = _published_errors_sink
        if sink is not None and data.get("pid") == "raylet":
            _append_lines(sink, lines)
        elif lines or not data.get("lines"):
            printer({**data, "lines": lines}, *args, **kwargs)

    print_to_stdstream._ma_ray_filter = True
    ray_worker.print_to_stdstream = print_to_stdstream


_WORKER_POOL_WARNING = "worker processes have been started on node"
_published_errors_sink: Optional[Path] = None


@contextmanager
def published_errors_to(log: Path):
    """Inside: the errors Ray publishes to this driver (``(raylet) A worker died ...``, several
    lines each, for deaths the run already reports in one line) are appended to ``log`` instead
    of the terminal."""
    global _published_errors_sink
    _hide_worker_pool_warning()
    before, _published_errors_sink = _published_errors_sink, Path(log)
    try:
        yield
    finally:
        _published_errors_sink = before


def _append_lines(log: Path, lines) -> None:
    try:
        with open(log, "a") as f:
            f.writelines(f"{time.strftime('%Y-%m-%d %H:%M:%S')} (raylet) {line}\n" for line in lines)
    except OSError:
        pass  # the run reports its own failures; Ray's account of them is not worth a second one


def describe_cluster() -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = [int(n.get("Resources", {}).get("GPU", 0)) for n in nodes]
    return f"{len(nodes)} node(s) with {sum(gpus)} GPU(s) ({', '.join(map(str, gpus)) or 'none'} per node)"


def gpus_name(job: str) -> str:
    """The name of job ``job``'s placement group."""
    return f"{job}-gpus"


def release_gpus(job: str) -> None:
    """Remove job ``job``'s placement group if it is left: a placement group outlives the actor
    that made it (it is its driver's), so a controller that died leaves its job's behind."""
    from ray.util.placement_group import PlacementGroup

    for pg_id, entry in ray.util.placement_group_table().items():
        if entry.get("name") == gpus_name(job) and entry.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


def reserve_gpus(cluster_cfg, job: str):
    """A ready placement group of one ``gpus_per_node``-GPU bundle per node of every replica,
    named for ``job``; bundle i is node i (replica r's nodes are ``r * num_nodes`` onwards)."""
    c = cluster_cfg
    nodes = c.replicas * c.num_nodes
    need = f"{nodes} node(s) x {c.gpus_per_node} GPU(s) = {nodes * c.gpus_per_node} GPUs"
    if c.replicas > 1:
        need = f"{c.replicas} replicas x {c.num_nodes} node(s) = {need}"
    strategy = "PACK" if c.fake_gpus else "STRICT_SPREAD"
    pg = placement_group([{"GPU": c.gpus_per_node}] * nodes, strategy=strategy, name=gpus_name(job))
    try:
        ray.get(pg.ready(), timeout=c.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterError(f"the cluster cannot hold the topology within {c.placement_timeout_s:g} s "
                           f"(cluster.placement_timeout_s): needed {need}, one node each; "
                           f"the cluster has {describe_cluster()}") from None
    return pg


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``: Ray shut down, logs and output flushed, and no
    interpreter teardown. Ray 2.60 leaves native threads running after ``ray.shutdown()`` (its
    GCS client's io service, gRPC's pollers and timers; Python cannot join them), and the
    interpreter's teardown of the modules they call into can crash under them, turning a run or a
    test session that succeeded into exit 139."""
    if ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
