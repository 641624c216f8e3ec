"""One GPU: stream order of every collective backend, one-rank ops, the NCCL watchdog, versions.

    python bench/gpu_comm_checks.py

Everything runs in Ray tasks holding the one GPU (ray.util.collective's groups live in actors and
tasks), on one-rank groups: NCCL takes one rank per GPU, so send/recv and the two-level groups
need several GPUs (bench/gpu_verify.py). Compute runs on a priority stream made current, as in a
worker (runtime.device.RealDevice). Each hazard is made deterministic by a spin kernel
(``torch.cuda._sleep``) that holds one stream for about half a second.

1. Versions: torch, its CUDA and NCCL, cupy and its CUDA and NCCL, Ray, the device.
2. Stream hazards, on three ways of calling:
   ``ray_nccl raw``: Ray's NCCL group called as it is (``ray.util.collective``), no fences;
   ``ray_nccl``: the same group through ``comm.groups`` (its fences);
   ``nccl``: torch's ProcessGroupNCCL through ``comm.groups`` (ma-ray's backend).
   a. late input: the input is written on the compute stream behind the spin; an all-gather
      must send what was written. Raw Ray's NCCL stream waits for cupy's current stream (the
      legacy default stream), not the compute stream: it sends the old contents.
   b. all-gather copy-out: the spin holds the op's own stream; what is read after the op must be
      the gathered data. Raw Ray copies its staging buffer out on the compute stream at once.
      (On ``nccl`` torch's stream is not reachable: the op is issued from a spinning stream and
      its result read on another after ``wait()``.)
   c. reduce-scatter copy-in: the spin holds the compute stream, the input is ready. Raw Ray
      records "inputs ready" before it queues the copy into its staging buffer on the compute
      stream, so NCCL reduces the staging buffer before the copy.
   d. no device-wide barrier: the spin holds an unrelated blocking stream (a receive posted
      ahead on another pair); compute after an all-reduce must not wait for it. The fence ma-ray
      had before (an event on the legacy default stream) waits for it.
   Raw Ray (and the old fence, for d) must fail each one: else the hazard was not reproduced
   and the passes prove nothing. ``ray_nccl`` and ``nccl`` must pass each one.
3. One-rank ops in bf16, fp32, int64 and uint8 on ``nccl`` and ``ray_nccl``: all-reduce,
   reduce, broadcast, all-gather, reduce-scatter, blocking and non-blocking, and a barrier.
4. Destroying the groups leaves no named Ray actor behind (Ray's NCCL group makes one per
   communicator).
5. The watchdog: an ``nccl`` group whose timeout is 2 s all-reduces behind a 20 s spin; torch's
   watchdog must end the op within a few seconds (by default it ends the worker process).

Prints one line per check; exits 1 if any failed (each failure on its own line at the end), 2
without CUDA. Without cupy the ray_nccl checks are reported as not run (a failure: the script
exists to run them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPIN_S = 0.5
DTYPES = (torch.bfloat16, torch.float32, torch.int64, torch.uint8)
RAY, NCCL = "chk-ray", "chk-nccl"
_KEEP = []


def _cycles(seconds: float) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    khz = getattr(props, "clock_rate", 0) or 1_980_000  # the H100's boost clock where torch does not say
    return int(khz * 1e3 * seconds)


def _spin(stream, seconds: float = SPIN_S) -> None:
    with torch.cuda.stream(stream):
        torch.cuda._sleep(_cycles(seconds))


def versions() -> list:
    import ray

    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else "none"
    lines = [f"device: {torch.cuda.get_device_name()}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"NCCL {'.'.join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}", f"ray {ray.__version__}"]
    try:
        import cupy
        from cupy.cuda import nccl as cupy_nccl

        lines.append(f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
                     f"NCCL {cupy_nccl.get_version()}")
    except Exception as exc:  # noqa: BLE001 - reported, the ray_nccl checks then say not run
        lines.append(f"cupy: not usable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return lines


def _ways(have_ray: bool) -> dict:
    """name -> (allgather(outs, x), reducescatter(out, ins), allreduce(t), iallgather(outs, x))."""
    import ray.util.collective as col

    from ma_ray.comm import groups

    ways = {"nccl": (lambda o, x: groups.allgather(o, x, NCCL), lambda o, i: groups.reducescatter(o, i, NCCL),
                     lambda t: groups.allreduce(t, NCCL), lambda o, x: groups.iallgather(o, x, NCCL))}
    if have_ray:
        ways["ray_nccl"] = (lambda o, x: groups.allgather(o, x, RAY), lambda o, i: groups.reducescatter(o, i, RAY),
                            lambda t: groups.allreduce(t, RAY), lambda o, x: groups.iallgather(o, x, RAY))
        ways["ray_nccl raw"] = (lambda o, x: col.allgather(o, x, group_name=RAY),
                                lambda o, i: col.reducescatter(o, i, group_name=RAY),
                                lambda t: col.allreduce(t, group_name=RAY), None)
    return ways


def _ray_stream(dev):
    """Ray's stream for the one-rank group's collectives, as torch sees it."""
    import ray.util.collective as col

    from ma_ray.comm.groups import ray_op_stream

    return torch.cuda.ExternalStream(ray_op_stream(col.get_group_handle(RAY), dev).ptr, device=dev)


def hazards(have_ray: bool) -> list:
    """(check, expected to pass, passed, detail) for every hazard and way of calling.

    What the compute stream reads after an op goes into ``seen``, allocated before the op: a
    buffer allocated after it could be the block of Ray's freed staging buffer, which NCCL may
    still write, and would then hide the hazard."""
    dev, n = torch.device("cuda"), 1 << 22
    compute = torch.cuda.current_stream(dev)
    out = []
    for way, (allgather, reducescatter, allreduce, iallgather) in _ways(have_ray).items():
        expect = way != "ray_nccl raw"
        # a. late input
        data, x, seen = torch.rand(n, device=dev), torch.zeros(n, device=dev), torch.empty(n, device=dev)
        outs = [torch.full_like(x, -1.0)]
        torch.cuda.synchronize()
        _spin(compute)
        x.copy_(data)
        allgather(outs, x)
        seen.copy_(outs[0])
        torch.cuda.synchronize()
        out.append((f"late input, all-gather, {way}", expect, torch.equal(seen, data), ""))
        # b. the op's own stream busy
        data = torch.rand(n, device=dev)
        outs = [torch.full_like(data, -1.0)]
        torch.cuda.synchronize()
        if way == "nccl":
            side = torch.cuda.Stream(dev)
            _spin(side)
            with torch.cuda.stream(side):
                handle = iallgather(outs, data)
            handle.wait()
        else:
            _spin(_ray_stream(dev))
            allgather(outs, data)
        seen.copy_(outs[0])
        torch.cuda.synchronize()
        out.append((f"all-gather copy-out behind a busy comm stream, {way}", expect, torch.equal(seen, data), ""))
        # c. reduce-scatter copy-in
        data = torch.rand(n, device=dev)
        result = torch.full_like(data, -1.0)
        torch.cuda.synchronize()
        _spin(compute)
        reducescatter(result, [data])
        seen.copy_(result)
        torch.cuda.synchronize()
        out.append((f"reduce-scatter copy-in, {way}", expect, torch.equal(seen, data), ""))
        # d. no device-wide barrier (raw Ray orders nothing after the op: the old fence instead)
        if not have_ray:
            out.append((f"no wait for an unrelated blocking stream, {way}", True, False,
                        "not run: its blocking stream is made with cupy"))
            continue
        fences = {"ray_nccl raw": "ray_nccl, the old fence (event on the legacy default stream)"}
        t = torch.ones(1024, device=dev)
        torch.cuda.synchronize()
        blocking = _blocking_stream(dev)
        _spin(blocking, 4 * SPIN_S)
        start = time.perf_counter()
        if way == "ray_nccl raw":
            _old_fence(lambda: allreduce(t), dev)
        else:
            allreduce(t)
        after = torch.cuda.Event()
        after.record(compute)
        after.synchronize()
        waited = time.perf_counter() - start
        torch.cuda.synchronize()
        out.append((f"no wait for an unrelated blocking stream, {fences.get(way, way)}", expect, waited < 2 * SPIN_S,
                    f"compute waited {waited:.2f} s behind a {4 * SPIN_S:.1f} s spin"))
    return out


def _blocking_stream(dev):
    """A blocking stream like Ray's (cupy's default flags): torch's own streams are non-blocking."""
    import cupy

    with cupy.cuda.Device(dev.index or 0):
        stream = cupy.cuda.Stream(non_blocking=False)
    _KEEP.append(stream)  # cupy destroys a stream it no longer references
    return torch.cuda.ExternalStream(stream.ptr, device=dev)


