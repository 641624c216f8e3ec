"""``comm.backend`` decides the collective backend of a worker, never falling back quietly; the
backend class owns the torch process group the choice names (no Ray started)."""

from __future__ import annotations

import itertools
import typing
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from ma_ray.comm import GLOO, NCCL, RAY_NCCL, NcclSupport, backend_for_device, choose_backend
from ma_ray.comm.backend import SETTINGS, torch_nccl_problem
from ma_ray.comm.groups import _resolve_backend
from ma_ray.comm.handles import CommHandle
from ma_ray.comm.torch_backend import GroupOptions, TorchGroup, process_group_class
from ma_ray.config import CommConfig, ConfigError

BOTH = NcclSupport()
NO_TORCH_NCCL = NcclSupport(torch_nccl="torch 2.13.0+cpu was built without NCCL")
NO_CUPY = NcclSupport(ray_nccl="cupy cannot be imported (No module named 'cupy')")
NEITHER = NcclSupport(NO_TORCH_NCCL.torch_nccl, NO_CUPY.ray_nccl)
SUPPORTS = {"both": BOTH, "no torch nccl": NO_TORCH_NCCL, "no cupy": NO_CUPY, "neither": NEITHER}


def expected(setting, device, support):
    """The rule, by hand: a backend, or the start of the one-line error."""
    if setting == "gloo":
        return GLOO
    if device != "cuda":
        return GLOO if setting == "auto" else f"comm.backend: {setting} needs a CUDA device"
    if setting in ("auto", "nccl"):
        return NCCL if support.torch_nccl is None else f"comm.backend: {setting} on a CUDA worker needs torch's NCCL"
    return RAY_NCCL if support.ray_nccl is None else "comm.backend: ray_nccl needs cupy with NCCL"


@pytest.mark.parametrize("setting, device, support", list(itertools.product(SETTINGS, ["cuda", "cpu"], SUPPORTS)))
def test_the_setting_decides(setting, device, support):
    want = expected(setting, device, SUPPORTS[support])
    if want in (NCCL, GLOO, RAY_NCCL):
        assert choose_backend(setting, device, SUPPORTS[support]) == want
        assert _resolve_backend(want) == want  # create_group takes it as it is
        return
    with pytest.raises(ConfigError) as info:
        choose_backend(setting, device, SUPPORTS[support])
    message = str(info.value)
    assert message.startswith(want) and "\n" not in message


def test_auto_on_cuda_without_nccl_is_an_error_naming_what_to_install():
    """The old rule fell back to gloo without a word: every GPU tensor through the host."""
    with pytest.raises(ConfigError) as info:
        choose_backend("auto", "cuda", NO_TORCH_NCCL)
    assert str(info.value) == (
        "comm.backend: auto on a CUDA worker needs torch's NCCL, and torch 2.13.0+cpu was built without "
        "NCCL: install a CUDA build of torch (pip install torch --index-url "
        "https://download.pytorch.org/whl/cu<CUDA version>, e.g. cu128), or set comm.backend to gloo")


def test_ray_nccl_without_cupy_says_what_to_install():
    with pytest.raises(ConfigError) as info:
        choose_backend("ray_nccl", "cuda", NO_CUPY)
    assert str(info.value) == (
        "comm.backend: ray_nccl needs cupy with NCCL on the worker, and cupy cannot be imported (No module "
        "named 'cupy'): install cupy for torch's CUDA (pip install -e \".[gpu]\": cupy-cuda12x for CUDA 12), "
        "or set comm.backend to nccl")


def test_an_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match=r"^comm\.backend: must be one of auto, nccl, gloo, ray_nccl, got 'mpi'$"):
        choose_backend("mpi", "cuda", BOTH)
    with pytest.raises(ValueError, match="backend 'NCCL'"):
        _resolve_backend("NCCL")  # Ray's own name is not a comm.backend value


def test_settings_are_the_configs():
    assert set(SETTINGS) == set(typing.get_args(typing.get_type_hints(CommConfig)["backend"]))


def test_this_process():
    """On this machine's real devices and torch build (a CPU wheel here; CUDA where there is one)."""
    has_nccl = dist.is_available() and dist.is_nccl_available() and hasattr(dist, "ProcessGroupNCCL")
    assert (torch_nccl_problem() is None) == has_nccl
    assert backend_for_device("auto", torch.device("cpu")) == GLOO
    assert backend_for_device("gloo", "cuda:0") == GLOO  # gloo never probes NCCL
    assert _resolve_backend(None) == (NCCL if torch.cuda.is_available() else GLOO)
    with pytest.raises(ConfigError, match=r"^comm\.backend: nccl needs a CUDA device"):
        backend_for_device("nccl", torch.device("cpu"))
    if has_nccl:
        assert backend_for_device("auto", "cuda") == NCCL
    else:
        with pytest.raises(ConfigError, match=r"^comm\.backend: auto on a CUDA worker needs torch's NCCL, and "
                                              r"torch .* was built without NCCL"):
            backend_for_device("auto", "cuda")


