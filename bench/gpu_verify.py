"""Several GPUs of one machine standing in for nodes: ``ma-ray verify`` on torch's NCCL groups.

    python bench/gpu_verify.py [--steps 3]

``cluster.fake_gpus: true`` on a machine with GPUs emulates the nodes (the placement group's
bundles on the one Ray node) over the real GPUs (``runtime.cluster.emulated_gpus``), so every
group is a real NCCL communicator: point-to-point between the pools, the attention pool's two
levels (inside each emulated node, then across), the gradients' all-reduce. Two emulated nodes
of ``min(GPUs / 2, 4)`` GPUs each, one MoE GPU per node; four runs of the local preset's model,
fp32 and bf16 at 1 and 2 micro-batches in flight, each moving one attention GPU to the MoE pool
before step 2 (heads, experts and AdamW moments migrate), each compared with the single-process
reference by ``ma-ray verify``'s own tolerances.

It cannot show anything about nodes that are really apart: NCCL runs over NVLink or PCIe and
shared memory here, never the network (docs/cluster.md covers that), and inter-node bandwidth is
not what this times. Prints one line per run; exits 1 if a run fails (each failure on its own
line at the end), 2 with fewer than 4 GPUs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def layout(gpus: int) -> dict:
    """Two emulated nodes of up to 4 GPUs each, one MoE GPU per node."""
    per_node = min(gpus // 2, 4)
    total = 2 * per_node
    return {"cluster.num_nodes": 2, "cluster.gpus_per_node": per_node, "cluster.attention_gpus": total - 2,
            "balance.min_attention_gpus": 1, "balance.max_attention_gpus": total - 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 4:
        print(f"{gpus} GPU(s): this check needs 4 or more (two emulated nodes of two)", file=sys.stderr)
        return 2
    keys = {**layout(gpus), "cluster.fake_gpus": True, "comm.backend": "nccl", "comm.hierarchical_allreduce": True}
    attention = keys["cluster.attention_gpus"]
    print(f"{gpus} GPUs ({torch.cuda.get_device_name()}), torch {torch.__version__}: 2 emulated nodes x "
          f"{keys['cluster.gpus_per_node']} GPUs, {attention} -> {attention - 1} attention GPUs before step 2", flush=True)
    failed = []
    for precision in ("fp32", "bf16"):
        for in_flight in (1, 2):
            sets = {**keys, "schedule.micro_batches_in_flight": in_flight}
            command = [sys.executable, "-m", "ma_ray.cli", "verify", "--config", str(ROOT / "cluster/local-cpu.yaml"),
                       "--precision", precision, "--steps", str(args.steps), "--rebalance", f"2:{attention - 1}",
                       *[a for k, v in sets.items() for a in ("--set", f"{k}={str(v).lower()}")]]
            name = f"verify {precision}, {in_flight} micro-batch(es) in flight, comm.backend nccl"
            start = time.perf_counter()
            try:
                ran = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                failed.append(f"{name}: FAILED (no answer within 900 s)")
                print(failed[-1], flush=True)
                continue
            report = _report(ran.stdout)
            took = time.perf_counter() - start
            if ran.returncode == 0 and report is not None and report.get("ok"):
                print(f"{name}: ok in {took:.0f} s (loss {report['loss_rel_err']:.1e}, gradients "
                      f"{report['grad_rel_err']:.1e}, parameters {report['param_rel_err']:.1e}; "
                      f"migrations {len(report['migrations'])})", flush=True)
            else:
                why = (json.dumps({k: report.get(k) for k in ("ok", "loss_rel_err", "grad_rel_err", "param_rel_err",
                                                              "tolerance")})
                       if report is not None else (ran.stderr.strip().splitlines() or ["no output"])[-1])
                failed.append(f"{name}: FAILED (exit {ran.returncode}: {why})")
                print(failed[-1], flush=True)
    for line in failed:
        print(f"failed: {line}")
    return 1 if failed else 0


def _report(stdout: str):
    """``ma-ray verify``'s JSON report: its last line of output."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
