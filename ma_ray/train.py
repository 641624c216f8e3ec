"""``ma-ray train``: bring up the job, run the steps, show progress, write metrics.

Everything that can be wrong with the input (config, data path, split) is checked before the
output folder is created or any Ray actor starts, so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from ma_ray.config import Config
from ma_ray.data import build_dataset
from ma_ray.parallel.placement import make_plan
from ma_ray.runtime.cluster import connect
from ma_ray.runtime.job import TrainingJob


def train(cfg: Config, out: Path, steps: Optional[int] = None, progress: bool = True,
          torch_threads: Optional[int] = None) -> dict:
    """Train ``steps`` optimizer steps (default ``train.num_train_steps``); returns the last metrics."""
    dataset = build_dataset(cfg)
    make_plan(cfg)  # the split is checked before anything is written
    steps = cfg.train.num_train_steps if steps is None else steps
    if torch_threads is None and cfg.cluster.emulate:
        torch_threads = 1  # 16 emulated GPUs share the machine's cores
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    connect(cfg.cluster)
    job = TrainingJob(cfg, dataset, torch_threads=torch_threads)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_length
    last: dict = {}
    try:
        with open(out / "metrics.jsonl", "a") as log, \
                tqdm(total=steps, desc=f"train {job.plan.attention_gpus}A/{job.plan.moe_gpus}M",
                     disable=not progress, dynamic_ncols=True) as bar:
            for step in range(steps):
                t0 = time.perf_counter()
                metrics = job.step(step)
                elapsed = time.perf_counter() - t0
                last = {"step": step, **metrics, "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed}
                log.write(json.dumps(last) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                t_attn=f"{metrics['t_attention_s'] * 1e3:.1f}ms",
                                t_moe=f"{metrics['t_moe_s'] * 1e3:.1f}ms", refresh=False)
                bar.update()
    finally:
        job.shutdown()
    return last
