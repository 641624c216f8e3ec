"""What reaches a user's terminal from Ray: the raylet's worker-pool warning, expected with one
actor per GPU, is dropped by the driver's printer; every other published line goes through."""

from ma_ray.runtime import cluster

WARNING = ("WARNING: 17 PYTHON worker processes have been started on node: 3f1 with address: 10.0.0.5. "
           "This could be a result of using a large number of actors")


def test_the_worker_pool_warning_stays_off_the_terminal(capsys):
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    try:
        cluster._hide_worker_pool_warning()
        printer = ray_worker.print_to_stdstream
        cluster._hide_worker_pool_warning()  # a second job in the process wraps nothing twice
        assert ray_worker.print_to_stdstream is printer and printer is not original
        printer({"lines": [WARNING], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        printer({"lines": ["ActorDiedError: the actor died", WARNING], "pid": "raylet", "is_err": False},
                ignore_prefix=False)
    finally:
        ray_worker.print_to_stdstream = original
    out = capsys.readouterr().out
    assert "worker processes have been started" not in out and "ActorDiedError: the actor died" in out
