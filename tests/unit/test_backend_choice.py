"""``comm.backend`` decides the collective backend of a worker (no Ray started)."""

from __future__ import annotations

import typing

import pytest
import torch

from ma_ray.comm import CPU_BACKEND, NCCL_BACKEND, backend_for_device, choose_backend
from ma_ray.comm.backend import SETTINGS, nccl_usable
from ma_ray.comm.groups import _resolve_backend
from ma_ray.config import CommConfig, ConfigError

# (setting, device type, NCCL usable) -> backend, by hand.
EXPECTED = {
    ("auto", "cuda", True): NCCL_BACKEND,
    ("auto", "cuda", False): CPU_BACKEND,
    ("auto", "cpu", True): CPU_BACKEND,
    ("auto", "cpu", False): CPU_BACKEND,
    ("gloo", "cuda", True): CPU_BACKEND,
    ("gloo", "cuda", False): CPU_BACKEND,
    ("gloo", "cpu", True): CPU_BACKEND,
    ("gloo", "cpu", False): CPU_BACKEND,
    ("nccl", "cuda", True): NCCL_BACKEND,
}


@pytest.mark.parametrize("case, backend", sorted(EXPECTED.items()))
def test_the_setting_decides(case, backend):
    assert choose_backend(*case) == backend
    # What create_group does with it: the same backend, by the name ray.util.collective knows.
    assert _resolve_backend(choose_backend(*case)) == backend


@pytest.mark.parametrize("usable", [True, False])
def test_nccl_without_cuda_names_the_key(usable):
    with pytest.raises(ConfigError) as info:
        choose_backend("nccl", "cpu", usable)
    assert str(info.value) == ("comm.backend: nccl needs a CUDA device, this worker's device is cpu "
                               "(set comm.backend to auto or gloo)")


def test_nccl_without_cupy_names_the_key():
    with pytest.raises(ConfigError) as info:
        choose_backend("nccl", "cuda", False)
    message = str(info.value)
    assert message.startswith("comm.backend: nccl needs cupy on the worker") and "\n" not in message


def test_an_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match=r"^comm\.backend: must be one of auto, nccl, gloo, got 'mpi'$"):
        choose_backend("mpi", "cuda", True)


def test_settings_are_the_configs():
    assert set(SETTINGS) == set(typing.get_args(typing.get_type_hints(CommConfig)["backend"]))


def test_this_process():
    """On this machine's real devices (CPU here; CUDA too where there is one)."""
    assert backend_for_device("auto", torch.device("cpu")) == CPU_BACKEND
    assert backend_for_device("gloo", "cpu") == CPU_BACKEND
    with pytest.raises(ConfigError, match=r"^comm\.backend: nccl needs a CUDA device"):
        backend_for_device("nccl", torch.device("cpu"))
    # A CUDA device: NCCL exactly when cupy can be imported in this process.
    usable = nccl_usable()
    assert backend_for_device("auto", "cuda") == (NCCL_BACKEND if usable else CPU_BACKEND)
    assert backend_for_device("gloo", "cuda:0") == CPU_BACKEND
    if usable:
        assert backend_for_device("nccl", "cuda") == NCCL_BACKEND
    else:
        with pytest.raises(ConfigError, match=r"^comm\.backend: nccl needs cupy on the worker"):
            backend_for_device("nccl", "cuda")


@pytest.mark.parametrize("priority_range", [(0, -5), (0, -1)])
def test_stream_priorities_map_high_to_cudas_greatest_and_normal_to_its_default(priority_range):
    from ma_ray.runtime.device import cuda_priority
    least, greatest = priority_range
    comm = CommConfig()
    assert cuda_priority(comm.attention_stream_priority, priority_range) == greatest
    assert cuda_priority(comm.moe_stream_priority, priority_range) == least
    assert cuda_priority(7, priority_range) == least