def _old_fence(run, dev) -> None:
    """What comm.groups did before: cupy's current stream = torch's, then an event recorded on
    the legacy default stream, which every earlier op of every blocking stream precedes."""
    import cupy

    with cupy.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream, dev.index or 0):
        run()
    done = torch.cuda.Event()
    done.record(torch.cuda.default_stream(dev))
    torch.cuda.current_stream(dev).wait_event(done)


def one_rank_ops(group: str) -> list:
    from ma_ray.comm import groups

    dev, out = torch.device("cuda"), []
    for dtype in DTYPES:
        if dtype.is_floating_point:
            x = torch.randn(1000, device=dev).to(dtype)
        elif dtype == torch.int64:
            x = torch.randint(-2 ** 62, 2 ** 62, (1000,), device=dev)  # beyond float64's exact range
        else:
            x = torch.randint(0, 256, (1000,), device=dev, dtype=dtype)
        results = {}
        for name, run in (
                ("allreduce", lambda t: groups.allreduce(t, group)),
                ("reduce", lambda t: groups.reduce(t, 0, group)),
                ("broadcast", lambda t: groups.broadcast(t, 0, group)),
                ("iallreduce", lambda t: groups.iallreduce(t, group).wait()),
                ("ibroadcast", lambda t: groups.ibroadcast(t, 0, group).wait())):
            t = x.clone()
            run(t)
            results[name] = t
        outs = [torch.empty_like(x)]
        groups.allgather(outs, x, group)
        results["allgather"] = outs[0]
        outs = [torch.empty_like(x)]
        groups.iallgather(outs, x, group).wait()
        results["iallgather"] = outs[0]
        r = torch.empty_like(x)
        groups.reducescatter(r, [x], group)
        results["reducescatter"] = r
        r = torch.empty_like(x)
        groups.ireducescatter(r, [x], group).wait()
        results["ireducescatter"] = r
        groups.barrier(group)
        torch.cuda.synchronize()
        wrong = [name for name, t in results.items() if not torch.equal(t, x)]
        out.append((f"one-rank ops in {str(dtype).replace('torch.', '')}, {group}", True, not wrong,
                    f"wrong: {', '.join(wrong)}" if wrong else ""))
    return out


