"""Which backend a worker's collective groups use: ``comm.backend`` decides, once per worker.

* ``nccl``: ma-ray's backend (``torch_backend.TorchGroup``) owning torch's ``ProcessGroupNCCL``:
  what Megatron, torchtitan and DeepSpeed run on, with a watchdog that bounds every op by
  ``comm.synchronization_timeout_ms``; needs a CUDA device and a torch built with NCCL;
* ``gloo``: the same backend owning torch's ``ProcessGroupGloo``, on any device (every CPU run);
* ``ray_nccl``: Ray's own NCCL group (cupy, the ``gpu`` extra), its stream hazards fenced by
  ``groups.py``; no op timeout;
* ``auto``: ``nccl`` on a CUDA worker, ``gloo`` otherwise. A CUDA worker whose torch has no NCCL
  is an error, never a quiet fall back to gloo: gloo would move every GPU tensor through the
  host.

A setting the worker cannot honour is a ConfigError of one line naming ``comm.backend`` and what
to install. ``choose_backend`` is the rule, a pure function of the setting, the device type and
what this process can run (``NcclSupport``); ``backend_for_device`` probes this process and
applies it. The device is the worker's own (torch's), not Ray's: an actor given an emulated GPU
has no CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ma_ray.comm.torch_backend import GLOO, NCCL
from ma_ray.config import ConfigError
from ma_ray.errors import message_line

RAY_NCCL = "ray_nccl"
SETTINGS = ("auto", NCCL, GLOO, RAY_NCCL)
BACKENDS = (NCCL, GLOO, RAY_NCCL)  # what a setting resolves to

# What a user installs for each, named in the errors.
TORCH_WITH_NCCL = ("a CUDA build of torch (pip install torch --index-url "
                   "https://download.pytorch.org/whl/cu<CUDA version>, e.g. cu128)")
CUPY_FOR = "cupy for torch's CUDA (pip install -e \".[gpu]\": cupy-cuda12x for CUDA 12)"

# The private parts of Ray's NCCLGroup that groups.py reads to order its copies (Ray 2.60.0, the
# version pyproject pins): without them ray_nccl cannot be fenced.
RAY_NCCL_INTERNALS = ("_get_nccl_collective_communicator", "_get_nccl_p2p_communicator")


@dataclass(frozen=True)
class NcclSupport:
    """What this process can run NCCL with: None where usable, else why not (one line)."""

    torch_nccl: Optional[str] = None
    ray_nccl: Optional[str] = None


def choose_backend(setting: str, device_type: str, support: NcclSupport) -> str:
    """The backend (``nccl``, ``gloo`` or ``ray_nccl``) for ``comm.backend`` = ``setting`` on a
    worker whose device is ``device_type`` ("cuda", "cpu", ...); raises ConfigError (one line
    naming comm.backend) when the setting cannot be honoured there."""
    if setting not in SETTINGS:
        raise ConfigError(f"comm.backend: must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == GLOO:
        return GLOO
    if device_type != "cuda":
        if setting == "auto":
            return GLOO
        raise ConfigError(f"comm.backend: {setting} needs a CUDA device, this worker's device is "
                          f"{device_type} (set comm.backend to auto or gloo)")
    if setting in ("auto", NCCL):
        if support.torch_nccl is None:
            return NCCL
        raise ConfigError(f"comm.backend: {setting} on a CUDA worker needs torch's NCCL, and "
                          f"{support.torch_nccl}: install {TORCH_WITH_NCCL}, or set comm.backend to gloo")
    if support.ray_nccl is None:
        return RAY_NCCL
    raise ConfigError(f"comm.backend: ray_nccl needs cupy with NCCL on the worker, and "
                      f"{support.ray_nccl}: install {CUPY_FOR}, or set comm.backend to nccl")


def torch_nccl_problem() -> Optional[str]:
    """Why torch's ProcessGroupNCCL cannot run in this process, or None."""
    import torch.distributed as dist

    if not dist.is_available():
        return f"torch {torch.__version__} has no torch.distributed"
    if not dist.is_nccl_available() or not hasattr(dist, "ProcessGroupNCCL"):
        return f"torch {torch.__version__} was built without NCCL"
    return None


def ray_nccl_problem() -> Optional[str]:
    """Why Ray's NCCL group cannot run (fenced) in this process, or None. Ray swallows the
    ImportError of its NCCL group (``nccl_available()`` is then just False): the cause is
    reproduced here for the message."""
    try:
        import cupy
    except ImportError as exc:
        return f"cupy cannot be imported ({message_line(exc)})"
    try:
        cupy_cuda = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception as exc:  # noqa: BLE001 - any failure to reach CUDA from cupy
        return f"cupy cannot reach the CUDA runtime ({message_line(exc)})"
    torch_cuda = (torch.version.cuda or "").split(".")[0]
    if torch_cuda and str(cupy_cuda) != torch_cuda:
        return f"cupy is built for CUDA {cupy_cuda} and torch for CUDA {torch_cuda}"
    try:
        from ray.util.collective.collective_group.nccl_collective_group import NCCLGroup
    except ImportError as exc:
        return f"Ray's NCCL group cannot load ({message_line(exc)})"
    missing = [name for name in RAY_NCCL_INTERNALS if not hasattr(NCCLGroup, name)]
    if missing:
        import ray

        return (f"Ray {ray.__version__}'s NCCL group lacks {', '.join(missing)}, which ma-ray's "
                f"stream fences use (written against Ray 2.60.0)")
    return None


def nccl_support() -> NcclSupport:
    """This process's ``NcclSupport`` (imports cupy, if installed)."""
    return NcclSupport(torch_nccl_problem(), ray_nccl_problem())


def backend_for_device(setting: str, device: Union[torch.device, str]) -> str:
    """``choose_backend`` for this process: ``comm.backend`` = ``setting`` on ``device`` (the
    worker's torch device). What can run NCCL is only probed when the device is CUDA."""
    device_type = torch.device(device).type
    support = nccl_support() if device_type == "cuda" and setting != GLOO else NcclSupport()
    return choose_backend(setting, device_type, support)
