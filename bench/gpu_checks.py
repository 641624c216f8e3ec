"""The checks that need a GPU, prepared to run in a few minutes on one lent device (one GPU holds
one NCCL rank: what needs several is bench/gpu_verify.py; see docs/gpu.md).

    python bench/gpu_checks.py [--micro-batch 4]

1. bf16 autocast with activation checkpointing on CUDA, the paper preset's training path: an
   attention shard and an expert group at small shapes give the same outputs and gradients with
   and without ``torch.utils.checkpoint`` (bf16 tolerance), and match their fp32 results
   within ``ma_ray.verify.run.BF16_TOLERANCE``'s gradient bound.
2. CUDA-event timing (``runtime.device.RealDevice``): a compute region's timed seconds equal the
   device time of its kernels (host-synchronised wall clock around the same work), while the
   host returns before the kernels finish.
3. A wait's timing (``RealDevice.waiting``): while a side stream runs a 200 ms kernel that the
   compute stream must wait for, the wait is timed at the stall's device time, the host returns
   at once, and the compute region after it is not charged for the stall.
4. The collectives' stream order, one-rank ops, the NCCL watchdog and the library versions:
   ``bench/gpu_comm_checks.py``, run as a script.
5. Modelled-compute messages with CUDA chunks (``runtime.transport.pack_block``/``unpack_block``):
   a block of CUDA chunks packs and unpacks on the device, stamps intact.
6. Stream priorities (``runtime.device.cuda_priority``): the attention pool's current stream
   has the device's highest priority, the MoE pool's its default, and regions are timed on them.
7. Throughput of an attention shard and an expert group at the seed's shapes
   (``bench/gpu_shard_throughput.py``).

Prints one line per check and exits 1 if a check fails, 2 without CUDA.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from ma_ray import config as C
from ma_ray.model.attention import AttentionShard
from ma_ray.model.experts import ExpertGroup
from ma_ray.runtime.device import RealDevice
from ma_ray.verify.run import BF16_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def check_bf16_checkpointing(dev: torch.device) -> bool:
    cfg = C.load(ROOT / "cluster/local-cpu.yaml")
    m = cfg.model
    torch.manual_seed(0)
    shard, group = AttentionShard(m, [0, 1, 2]).to(dev), ExpertGroup(m, [0, 1]).to(dev)
    for p in list(shard.parameters()) + list(group.parameters()):
        torch.nn.init.normal_(p, std=m.initializer_range)
    shard.train(False)
    h = torch.randn(2, cfg.train.seq_length, m.hidden_size, device=dev)
    rows = torch.randn(40, m.hidden_size, device=dev)

    def run(module, x, *args, bf16: bool, ckpt: bool):
        leaf = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else torch.autocast(dev.type, enabled=False)
        with ctx:
            out = checkpoint(module, leaf, *args, use_reentrant=False) if ckpt else module(leaf, *args)
        out.float().square().sum().backward()
        return out.detach(), leaf.grad.detach(), [p.grad.detach().clone() for p in module.parameters()]

    ok = True
    for name, module, x, args in (("attention shard", shard, h, ()), ("expert group", group, rows, ([25, 15],))):
        plain, ckpt, exact = (run(module, x, *args, bf16=True, ckpt=False), run(module, x, *args, bf16=True, ckpt=True),
                              run(module, x, *args, bf16=False, ckpt=False))
        same = max(_rel(a, b) for a, b in zip([ckpt[0], ckpt[1], *ckpt[2]], [plain[0], plain[1], *plain[2]]))
        vs_fp32 = max(_rel(a, b) for a, b in zip([plain[1], *plain[2]], [exact[1], *exact[2]]))
        good = same <= 1e-2 and vs_fp32 <= BF16_TOLERANCE["grad_rel_err"]
        ok &= good
        print(f"bf16 + checkpointing, {name}: checkpointed vs not {same:.2e}, bf16 vs fp32 gradients "
              f"{vs_fp32:.2e} (bound {BF16_TOLERANCE['grad_rel_err']}): {'ok' if good else 'FAILED'}")
    return ok


def check_event_timing(dev: torch.device) -> bool:
    device = RealDevice(dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    device.timer.reset()
    wall0 = time.perf_counter()
    with device.compute("work"):
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
    host_s = time.perf_counter() - wall0
    torch.cuda.synchronize()
    device_s = time.perf_counter() - wall0
    timed = device.timer.totals()["work"]
    good = abs(timed - device_s) <= 0.1 * device_s and host_s < 0.5 * device_s
    print(f"CUDA-event timing: timed {timed * 1e3:.1f} ms, device {device_s * 1e3:.1f} ms, host returned after "
          f"{host_s * 1e3:.1f} ms: {'ok' if good else 'FAILED'}")
    return good


def check_wait_timing(dev: torch.device) -> bool:
    device = RealDevice(dev)
    x = torch.randn(2048, 2048, device=dev)
    side = torch.cuda.Stream()
    cycles = int(torch.cuda.get_device_properties(dev).clock_rate * 1e3 * 0.2)  # kHz -> ~200 ms
    torch.cuda.synchronize()
    device.timer.reset()
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)  # stands for a transfer on NCCL's stream
        arrived = torch.cuda.Event()
        arrived.record()
    wall0 = time.perf_counter()
    with device.waiting("wait"):
        torch.cuda.current_stream().wait_event(arrived)
    host_s = time.perf_counter() - wall0
    with device.compute("after"):
        x = x @ x
    torch.cuda.synchronize()
    stall_s = time.perf_counter() - wall0
    timed = device.timer.totals()
    good = (abs(timed["wait"] - stall_s) <= 0.15 * stall_s and host_s < 0.1 * stall_s
            and timed["after"] < 0.25 * stall_s)
    print(f"wait timing: wait timed {timed['wait'] * 1e3:.1f} ms of a {stall_s * 1e3:.1f} ms stall, host returned "
          f"after {host_s * 1e3:.2f} ms, the compute after it {timed['after'] * 1e3:.1f} ms: "
          f"{'ok' if good else 'FAILED'}")
    return good


def check_modelled_messages(dev: torch.device) -> bool:
    from ma_ray.runtime.transport import pack_block, unpack_block

    chunks = [torch.randn(3, 5, device=dev, dtype=torch.bfloat16), torch.randn(2, 5, device=dev, dtype=torch.bfloat16)]
    stamps = [(1.5, 100.0), (2.5, 200.0)]
    message = pack_block(chunks, stamps)
    bufs = [torch.empty_like(c) for c in chunks]
    back = unpack_block(message, bufs)
    good = message.device == chunks[0].device and [tuple(s) for s in back] == stamps and all(
        torch.equal(a, b) for a, b in zip(bufs, chunks))
    print(f"modelled messages with CUDA chunks: {'ok' if good else 'FAILED'}")
    return good


def check_stream_priorities(dev: torch.device) -> bool:
    """``RealDevice`` with the method's priorities (``comm.*_stream_priority``): the attention
    pool's work runs on a current stream of the device's highest priority, the MoE pool's on one
    of its default; a region is timed on it."""
    least, greatest = torch.cuda.current_stream(dev).priority_range()
    got = {}
    for pool, seed in (("attention", 0), ("moe", 1)):
        device = RealDevice(dev, seed)
        with device.compute("work"):
            torch.randn(1024, 1024, device=dev).matmul(torch.randn(1024, 1024, device=dev))
        device.synchronize()
        got[pool] = (torch.cuda.current_stream(dev).priority, device.timer.totals()["work"] > 0)
    good = got == {"attention": (greatest, True), "moe": (least, True)}
    print(f"stream priorities (range {least} .. {greatest}): {got}: {'ok' if good else 'FAILED'}")
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4, help="for the throughput check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok = all([check_bf16_checkpointing(dev), check_event_timing(dev), check_wait_timing(dev),
              check_modelled_messages(dev), check_stream_priorities(dev)])
    for script in (["bench/gpu_comm_checks.py"], ["bench/gpu_shard_throughput.py", "--micro-batch", str(args.micro_batch)]):
        ran = subprocess.run([sys.executable, str(ROOT / script[0]), *script[1:]], cwd=ROOT)
        if ran.returncode != 0:
            print(f"failed: {script[0]} exited {ran.returncode}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