def _in_task(have_ray: bool) -> dict:
    from ma_ray.comm import groups

    torch.cuda.set_stream(torch.cuda.Stream(priority=torch.cuda.current_stream().priority_range()[1]))
    groups.create_group(NCCL, ["me"], 0, backend="nccl", timeout_ms=120_000)
    if have_ray:
        groups.create_group(RAY, ["me"], 0, backend="ray_nccl")
    checks = hazards(have_ray) + one_rank_ops(NCCL) + (one_rank_ops(RAY) if have_ray else [])
    for name in (NCCL, RAY) if have_ray else (NCCL,):
        groups.destroy_group(name)
    return {"versions": versions(), "checks": checks}


def _watchdog_task() -> str:
    """Never returns normally if the watchdog works: the op cannot start for 20 s, the group's
    timeout is 2 s."""
    from ma_ray.comm import groups

    groups.create_group("chk-timeout", ["me"], 0, backend="nccl", timeout_ms=2000)
    t = torch.ones(16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(_cycles(20.0))
    groups.allreduce(t, "chk-timeout")  # waits for the spin on the device; the host goes on
    torch.cuda.synchronize()
    return "the op completed after the spin: no timeout fired"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU", file=sys.stderr)
        return 2
    import ray

    try:
        import cupy  # noqa: F401

        have_ray = True
    except ImportError:
        have_ray = False
    ray.init(num_gpus=1, include_dashboard=False, logging_level="error",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    failed = []
    try:
        named = len(ray.util.list_named_actors(all_namespaces=True))
        task = ray.remote(num_gpus=1, max_retries=0)(_in_task)
        report = ray.get(task.remote(have_ray), timeout=600)
        left = len(ray.util.list_named_actors(all_namespaces=True)) - named
        for line in report["versions"]:
            print(line, flush=True)
        if not have_ray:
            failed.append("ray_nccl checks: not run (cupy cannot be imported; pip install -e \".[gpu]\")")
        for name, expect_pass, passed, detail in report["checks"]:
            good = passed == expect_pass
            verdict = ("ok" if passed else "hazard reproduced, as expected") if good else (
                "FAILED" if expect_pass else "FAILED to reproduce the hazard")
            line = f"{name}: {verdict}{f' ({detail})' if detail else ''}"
            print(line, flush=True)
            if not good:
                failed.append(line)
        # Ray's NCCL group makes a detached rendezvous actor per communicator; destroy must end them.
        line = f"rendezvous actors left by the groups' destroy: {left}: {'ok' if left == 0 else 'FAILED'}"
        print(line, flush=True)
        if left:
            failed.append(line)
        start = time.perf_counter()
        try:
            outcome = ray.get(ray.remote(num_gpus=1, max_retries=0)(_watchdog_task).remote(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            outcome = "nothing ended the op within 120 s"
        except Exception as exc:  # noqa: BLE001 - the watchdog ended the op: what we want
            first = str(exc).strip().splitlines()
            outcome = None
            print(f"NCCL watchdog: the op ended after {time.perf_counter() - start:.1f} s "
                  f"({type(exc).__name__}: {first[0][:160] if first else ''}): ok", flush=True)
        if outcome is not None:
            failed.append(f"NCCL watchdog: FAILED ({outcome})")
            print(failed[-1], flush=True)
    finally:
        ray.shutdown()
    for line in failed:
        print(f"failed: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
