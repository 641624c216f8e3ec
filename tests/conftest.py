"""The test session ends its process itself once pytest has reported (``exit_process``): Ray
shut down, output flushed, pytest's exit code, and no interpreter teardown under the native
threads Ray leaves running, which can crash it after every test has passed."""

import pytest

_exit_status = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "code" not in _exit_status:
        return  # pytest stopped before a session ran (a usage error): its own exit stands
    from ma_ray.runtime.cluster import exit_process

    exit_process(_exit_status["code"])
