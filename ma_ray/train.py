"""``ma-ray train``: check the input, start the controller actor, follow it.

Everything that can be wrong with the input (config, data path, split, run folder, resume
folder) is checked before the run folder is created or Ray starts, so bad input leaves nothing
behind. The run then holds its folder (``run_folder.RunLock``) and starts its controller, the
named actor ``<control.name>-<job id>``, recorded with the cluster address in ``job.json``. The
controller drives the steps and writes ``metrics.jsonl`` (``control.metrics_log``); this process
polls its history (``HistoryRow``: a step's ``StepMetrics`` and decision) to draw the progress
bar, prints each failure the run recovers from as one line, and starts a new controller when the
controller itself dies or stops answering (``control.heartbeat_timeout_s``). Ray's own messages
about dead workers go to the run folder's ``train.log``, not the terminal. It ends with a few
lines for a person; the whole last record goes to ``summary.json`` in the run folder. A failure
that ends the run is one line (``JobFailed``) with its details in ``train.log`` (in the temporary
folder when the run folder cannot be written).
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from ma_ray.config import Config
from ma_ray.control.client import controller_name, incarnation_name
from ma_ray.control.faults import Failure
from ma_ray.control.metrics_log import MetricsLog
from ma_ray.data import build_dataset
from ma_ray.errors import JobFailed, MaRayError, first_line, one_line
from ma_ray.parallel.emulation import compute_setup
from ma_ray.run_folder import RunLock, write_job
from ma_ray.runtime import checkpoint
from ma_ray.runtime.cluster import init_ray, metrics_address, published_errors_to, release_gpus
from ma_ray.runtime.worker_group import worker_error
from ma_ray.storage import storage_error

POLL_S = 0.5
NAME_RELEASE_S = 30.0
SUMMARY = "summary.json"
LOG = "train.log"  # in the run folder: the details of a failure the terminal shows in one line


def steps_done(checkpoints: Path, resume_step: Optional[int] = None) -> int:
    """Steps a run has done, by the checkpoint a resume starts from (one-line error when there
    is none)."""
    if resume_step is not None:
        return checkpoint.read_meta(checkpoint.at_step(checkpoints, resume_step))["step"] + 1
    return checkpoint.read_meta(checkpoint.latest(checkpoints))["step"] + 1


def resume_point(checkpoints: Path, resume_step: Optional[int] = None) -> Path:
    """The checkpoint a resume continues from: the one of ``resume_step``, else the newest intact
    one (a damaged one is named in one line and passed over)."""
    if resume_step is not None:
        return checkpoint.at_step(checkpoints, resume_step)
    return checkpoint.newest_intact(checkpoints, warn=lambda note: print(note, file=sys.stderr, flush=True))


def train(cfg: Config, out: Path, job_id: str, progress: bool = True, torch_threads: Optional[int] = None,
          resume: Optional[Path] = None) -> dict:
    """Train job ``job_id`` up to step ``train.num_train_steps`` in the run folder ``out`` (new
    or empty; resuming, the run folder of checkpoint ``resume``, chosen by ``resume_point``) at
    ``cfg``'s split (a resume's settled by the caller: the checkpoint's unless another was asked
    for); returns the summary (``text``: the lines for a person, the rest as in ``summary.json``)."""
    # A bad calibration file fails here, before anything starts. The tokens are those of the
    # tensors the workers compute with (the stand-in's under modelled compute).
    compute_cfg, durations = compute_setup(cfg)
    if cfg.emulation.modelled_compute:
        print("modelled compute, time model: " + json.dumps(durations.describe()), flush=True)
    dataset = build_dataset(compute_cfg)
    start = 0 if resume is None else checkpoint.read_meta(resume)["step"] + 1
    steps = cfg.train.num_train_steps
    if torch_threads is None and cfg.cluster.fake_gpus:
        torch_threads = 1  # the emulated GPUs share the machine's cores
    created = not out.exists()
    lock = RunLock(out, job_id, option="--resume" if resume is not None else "--out")
    try:
        try:
            # Workers' own output (Ray's and torch's warnings when a peer dies: C++ stacks) stays
            # in Ray's logs; the terminal gets the progress and one line per failure.
            init_ray(cfg.cluster, namespace=cfg.control.namespace, connect_timeout_s=cfg.control.connect_timeout_s,
                     log_to_driver=False)
        except BaseException:
            if created:  # a run that never started leaves no folder behind
                lock.release()
                shutil.rmtree(out, ignore_errors=True)
            raise
        t0 = time.time()
        try:
            with published_errors_to(out / LOG):
                final = _run(cfg, dataset, out, job_id, steps, start, resume, torch_threads, progress)
        except Exception as exc:
            # The terminal gets one line; the whole story goes to the run folder.
            raise JobFailed(f"{_cause_line(exc)} (details: {_log_failure(out / LOG, job_id, exc)})") from None
    finally:
        lock.release()
    # metrics.jsonl holds one row per step whoever died (the driver may not have seen them all).
    rows = [r for r in MetricsLog(out / "metrics.jsonl").rows() if "event" not in r and r["step"] >= start]
    last = rows[-1] if rows else {}
    summary = {"out": str(out), "job_id": job_id, **last, "state": final["state"],
               "migrations": final["migrations"], "last_checkpoint": final["last_checkpoint"]}
    try:
        (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    except OSError as exc:
        raise storage_error(out / SUMMARY, exc) from None
    return {**summary, "text": describe(summary, rows, time.time() - t0, cfg.total_gpus)}


def _log_failure(log: Path, job_id: str, exc: BaseException) -> str:
    """Append ``exc``'s traceback to ``log``, or, when the run folder cannot be written (the
    failure may be just that), to a file of the temporary folder; returns where it went. Writing
    the details never replaces the failure itself."""
    text = f"{time.strftime('%Y-%m-%d %H:%M:%S')} the run failed\n" + "".join(traceback.format_exception(exc))
    for path in (log, Path(tempfile.gettempdir()) / f"ma-ray-{job_id}-{LOG}"):
        try:
            with open(path, "a") as f:
                f.write(text)
            return str(path)
        except OSError:
            continue
    return "none written: neither the run folder nor the temporary folder can be written"


def launch(cfg: Config, dataset, out: Path, job_id: str, resume: Optional[Path] = None,
           torch_threads: Optional[int] = None, **restart):
    """Start job ``job_id``'s controller on the connected cluster, on this process's node, with
    its config and ``job.json`` in ``out``; returns the controller's handle (its set-up goes on
    in the background). ``restart``: the ``Controller`` arguments of a replacement."""
    from ma_ray.control.controller import Controller

    name, namespace = controller_name(cfg.control.name, job_id), cfg.control.namespace
    try:
        (out / "config.yaml").write_text(cfg.to_yaml())
        # Where a notebook or `ma-ray status --run` finds this job, and only this one.
        write_job(out, {"job_id": job_id, "address": ray.get_runtime_context().gcs_address, "name": name,
                        "namespace": namespace, "metrics": metrics_address(),
                        "connect_timeout_s": cfg.control.connect_timeout_s})
    except OSError as exc:
        raise storage_error(exc.filename or out, exc) from None
    # The controller runs on this process's node (the head, under `ray job submit`): a worker
    # node's loss then costs its workers only, and the controller restarts them elsewhere.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    # A fresh id per job, so the name is free: Ray's registry of named actors is the claim,
    # atomic in the GCS, and two jobs started at once on one head get two names.
    try:
        return Controller.options(name=name, namespace=namespace, scheduling_strategy=here).remote(
            cfg, dataset, str(out), cfg.train.num_train_steps, None if resume is None else str(resume),
            torch_threads, job_id=job_id, **restart)
    except ray.exceptions.ActorAlreadyExistsError:
        raise MaRayError(f"a job named {name!r} is already running in namespace {namespace!r}") from None


def _cause_line(exc: BaseException) -> str:
    """One line of what ended the run: a MaRayError's own message, else ``Type: first line`` of
    the cause under Ray's wrappers (for a controller that failed to start, the last line of its
    creation error, which names the exception)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    if isinstance(exc, MaRayError):
        return one_line(exc)
    if isinstance(exc, ray.exceptions.RayActorError) and exc.actor_init_failed:
        lines = [line.strip() for line in exc.error_msg.splitlines() if line.strip()]
        return f"the controller could not start: {lines[-1] if lines else type(exc).__name__}"
    return first_line(worker_error(exc))