def test_the_group_owns_torchs_classes():
    """The class behind each kind is torch's own; a torch without NCCL (CPU wheels) is one line."""
    assert process_group_class(GLOO) is dist.ProcessGroupGloo
    if hasattr(dist, "ProcessGroupNCCL"):
        assert process_group_class(NCCL) is dist.ProcessGroupNCCL
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(milliseconds=1234)  # what the group sets: the watchdog's bound
        assert options._timeout == timedelta(milliseconds=1234)
    else:
        with pytest.raises(ConfigError, match=r"^comm\.backend: nccl needs torch\.distributed\.ProcessGroupNCCL, "
                                              r"and torch .* was built without it$"):
            process_group_class(NCCL)
    assert GroupOptions().process_group == GLOO


class _FakeNccl:
    """Stands for ProcessGroupNCCL (absent from CPU wheels): records what the group does with it."""

    made = []

    class Options:
        def __init__(self):
            self._timeout = None
            self.group_name = None

    def __init__(self, store, rank, size, options):
        self.args, self.connected = (store, rank, size, options), None
        _FakeNccl.made.append(self)

    def eager_connect_single_device(self, device):
        self.connected = device


def test_an_nccl_group_hands_its_timeout_to_the_watchdog_and_connects_at_once(monkeypatch):
    monkeypatch.setattr(dist, "ProcessGroupNCCL", _FakeNccl, raising=False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    group = TorchGroup.__new__(TorchGroup)  # the rendezvous before this step needs Ray
    super(TorchGroup, group).__init__(3, 1, "g")
    group._timeout_ms = 2500
    group._device = torch.device("cuda", 0)
    pg = group._nccl_process_group("store")
    assert pg.args[:3] == ("store", 1, 3)
    assert pg.args[3]._timeout == timedelta(milliseconds=2500) and pg.args[3].group_name == "g"
    assert pg.connected == torch.device("cuda", 0)


class _Work:
    def __init__(self):
        self.waits = []

    def wait(self, *args):
        self.waits.append(args)

    def is_completed(self):
        return True


@pytest.mark.parametrize("on_device", [True, False])
def test_an_nccl_handle_waits_on_the_stream_a_gloo_handle_on_the_host(on_device):
    """torch: ProcessGroupNCCL's Work.wait(timeout) spins the host until the op ends; without a
    timeout it only makes the current stream wait. gloo's is a host wait, bounded."""
    work = _Work()
    CommHandle(work, ident=None, op="allreduce", timeout_ms=700, on_failure=lambda e: None,
               on_device=on_device).wait()
    assert work.waits == ([()] if on_device else [(timedelta(milliseconds=700),)])


@pytest.mark.parametrize("priority_range", [(0, -5), (0, -1)])
def test_stream_priorities_map_high_to_cudas_greatest_and_normal_to_its_default(priority_range):
    from ma_ray.runtime.device import cuda_priority
    least, greatest = priority_range
    comm = CommConfig()
    assert cuda_priority(comm.attention_stream_priority, priority_range) == greatest
    assert cuda_priority(comm.moe_stream_priority, priority_range) == least
    assert cuda_priority(7, priority_range) == least


def test_the_ray_internals_the_fences_use_are_in_the_pinned_ray():
    """Ray's NCCL group needs cupy to import, so its source is read: the private names
    ``groups.ray_op_stream`` calls, and the order of the copies it fences (a Ray upgrade that
    changes either must be looked at again)."""
    import importlib.util
    from pathlib import Path

    from ma_ray.comm.backend import RAY_NCCL_INTERNALS

    spec = importlib.util.find_spec("ray.util.collective.collective_group.nccl_collective_group")
    source = Path(spec.origin).read_text()
    for name in (*RAY_NCCL_INTERNALS, "_get_comm_key_from_devices", "_get_comm_key_send_recv"):
        assert f"def {name}(" in source
    assert "self._dev_streams_map[comm_key] = streams" in source  # one stream per communicator key
    collective = source[source.index("    def _collective("):source.index("    def _point2point(")]
    # The hazards: Ray's streams wait on cupy's current stream; the reduce-scatter's copy-in comes
    # after that wait; the all-gather's copy-out after the NCCL call, on torch's current stream.
    assert collective.index("self._sync_streams(") < collective.index("preprocess_fn(streams)") < \
        collective.index("collective_fn(") < collective.index("postprocess_fn(streams)")
    assert "events[i].record(cupy.cuda.get_current_stream())" in source
