"""A client for a running job's controller: what a notebook and ``ma-ray status`` use.

``connect()`` joins the Ray cluster the job runs on and looks the controller up by name; every
method is a blocking call that returns plain data. An error the controller raises for bad input
(a split out of range, a policy with min > max) comes back as that error, not as a Ray wrapper.
"""

from __future__ import annotations

import os
from typing import List, Optional

import ray

from ma_ray.config import ControlConfig
from ma_ray.errors import MaRayError

DEFAULTS = ControlConfig()


class ControllerNotFound(MaRayError):
    pass


class ControllerClient:
    def __init__(self, actor):
        self._actor = actor

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
        return self._call("rebalance", attention_gpus)

    def set_policy(self, **changes) -> dict:
        return self._call("set_policy", **changes)

    def pause(self) -> str:
        return self._call("pause")

    def resume(self) -> str:
        return self._call("resume")

    def stop(self) -> str:
        return self._call("stop")


def connect(name: str = DEFAULTS.name, namespace: str = DEFAULTS.namespace,
            address: Optional[str] = None) -> ControllerClient:
    """The controller of the running job ``name`` in ``namespace`` (on the cluster at ``address``,
    default: ``RAY_ADDRESS`` or the local one)."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS", "auto")
        try:
            ray.init(address=address, namespace=namespace, logging_level="warning", log_to_driver=False)
        except ConnectionError as exc:
            raise ControllerNotFound(f"no Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise ControllerNotFound(f"no running ma-ray job named {name!r} in namespace {namespace!r} "
                                 f"(control.name / control.namespace)") from None
    return ControllerClient(actor)
