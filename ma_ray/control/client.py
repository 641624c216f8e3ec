"""A client for a running job's controller: what a notebook and ``ma-ray status`` use.

``connect()`` finds the one job its caller means, and only it:

- ``run=DIR``: the job whose run folder is ``DIR`` (its ``job.json``: id, address, name,
  namespace); the controller found must answer with that id, so a folder's finished job never
  leads to another job that took its place;
- ``name=`` (and ``namespace=``): that controller, its id checked when ``job_id=`` is given;
- none of these: the one ma-ray job on the cluster, or a one-line error listing the jobs there.

Every job's controller is a named actor ``<control.name>-<job id>``, so two jobs on one cluster
never share a name. Joining the cluster is bounded (``runtime.cluster.join_cluster``,
``control.connect_timeout_s``): a dead or silent address is ``NoJobReachable``, one line.
Every call then returns plain data; an error the controller
raises for bad input (a split out of range, a policy with min > max) comes back as that error,
not as a Ray wrapper.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import ray

from ma_ray.config import ControlConfig
from ma_ray.errors import MaRayError
from ma_ray.runtime.cluster import join_cluster

DEFAULTS = ControlConfig()
IDENTITY = "job_identity"  # the controller method that tells an ma-ray controller from other actors
_ID = re.compile(r"-([0-9a-f]{12})$")


class ControllerNotFound(MaRayError):
    pass


def controller_name(prefix: str, job_id: str) -> str:
    """The controller actor's name of job ``job_id``: ``control.name`` and the id."""
    return f"{prefix}-{job_id}"


def incarnation_name(controller: str, incarnation: int) -> str:
    """The workers' name (their placement group, their collective groups' prefix) under the
    ``incarnation``-th controller of a job (0: the first; one more each time one died): two jobs
    share none, nor two incarnations of one."""
    return controller if not incarnation else f"{controller}-r{incarnation}"


class ControllerClient:
    def __init__(self, actor, identity: dict):
        self._actor = actor
        self.identity = identity  # job_id, name, namespace, out: which job this client steers

    @property
    def job_id(self) -> str:
        return self.identity["job_id"]

    def _call(self, method: str, *args, **kwargs):
        try:
            return ray.get(getattr(self._actor, method).remote(*args, **kwargs))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, (MaRayError, ValueError)):
                raise exc.cause from None
            raise

    def status(self) -> dict:
        return self._call("status")

    def history(self, n: Optional[int] = None, since: int = -1) -> List[dict]:
        """Rows of the steps after ``since`` (the newest ``n``), as in ``metrics.jsonl``: ``step``,
        the ``StepMetrics`` keys, ``predicted_t_attention_s`` / ``predicted_t_moe_s``, and
        ``decision`` at decision steps."""
        return self._call("history_since", since, n)

    def rebalance(self, attention_gpus: int) -> dict:
        """Queue a move to ``attention_gpus``; the reply's ``before_step`` is the first step that
        runs on the new split."""
        return self._call("rebalance", attention_gpus)

    def set_policy(self, **changes) -> dict:
        return self._call("set_policy", **changes)

    def pause(self) -> str:
        return self._call("pause")

    def resume(self) -> str:
        return self._call("resume")

    def stop(self) -> str:
        return self._call("stop")


def connect(name: Optional[str] = None, namespace: Optional[str] = None, address: Optional[str] = None,
            run: Optional[str | Path] = None, job_id: Optional[str] = None,
            timeout_s: Optional[float] = None) -> ControllerClient:
    """The controller of one running job (see the module docstring for how it is chosen)."""
    if run is not None:
        from ma_ray.run_folder import read_job

        record = read_job(Path(run))
        name, namespace = name or record["name"], namespace or record["namespace"]
        address, job_id = address or record["address"], job_id or record["job_id"]
        timeout_s = timeout_s or record.get("connect_timeout_s")
    where = join_cluster(address, namespace or DEFAULTS.namespace, timeout_s or DEFAULTS.connect_timeout_s)
    if name is not None:
        return _named(name, namespace, job_id, where)
    jobs = list_jobs(namespace)
    if job_id is not None:
        jobs = [j for j in jobs if j[1]["job_id"] == job_id]
    if len(jobs) == 1:
        return ControllerClient(*jobs[0])
    scope = f"namespace {namespace!r}" if namespace else "any namespace"
    if not jobs:
        wanted = f"job {job_id}" if job_id else "ma-ray job"
        raise ControllerNotFound(f"no running {wanted} in {scope} on the cluster at {where}")
    listed = "; ".join(_describe(i) for _, i in jobs)
    raise ControllerNotFound(f"{len(jobs)} ma-ray jobs run on the cluster at {where}: {listed}; "
                             f"name one with --run DIR (or --name NAME)")


def _named(name: str, namespace: Optional[str], job_id: Optional[str], where: str) -> ControllerClient:
    spaces = [namespace] if namespace else sorted({a["namespace"] for a in ray.util.list_named_actors(True)
                                                  if a["name"] == name})
    for ns in spaces:
        try:
            actor = ray.get_actor(name, namespace=ns)
        except ValueError:
            continue
        if not hasattr(actor, IDENTITY):
            raise ControllerNotFound(f"the actor {name!r} in namespace {ns!r} is not an ma-ray controller")
        identity = _identity(actor)
        if identity is None:
            continue  # ended while we looked
        if job_id is not None and identity["job_id"] != job_id:
            raise ControllerNotFound(f"{name!r} in namespace {ns!r} is job {identity['job_id']}, not {job_id}: "
                                     f"the job {job_id} has ended")
        return ControllerClient(actor, identity)
    ended = f" (job {job_id} has ended?)" if job_id else ""
    raise ControllerNotFound(f"no running ma-ray job named {name!r} in "
                             f"{f'namespace {namespace!r}' if namespace else 'any namespace'} "
                             f"on the cluster at {where}{ended}")


def list_jobs(namespace: Optional[str] = None) -> List[tuple]:
    """(actor, identity) of every ma-ray controller on the connected cluster (in ``namespace``)."""
    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if not _ID.search(entry["name"]) or (namespace and entry["namespace"] != namespace):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
        except ValueError:  # gone meanwhile
            continue
        identity = _identity(actor) if hasattr(actor, IDENTITY) else None
        if identity is not None:
            found.append((actor, identity))
    return sorted(found, key=lambda j: j[1]["name"])


def _identity(actor) -> Optional[dict]:
    """The controller's ``job_identity``, or None when it does not answer in time (ended)."""
    try:
        return ray.get(getattr(actor, IDENTITY).remote(), timeout=DEFAULTS.connect_timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        return None


def _describe(identity: dict) -> str:
    return (f"{identity['name']} (namespace {identity['namespace']}, step {identity['step']}, "
            f"run folder {identity['out']})")
