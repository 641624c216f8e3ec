"""Integration tests: they start Ray, with the CPU backend in strict NCCL mode
(``MA_RAY_STRICT_NCCL=1`` unless the environment sets it: every collective and transfer blocks in
issue order until its peer is at the matching one, as on GPUs; see ``ma_ray/comm/torch_backend.py``),
so a schedule that would hang under NCCL fails here. Every module that runs jobs in this process shares one
emulated local cluster (the local preset's 16 fake GPUs on this machine's cores): it starts on
first use and stops when the session ends. ``test_live_job`` attaches this process to the
cluster of a ``ma-ray train`` it starts itself, so it runs first, before the shared one is up.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import ray

from ma_ray import config as C
from ma_ray.comm.torch_backend import STRICT_ENV
from ma_ray.runtime.cluster import init_ray

os.environ.setdefault(STRICT_ENV, "1")  # before any Ray starts: its workers and subprocesses inherit it
# Gauges reach the node's /metrics within a second instead of ten (test_job_identity scrapes them).
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")

LOCAL = "cluster/local-cpu.yaml"
RUN_FIRST = ("test_live_job.py",)  # attach to another cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """The shared emulated cluster, with a Prometheus endpoint (``cluster.metrics_export_port``)."""
    if not ray.is_initialized():
        init_ray(C.load(LOCAL, [f"cluster.metrics_export_port={free_port()}"]).cluster, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def small_mount(tmp_path):
    """A mount point for a tmpfs of its own (``mount``: only root may); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def pytest_collection_modifyitems(session, config, items):
    def order(item):
        integration = "integration" in item.path.parts
        return (integration, not (integration and item.path.name in RUN_FIRST))
    items.sort(key=order)
