"""Throughput of the gradient-compression kernels (ma_ray/comm/compression.py) on this CPU, and
the bytes a member sends per entry with each cross-node scheme.

Kernels: ``compress`` (top-k per block + quantisation + packing), ``decompress_add_`` (decode
one message and add it into a dense fp32 buffer), ``ErrorFeedback.compress`` (compress plus
the residual update) and the dense alternative's casts (fp32 -> bf16 -> fp32), in GB/s of fp32 input (4 bytes per entry of the piece), at a few sizes,
single-threaded like the workers (``torch.set_num_threads(1)``). The machine is shared and
noisy, so a baseline on the same tensor is timed right before every kernel call: ``x.clone()``
(a plain copy of the input, into freshly allocated memory as the kernels' temporaries are:
above ~1M entries that includes the page faults); the ratio of the kernel's median to the clones' median is printed
next to the absolute figure. A GPU runs the same batched ops; these are CPU figures only.

Bytes: per entry of a piece, what one member sends on the cross-node level at N members:
a dense fp32 and a bf16 ring all-reduce (2 (N-1)/N * 4 or 2), the sparse all-gather of the
messages ((N-1) * message_bytes / numel), and, for comparison, the same all-gather if the
kept entries were sent as int32 index + fp32 value (8 bytes each, no scales).

    flock /tmp/ma-ray-heavy.lock /work/venv/bin/python bench/compression_kernels.py
    /work/venv/bin/python bench/compression_kernels.py --sizes 1M 4M --reps 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ma_ray.comm.compression import (CompressionSettings, ErrorFeedback, compress,
                                     cross_node_bytes, decompress_add_, from_bf16_wire,
                                     kept_per_block, message_bytes, to_bf16_wire)


def _entries(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * scale[text[-1].upper()] if text[-1].upper() in scale else int(text)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(numel: int, settings: CompressionSettings, reps: int):
    """({kernel: median seconds}, median seconds of x.clone()). The clone is timed before every
    kernel of every repetition, and its median over all of them is the baseline."""
    x = torch.randn(numel)
    out = torch.zeros(numel)
    message = compress(x, settings)
    feedback = ErrorFeedback(numel, settings)
    kernels = {
        "compress": lambda: compress(x, settings, out=message),
        "decompress_add": lambda: decompress_add_(out, message, numel, settings),
        "error_feedback": lambda: feedback.compress(x, out=message),
        "bf16_wire": lambda: from_bf16_wire(to_bf16_wire(x), out=out),
    }
    for fn in kernels.values():  # warm-up: first-touch page faults, allocator
        fn()
    times = {name: [] for name in kernels}
    clone = []
    for _ in range(reps):
        for name, fn in kernels.items():
            clone.append(_timed(x.clone))
            times[name].append(_timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}, statistics.median(clone)


def byte_rows(numel: int, settings: CompressionSettings, members):
    k = kept_per_block(numel, settings)
    blocks = -(-numel // min(settings.block_size, numel))
    rows = []
    for n in members:
        rows.append({
            "members": n,
            "dense_fp32": cross_node_bytes(numel, n, "dense") / numel,
            "bf16": cross_node_bytes(numel, n, "bf16") / numel,
            "sparse": cross_node_bytes(numel, n, "sparse", settings=settings) / numel,
            "sparse_int32_fp32": (n - 1) * blocks * k * 8 / numel,
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1M", "16M", "64M"],
                        help="piece sizes in entries (K, M suffixes)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per kernel")
    parser.add_argument("--ratio", type=float, default=0.1, help="sparsification_ratio")
    parser.add_argument("--bits", type=int, default=8, help="quantization_bits")
    parser.add_argument("--block", type=int, default=2048, help="block_size")
    parser.add_argument("--members", type=int, nargs="+", default=[2, 4, 12],
                        help="N for the byte table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (workers: 1)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = CompressionSettings(args.ratio, args.bits, args.block)
    result = {"settings": vars(args) | {"sizes": args.sizes}, "kernels": [], "bytes": []}
    print(f"settings: ratio {settings.sparsification_ratio}, bits {settings.quantization_bits}, "
          f"block {settings.block_size}; torch threads {torch.get_num_threads()}; "
          f"baseline: x.clone(), timed before every kernel call")
    for size in args.sizes:
        numel = _entries(size)
        gb = numel * 4 / 1e9
        kernels, base = measure(numel, settings, args.reps)
        for name, kern in kernels.items():
            row = {"kernel": name, "numel": numel, "seconds": kern, "gb_per_s": gb / kern,
                   "clone_gb_per_s": gb / base, "time_vs_clone": kern / base}
            result["kernels"].append(row)
            print(f"{name:15s} {size:>5s} entries: {kern * 1e3:9.1f} ms  {gb / kern:6.3f} GB/s  "
                  f"(clone {gb / base:6.2f} GB/s; {kern / base:6.1f} x the clone's time)")
    numel = _entries(args.sizes[0])
    print(f"message: {message_bytes(numel, settings) / numel:.4f} bytes per entry "
          f"(k = {kept_per_block(numel, settings)} of {min(settings.block_size, numel)})")
    for row in byte_rows(numel, settings, args.members):
        result["bytes"].append(row)
        print(f"N={row['members']:<3d} bytes sent per entry: dense fp32 ring {row['dense_fp32']:.3f}"
              f"  bf16 ring {row['bf16']:.3f}  sparse all-gather {row['sparse']:.3f}"
              f"  (int32 index + fp32 value: {row['sparse_int32_fp32']:.3f})")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
