"""Paper-scale emulation without Ray: the time model, the stand-in shapes, bad calibration input,
the modelled messages' framing and the analytic pipeline."""

from __future__ import annotations


import pytest
import torch

from ma_ray import config as C
from ma_ray.cli import main
from ma_ray.config import ConfigError
from ma_ray.parallel.emulation import stage_durations, stand_in_config
from ma_ray.parallel.step_time import ideal_pass_s, ideal_step_s, overlap_efficiency
from ma_ray.parallel.time_model import predict_stage_times
from ma_ray.parallel.placement import make_plan
from ma_ray.parallel.workload import Workload
from ma_ray.runtime.transport import _landing, pack_block, unpack_block

PAPER = "cluster/paper-16gpu.yaml"


def test_time_model_is_the_seed_formula_at_the_reference_split():
    cfg = C.load(PAPER)
    d = stage_durations(cfg)
    ref = Workload(cfg).shape(cfg.cluster.attention_gpus)
    seed = predict_stage_times(cfg, make_plan(cfg))
    assert d.attention_stage_s(ref.heads, ref.tokens) == pytest.approx(seed.t_attention_s, rel=1e-12)
    assert d.moe_stage_s(ref.experts, ref.rows) == pytest.approx(seed.t_moe_s, rel=1e-12)
    # Fewer attention GPUs: more heads and tokens each, so a slower attention stage.
    at8 = Workload(cfg).shape(8)
    assert d.attention_stage_s(at8.heads, at8.tokens) > seed.t_attention_s
    assert d.moe_stage_s(at8.experts, at8.rows) < seed.t_moe_s
    # A 1024-token chunk of bf16 4096-wide rows, 8 MiB, over the network at 50 GB/s.
    assert d.rows_bytes(1) * 1024 / d.token_scale / d.bandwidth(False) == pytest.approx(1024 * 4096 * 2 / 50e9)


def test_stand_in_keeps_the_layout_and_shrinks_the_tensors():
    cfg = C.load(PAPER, ["emulation.modelled_compute=true"])
    w = stand_in_config(cfg)
    for key in ("num_layers", "num_attention_heads"):
        assert getattr(w.model, key) == getattr(cfg.model, key)
    assert (w.moe.num_experts, w.moe.top_k, w.train.gradient_accumulation_steps) == (16, 2, 16)
    assert (w.model.hidden_size, w.train.seq_length, w.train.micro_batch_size) == (64, 64, 2)
    assert make_plan(w).to_dict() == make_plan(cfg).to_dict()


def test_bad_calibration_file_is_one_line(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ConfigError, match=r"^emulation.calibration_file: not found"):
        stage_durations(C.load(PAPER, [f"emulation.calibration_file={missing}"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("attn_time_coef: [1, 2]\nmoe_time_coef: [0, 0, 0]\n")
    with pytest.raises(ConfigError, match=r"needs attn_time_coef: three non-negative numbers$"):
        stage_durations(C.load(PAPER, [f"emulation.calibration_file={bad}"]))


def test_train_rejects_a_bad_calibration_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--emulate-compute", "--out", str(out), "--set",
                 f"emulation.calibration_file={tmp_path / 'none.yaml'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "calibration_file: not found" in err
    assert not out.exists()


def test_verify_refuses_emulation():
    from ma_ray.verify import verify
    with pytest.raises(ConfigError, match="verify compares real arithmetic"):
        verify(C.load(PAPER, ["emulation.modelled_compute=true"]))


def test_block_framing_round_trips_any_row_size():
    """An emulated block's chunks and stamps come back exactly, also when a chunk's bytes are not
    a multiple of 8 (bf16 rows of 5 two-wide heads: 20 bytes), so the stamps start unaligned."""
    chunks = [torch.randn(n, 10).to(torch.bfloat16) for n in (3, 1, 2)]
    stamps = [(1_790_000_000.123456, 0.5, 1.5e6), (1_790_000_000.5, 0.0, 0.0), (1_790_000_001.25, 7.75, 3e9)]
    message = pack_block(chunks, stamps)
    bufs = [torch.empty_like(c) for c in chunks]
    assert [tuple(s) for s in unpack_block(message, bufs)] == stamps
    for buf, chunk in zip(bufs, chunks):
        assert torch.equal(buf, chunk)


def test_block_framing_stays_on_the_chunks_device():
    """A block of chunks on a device (``meta`` stands for a GPU: it has shapes and a device but no
    data) is packed on that device: stamps included, nothing is joined across devices (torch.cat
    refuses a meta tensor beside a CPU one, as it refuses a CUDA one), and the message has the
    size its landing buffer on the receiver has. The bytes themselves are checked on CPU above."""
    chunks = [torch.empty(n, 10, dtype=torch.bfloat16, device="meta") for n in (3, 1, 2)]
    stamps = [(1_790_000_000.5, 0.25, 1.5e6)] * 3  # the transport's: wall clock, device clock, bytes
    message = pack_block(chunks, stamps)
    assert message.device.type == "meta" and message.dtype == torch.uint8
    assert message.shape == (sum(c.numel() * 2 for c in chunks) + 24 * len(chunks),)
    landing = _landing([torch.empty_like(c) for c in chunks])
    assert landing.device.type == "meta" and landing.shape == message.shape
    with pytest.raises(RuntimeError):  # what the old framing did: CPU stamps beside device chunks
        torch.cat([chunks[0].view(-1).view(torch.uint8), torch.zeros(16, dtype=torch.uint8)])


def test_ideal_pipeline():
    # One micro-batch: the pools take turns over every layer.
    assert ideal_pass_s(1.0, 3.0, 0.5, 1, 4) == pytest.approx(4 * (1 + 3 + 1))
    # Deep enough to cover a round trip: the formula, busiest pool always busy.
    assert ideal_pass_s(1.0, 3.0, 0.5, 4, 4) == pytest.approx(1 + 3 + 1 + 3 * 15)
    # Groups of 4, 4 and 2 micro-batches, forward then backward each.
    want = sum(ideal_pass_s(1, 2, 0.1, m, 2) + ideal_pass_s(2, 4, 0.1, m, 2) for m in (4, 4, 2))
    assert ideal_step_s((1, 2), (2, 4), 0.1, 10, 4, 2) == pytest.approx(want)
    # The lighter pool fully hidden but for its first stage of the pass: 1 - 1 / (m L).
    assert overlap_efficiency(16.0, 48.0, ideal_pass_s(1.0, 3.0, 0.0, 4, 4)) == pytest.approx(15 / 16)