class ControllerStalled(Exception):
    """The controller did not answer the driver within its bound: it is replaced, as a dead one."""


def _answer(ref, timeout_s: float, what: str):
    """``ray.get(ref)`` within ``timeout_s``; ControllerStalled naming ``what`` past it."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ControllerStalled(f"no answer to {what} within {timeout_s:g} s (a stall)") from None


def _run(cfg, dataset, out: Path, job_id: str, steps: int, start: int, resume, torch_threads, progress: bool):
    """Start the controller and follow it to the end; a controller that dies or stops answering
    is replaced by one that continues from the latest checkpoint, within ``train.max_failures``.
    Returns the controller's final status."""
    name, namespace = controller_name(cfg.control.name, job_id), cfg.control.namespace
    seen = _Seen(step=start - 1)
    log = MetricsLog(out / "metrics.jsonl")
    before = len(log.failures())  # an earlier run's, in a resumed folder: not this run's budget
    recovering, deaths = None, 0  # deaths: controllers of this run that died
    # Set-up reserves the GPUs and builds every worker: bounded by what those calls may take.
    setup_s = cfg.cluster.placement_timeout_s + cfg.control.worker_timeout_s + cfg.control.heartbeat_timeout_s
    bar = None
    try:
        while True:
            if recovering is not None:
                _wait_name_free(name, namespace)
            controller = launch(cfg, dataset, out, job_id, resume, torch_threads,
                                recovering=recovering, earlier_failures=log.failures()[before:],
                                workers_name=incarnation_name(name, deaths))
            ready = controller.ping.remote()
            run = controller.run.remote()
            try:
                if not ray.wait([ready, run], num_returns=1, timeout=setup_s)[0]:
                    raise ControllerStalled(f"set-up did not end within {setup_s:g} s (a stall)")
                if bar is None:
                    # Steps done out of the run's total, so a resumed run reads 4/70.
                    bar = tqdm(total=steps, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
                _follow(controller, run, bar, cfg, seen)
                final = ray.get(run)  # raises what the run raised
                break
            except (ray.exceptions.RayActorError, ControllerStalled) as exc:
                if isinstance(exc, ray.exceptions.RayActorError) and exc.actor_init_failed:
                    raise  # not a death: the controller could not start (the cluster cannot hold the job, ...)
                # A dead actor's name is freed once nothing refers to it, and the traceback's
                # frames (``_follow``'s) hold its handle, in a cycle only the collector would break.
                traceback.clear_frames(exc.__traceback__)
                if isinstance(exc, ControllerStalled):
                    ray.kill(controller)  # its workers die with their owner
                controller = run = ready = None
                release_gpus(incarnation_name(name, deaths))  # its workers died with it; its GPUs did not
                # A new controller continues from the latest checkpoint, as after a worker's failure.
                done = log.rows()
                why = str(exc) if isinstance(exc, ControllerStalled) else first_line(worker_error(exc))
                failure = Failure(max((r["step"] for r in done if "step" in r), default=start - 1) + 1,
                                  "controller", {"controller": why}, time.time())
                used = len(log.failures()) - before + 1
                if used > cfg.train.max_failures:
                    log.append(failure.to_dict())
                    raise JobFailed(f"{failure.line()} (failure {used}, more than "
                                    f"train.max_failures={cfg.train.max_failures})") from None
                (bar.write if bar is not None else print)(failure.line() + "; starting a new controller")
                newest = checkpoint.latest_intact(out / "checkpoints", warn=bar.write if bar is not None else print)
                if newest is not None:  # the new controller goes on at the checkpoint's split
                    resume, cfg = newest, cfg.with_split(checkpoint.read_meta(newest)["attention_gpus"])
                # The new one records the failure, and its history starts after its checkpoint.
                resumed = checkpoint.read_meta(newest)["step"] if newest is not None else start - 1
                recovering, seen.failures = failure.to_dict(), used - 1
                seen.step = resumed
                deaths += 1
    finally:
        if bar is not None:
            bar.close()
    ray.kill(controller)
    controller = run = ready = None
    _wait_name_free(name, namespace)  # so that another run in this process can take it
    return final


def _wait_name_free(name: str, namespace: str, timeout_s: float = NAME_RELEASE_S) -> None:
    """Until no actor holds ``name``: a killed or dead controller's name is freed shortly after
    it dies and its handles are dropped. Past ``timeout_s`` the next claim reports it as taken."""
    gc.collect()  # a handle left in a reference cycle keeps the name until it is collected
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)


