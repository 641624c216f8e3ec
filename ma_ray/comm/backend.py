"""Which backend a worker's collective groups use: ``comm.backend`` decides.

* ``auto``: NCCL when the worker's device is CUDA and NCCL is usable there (cupy, the ``gpu``
  extra), else the CPU backend;
* ``gloo``: the CPU backend of ``cpu_backend.py`` (one gloo process group per group, not Ray's
  built-in GLOO), on any device;
* ``nccl``: NCCL; a worker without a CUDA device or without cupy fails when it builds its role,
  with one line naming ``comm.backend``.

``choose_backend`` is the rule, a pure function of the setting, the device type and whether NCCL
is usable; ``backend_for_device`` asks this process whether NCCL is usable and applies it. The
device is the worker's own (torch's), not Ray's: an actor given an emulated GPU has no CUDA.
"""

from __future__ import annotations

from typing import Union

import torch

from ma_ray.comm.cpu_backend import BACKEND_NAME as CPU_BACKEND
from ma_ray.config import ConfigError

NCCL_BACKEND = "NCCL"
SETTINGS = ("auto", "nccl", "gloo")


def choose_backend(setting: str, device_type: str, nccl_usable: bool) -> str:
    """The backend (``NCCL_BACKEND`` or ``CPU_BACKEND``) for ``comm.backend`` = ``setting`` on a
    worker whose device is ``device_type`` ("cuda", "cpu", ...), NCCL usable or not; raises
    ConfigError (one line naming comm.backend) when the setting cannot be honoured there."""
    if setting == "gloo":
        return CPU_BACKEND
    if setting == "auto":
        return NCCL_BACKEND if device_type == "cuda" and nccl_usable else CPU_BACKEND
    if setting == "nccl":
        if device_type != "cuda":
            raise ConfigError(f"comm.backend: nccl needs a CUDA device, this worker's device is "
                              f"{device_type} (set comm.backend to auto or gloo)")
        if not nccl_usable:
            raise ConfigError("comm.backend: nccl needs cupy on the worker (pip install -e \".[gpu]\"), "
                              "and this worker cannot import it (set comm.backend to auto or gloo)")
        return NCCL_BACKEND
    raise ConfigError(f"comm.backend: must be one of {', '.join(SETTINGS)}, got {setting!r}")


def nccl_usable() -> bool:
    """Whether ``ray.util.collective`` can run NCCL in this process (cupy importable)."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    import ray.util.collective as col

    return bool(col.nccl_available())


def backend_for_device(setting: str, device: Union[torch.device, str]) -> str:
    """``choose_backend`` for this process: ``comm.backend`` = ``setting`` on ``device`` (the
    worker's torch device). NCCL usability is only probed when the device is CUDA."""
    device_type = torch.device(device).type
    return choose_backend(setting, device_type, device_type == "cuda" and nccl_usable())
