"""Modelled compute on a real emulated job: measured stage times are the model's, and the numbers
are those of the stand-in model computing for real."""

from __future__ import annotations

import math

import pytest

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.parallel.emulation import stand_in_config
from ma_ray.runtime.worker_set import WorkerSet


def test_emulated_job_measures_the_time_model(ray_cluster, tmp_path):
    """Constant stage times from a calibration file (50 ms attention, 80 ms MoE, whatever the
    split): every stage is queued on the emulated device for that long, so the measured
    per-stage times are those, with one micro-batch in flight and with two. (What two in flight
    save is timed in ``bench/pipeline.py``: a timed assertion here fails on a loaded machine.)
    Emulation changes timing, never the numbers: with 3-row chunks, so blocks
    of several chunks travel as one message, the losses are those of the stand-in model
    computing for real."""
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text("attn_time_coef: [0.05, 0, 0]\nmoe_time_coef: [0.08, 0, 0]\n")
    losses = {}

    def run(cfg, steps=3):
        job = WorkerSet(cfg, build_dataset(stand_in_config(cfg)), torch_threads=1)
        try:
            return [job.step(step) for step in range(steps)]
        finally:
            job.shutdown()

    for in_flight in (1, 2):
        cfg = C.load("cluster/local-cpu.yaml").replace(**{
            "cluster.num_nodes": 2, "cluster.gpus_per_node": 3, "cluster.attention_gpus": 4,
            "balance.min_attention_gpus": 1, "model.num_layers": 2, "train.batch_size": 16,
            "train.gradient_accumulation_steps": 2, "schedule.micro_batches_in_flight": in_flight,
            "schedule.communication_chunk_size": 48,  # 512 tokens stand in for 32: 3 stand-in rows
            "emulation.modelled_compute": True, "emulation.calibration_file": str(calibration),
            "emulation.stand_in_seq_length": 16})
        rows = run(cfg)
        for row in rows:
            assert row.t_attention_s == pytest.approx(0.05, rel=0.1), row
            assert row.t_moe_s == pytest.approx(0.08, rel=0.1), row
            assert math.isfinite(row.loss) and 0.0 <= row.overlap_efficiency <= 1.0
        losses[in_flight] = [row.loss for row in rows]

    real = stand_in_config(cfg).replace(**{"emulation.modelled_compute": False, "schedule.communication_chunk_size": 3})
    expected = [row.loss for row in run(real)]
    for in_flight in (1, 2):
        assert losses[in_flight] == pytest.approx(expected, rel=1e-5), (in_flight, losses, expected)