@dataclass
class _Seen:
    """What the driver has shown of the run so far."""

    step: int  # the newest step whose row it drew
    failures: int = 0  # the controller's failure records shown


def _follow(controller, run, bar, cfg, seen: _Seen) -> None:
    """Draw the progress of ``controller``'s ``run`` until it ends, and print each failure it
    recovers from as one line, once it has recovered (a failure that ends the run is the run's
    error line). Every call to the controller is bounded by ``control.heartbeat_timeout_s``. The
    rows themselves are written by the controller (``control.metrics_log``)."""
    heartbeat_s = cfg.control.heartbeat_timeout_s
    done = False
    while not done:
        done = bool(ray.wait([run], timeout=POLL_S)[0])
        failures = _answer(controller.failures_since.remote(seen.failures), heartbeat_s, "a poll of its failures")
        for i, f in enumerate(failures):
            if f["resumed_from"] is None and i == len(failures) - 1:
                break  # recovering now: shown once it has
            seen.failures += 1
            bar.write(Failure(**f).line())
            if f["resumed_from"] is not None:
                seen.step = min(seen.step, f["resumed_from"])
        for row in _answer(controller.rows_since.remote(seen.step), heartbeat_s, "a poll of its steps"):
            seen.step, m = row.step, row.metrics
            if m.skipped and cfg.train.on_nonfinite == "skip":
                bar.write(f"step {row.step} skipped: the loss is {m.loss} and the gradient norm {m.grad_norm} "
                          f"(train.on_nonfinite=skip)")
            bar.set_description(f"train {m.attention_gpus}A/{cfg.total_gpus - m.attention_gpus}M")
            bar.set_postfix(loss=f"{m.loss:.3f}", tok_s=f"{m.tokens_per_s:.0f}",
                            t_attn=f"{m.t_attention_s * 1e3:.1f}ms",
                            t_moe=f"{m.t_moe_s * 1e3:.1f}ms", refresh=False)
        if bar.n != seen.step + 1:
            bar.n = seen.step + 1
            bar.refresh()


