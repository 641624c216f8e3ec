"""``ma-ray train``: check the input, start the controller actor, follow it, write metrics.

Everything that can be wrong with the input (config, data path, split, resume folder) is checked
before the output folder is created or any Ray actor starts, so bad input leaves nothing behind.
The controller drives the steps; this process only polls its history (``HistoryRow``: a step's
``StepMetrics`` and decision) to draw the progress bar and append ``metrics.jsonl`` (one
``HistoryRow.to_dict()`` a line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import ray
from tqdm import tqdm

from ma_ray.config import Config
from ma_ray.data import build_dataset
from ma_ray.errors import MaRayError
from ma_ray.parallel.emulation import compute_setup
from ma_ray.parallel.placement import make_plan
from ma_ray.runtime import checkpoint
from ma_ray.runtime.cluster import connect

POLL_S = 0.5


def train(cfg: Config, out: Path, steps: Optional[int] = None, progress: bool = True,
          torch_threads: Optional[int] = None, resume: Optional[Path] = None,
          attention_gpus: Optional[int] = None) -> dict:
    """Train up to step ``steps`` (default ``train.num_train_steps``); returns the last metrics."""
    from ma_ray.control.controller import Controller

    # A bad calibration file fails here, before anything starts. The tokens are those of the
    # tensors the workers compute with (the stand-in's under modelled compute).
    compute_cfg, durations = compute_setup(cfg)
    if cfg.emulation.modelled_compute:
        print("modelled compute, time model: " + json.dumps(durations.describe()), flush=True)
    dataset = build_dataset(compute_cfg)
    start = 0
    if resume is not None:
        meta = checkpoint.read_meta(checkpoint.latest(resume))
        start = meta["step"] + 1
        attention_gpus = meta["attention_gpus"] if attention_gpus is None else attention_gpus
    make_plan(cfg, attention_gpus)  # the split is checked before anything is written
    steps = cfg.train.num_train_steps if steps is None else steps
    if torch_threads is None and cfg.cluster.fake_gpus:
        torch_threads = 1  # the emulated GPUs share the machine's cores
    connect(cfg.cluster, namespace=cfg.control.namespace)
    name, namespace = cfg.control.name, cfg.control.namespace
    try:
        ray.get_actor(name, namespace=namespace)
        raise MaRayError(f"a job named {name!r} is already running in namespace {namespace!r} "
                         f"(set control.name to run another)")
    except ValueError:
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    # Where to attach a notebook or `ma-ray status` (--address) to this job.
    (out / "job.json").write_text(json.dumps({"address": ray.get_runtime_context().gcs_address,
                                              "name": name, "namespace": namespace}) + "\n")
    controller = Controller.options(name=name, namespace=namespace).remote(
        cfg, dataset, str(out), steps, None if resume is None else str(resume), attention_gpus, torch_threads)
    run = controller.run.remote()
    last: dict = {}
    last_step = start - 1
    with open(out / "metrics.jsonl", "a") as log, \
            tqdm(total=max(0, steps - start), desc="train", disable=not progress, dynamic_ncols=True) as bar:
        done = False
        while not done:
            done = bool(ray.wait([run], timeout=POLL_S)[0])
            for row in ray.get(controller.rows_since.remote(last_step)):
                last, last_step, m = row.to_dict(), row.step, row.metrics
                log.write(json.dumps(last) + "\n")
                bar.set_description(f"train {m.attention_gpus}A/{cfg.total_gpus - m.attention_gpus}M")
                bar.set_postfix(loss=f"{m.loss:.3f}", tok_s=f"{m.tokens_per_s:.0f}",
                                t_attn=f"{m.t_attention_s * 1e3:.1f}ms",
                                t_moe=f"{m.t_moe_s * 1e3:.1f}ms", refresh=False)
                bar.update()
            log.flush()
    final = ray.get(run)  # raises what the run raised
    ray.kill(controller)
    return {**last, "state": final["state"], "migrations": final["migrations"],
            "last_checkpoint": final["last_checkpoint"]}
