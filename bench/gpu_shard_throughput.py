"""Stage throughput on one GPU: one attention shard of 3 heads and one expert group of 4 experts
at the seed's shapes (hidden 4096, seq 2048, expert hidden 16384), bf16 autocast, forward and
backward, timed with CUDA events; prints each one's time, its model TFLOP/s and their fraction
of the GPU's dense bf16 peak (``--peak-tflops``, default the H100 SXM's 989).

    python bench/gpu_shard_throughput.py [--micro-batch 4] [--repeats 10] [--peak-tflops 989]

Model FLOPs count the matmuls only: forward as below, backward twice the forward (activation
recomputation not counted), causal attention's scores and context halved (the flash kernel
skips the masked half). The micro-batch is cut from the seed's 64 to fit one GPU. Expert rows
per expert are the seed's capacity for that micro-batch (capacity_factor 1.0, top-2, 16
experts). A rate above the peak means the count or the timing is wrong: that fails (exit 1).
On a machine without CUDA it says so and exits 2 (there is nothing meaningful to time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ma_ray import config as C
from ma_ray.model.attention import AttentionShard
from ma_ray.model.experts import ExpertGroup
from ma_ray.model.router import capacity

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H100 SXM datasheet, dense (no sparsity)


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the GPU's dense bf16 peak (default: H100 SXM, 989; H200 the same, H100 PCIe 756)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark times GPU kernels", file=sys.stderr)
        return 2
    cfg = C.load(ROOT / "cluster/paper-16gpu.yaml")
    m = cfg.model
    dev, b, t, h, d = torch.device("cuda"), args.micro_batch, cfg.train.seq_length, m.hidden_size, m.attention_head_size
    heads, experts = [0, 1, 2], [0, 1, 2, 3]

    shard = AttentionShard(m, heads).to(dev)
    group = ExpertGroup(m, experts).to(dev)
    for p in list(shard.parameters()) + list(group.parameters()):
        torch.nn.init.normal_(p, std=m.initializer_range)
    shard.train(False)  # dropout off: time the arithmetic

    x = torch.randn(b, t, h, device=dev, requires_grad=True)
    rows = capacity(b * t, cfg.moe.top_k, cfg.moe.num_experts, cfg.moe.capacity_factor)
    r = torch.randn(rows * len(experts), h, device=dev, requires_grad=True)

    def attention():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = shard(x)
        out.float().sum().backward()

    def experts_fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = group(r, [rows] * len(experts))
        out.float().sum().backward()

    w = len(heads) * d
    # fwd: QKV (3 x 2*b*t*h*w), scores + context (2 x 2*b*t*t*w, halved by causality), O (2*b*t*w*h);
    # bwd ~ 2x fwd.
    attn_flops = 3 * (3 * 2 * b * t * h * w + 2 * 2 * b * t * t * w / 2 + 2 * b * t * w * h)
    expert_flops = 3 * len(experts) * 2 * (2 * rows * h * m.intermediate_size)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak {args.peak_tflops:g} TFLOP/s")
    failed = []
    for name, fn, flops in (("attention shard (3 heads)", attention, attn_flops),
                            (f"expert group (4 experts x {rows} rows)", experts_fn, expert_flops)):
        s = timed(fn, args.repeats)
        rate = flops / s / 1e12
        line = (f"{name}: micro-batch {b} x {t}, fwd+bwd {s * 1e3:.2f} ms, {rate:.1f} TFLOP/s, "
                f"{100 * rate / args.peak_tflops:.1f} % of peak")
        print(line, flush=True)
        if not 0 < rate <= args.peak_tflops:
            failed.append(f"{line}: FAILED (above the peak: the FLOP count or the timing is wrong)")
    for line in failed:
        print(f"failed: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