def describe(summary: dict, rows: List[dict], wall_s: float, total_gpus: int) -> str:
    """The run's end as a person reads it, from its rows of ``metrics.jsonl``: steps, first and
    last loss, the splits held, where the metrics, checkpoints and summary are."""
    out = Path(summary["out"])
    lines = [f"{summary['state']}: job {summary['job_id']}, "
             + (f"steps {rows[0]['step']}-{rows[-1]['step']} ({len(rows)} steps) in {_duration(wall_s)}"
                if rows else "no step run")]
    if rows:
        first, last = rows[0], rows[-1]
        lines.append(f"loss {first['loss']:.3f} at step {first['step']}, {last['loss']:.3f} at step {last['step']}")
        spans = []
        for row in rows:
            k = row["attention_gpus"]
            if spans and spans[-1][0] == k:
                spans[-1][2] = row["step"]
            else:
                spans.append([k, row["step"], row["step"]])
        lines.append("split: " + ", ".join(f"{k} attention / {total_gpus - k} MoE GPUs (steps {a}-{b})"
                                           for k, a, b in spans))
    ckpt = summary.get("last_checkpoint")
    lines.append(f"metrics: {out / 'metrics.jsonl'}; checkpoints: "
                 f"{Path(ckpt).parent if ckpt else out / 'checkpoints'} (latest {Path(ckpt).name if ckpt else 'none'}); "
                 f"summary: {out / SUMMARY}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"
