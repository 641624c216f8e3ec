"""Gradient compression's effect on convergence, simulated in one process: seconds a run where
``bench/compression_convergence.py`` (the judge, through ``ma-ray train``) takes minutes, for
testing a hypothesis or sweeping a remedy before building it.

    python bench/compression_simulation.py [--steps 200] [--kinds none,topk] [--warmup N] ...

What it simulates of the local preset's job (``cluster/local-cpu.yaml``, ``--set`` on top): the
single-process reference (``verify.reference_trainer``: the same initial parameters, batches,
loss, clipping and AdamW as the workers), whose attention side's replicated gradients
(``model.attention_side``: embeddings, norms, output biases, routers, LM head) are summed as
the two-level all-reduce sums them. Each node's partial gradient is its attention GPUs' tokens'
share of the loss (contiguous token slices, ``parallel.shares.balanced_ranges``; the aux and z
losses split evenly between the nodes); the flat vector is cut into the plan's pieces
(``TwoLevelLayout.flat_pieces``) and each tensor's run of a piece is compressed by each node with
the package's own kernels and ``ErrorFeedback``, then decoded and summed. The sharded parameters
(heads, experts) take exact gradients, as in the job. What it does not: the per-layer token
slices inside attention (a node's partial gradient here is its tokens' loss's, not its slice's
share of every token's) and bf16.

Options beyond the job's: ``--warmup`` (``comm.compression_warmup_steps``: the first steps
dense), ``--compress-until`` (steps from this one dense again: where in the run compression
costs), ``--ratio-ramp`` (DGC's warm-up: the ratio falls geometrically from 1 to
``comm.sparsification_ratio`` over this many steps), ``--dense-below`` (tensors under this many
entries sent exact), and two diagnostics that need the exact gradient, so no remedy:
``--exact-variance`` (AdamW's second moment of the replicated parameters fed from the exact
gradients, for the hypothesis that compression inflates it) and ``--exact-clip-norm`` (the
clipping norm from the exact gradients). Prints each run's final loss and mean of the last 10
steps, with the gap to the first kind, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ma_ray import config as C  # noqa: E402
from ma_ray.comm.compression import CompressionSettings, ErrorFeedback, decompress_add_  # noqa: E402
from ma_ray.data import build_dataset  # noqa: E402
from ma_ray.model.attention_side import AttentionSideParams  # noqa: E402
from ma_ray.optim import clip_coefficient  # noqa: E402
from ma_ray.parallel.hierarchy import TwoLevelLayout  # noqa: E402
from ma_ray.parallel.placement import make_plan  # noqa: E402
from ma_ray.parallel.shares import balanced_ranges  # noqa: E402
from ma_ray.verify.reference_trainer import ReferenceTrainer  # noqa: E402

from compression_convergence import against_baseline  # noqa: E402  (bench/, this script's folder)


def replicated_parameters(trainer: ReferenceTrainer, cfg) -> List[torch.nn.Parameter]:
    """The reference's parameters the attention side holds whole, in the side's flat order."""
    side = AttentionSideParams(cfg)
    local_of_side = {s.local: s.name for s in side.global_slices()}
    reference_local = {s.name: s.local for s in trainer.slices if s.name in set(local_of_side.values())}
    params = dict(trainer.model.named_parameters())
    return [params[reference_local[local_of_side[name]]] for name, _ in side.named_parameters()]


def node_token_ranges(cfg, plan, layout: TwoLevelLayout, tokens: int) -> List[range]:
    """Each node's tokens of a micro-batch: its attention GPUs' slices (contiguous ranks)."""
    slices = balanced_ranges(tokens, plan.attention_gpus)
    return [range(slices[ranks[0]].start, slices[ranks[-1]].stop) for ranks in layout.nodes]


class Simulation:
    def __init__(self, cfg, args):
        self.cfg, self.args = cfg, args
        self.trainer = ReferenceTrainer(cfg)
        self.dataset = build_dataset(cfg)
        self.replicated = replicated_parameters(self.trainer, cfg)
        self.sizes = [p.numel() for p in self.replicated]
        self.numel = sum(self.sizes)
        plan = make_plan(cfg)
        self.layout = TwoLevelLayout.of_plan(plan)
        t = cfg.train
        self.node_tokens = node_token_ranges(cfg, plan, self.layout, t.micro_batch_size * t.seq_length)
        ends = torch.tensor(self.sizes).cumsum(0).tolist()
        self.runs = []  # per piece: (range, lengths of its tensors' runs, full tensor size of each run)
        for r in self.layout.flat_pieces(self.numel):
            cuts = [r.start] + [e for e in ends if r.start < e < r.stop] + [r.stop]
            owners = [next(s for s, e in zip(self.sizes, ends) if a < e) for a in cuts[:-1]]
            self.runs.append((r, [b - a for a, b in zip(cuts, cuts[1:])], owners))
        self.settings = CompressionSettings.of(cfg.comm)
        self.feedback = [[[ErrorFeedback(n, self.settings) for n in lengths] for _, lengths, _ in self.runs]
                         for _ in self.layout.nodes]
        self.exact_v: Dict[torch.nn.Parameter, torch.Tensor] = {}

    def node_gradients(self, step: int):
        """(mean loss, each node's partial gradient of the replicated parameters, flat)."""
        model, cfg = self.trainer.model, self.cfg
        model.train()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        grads = [torch.zeros(self.numel) for _ in self.layout.nodes]
        accum, loss = self.dataset.grad_accum, 0.0
        for i in range(accum):
            ids, targets = self.dataset.micro_batch(step, i)
            b, t = ids.shape
            x = model.drop(model.tokens(ids) + model.positions(torch.arange(t)))
            aux = z = x.new_zeros(())
            for block in model.blocks:
                x, a, zz = block(x)
                aux, z = aux + a, z + zz
            ce = F.cross_entropy(model.lm_head(model.final_ln(x)).reshape(b * t, -1), targets.reshape(-1),
                                 reduction="none")
            side_losses = cfg.moe.aux_loss_alpha * aux + cfg.moe.router_z_loss_coef * z
            loss += float((ce.mean() + side_losses).detach()) / accum
            for n, r in enumerate(self.node_tokens):
                part = ce[r.start:r.stop].sum() / (b * t) + side_losses / len(self.node_tokens)
                (part / accum).backward(retain_graph=n < len(self.node_tokens) - 1)
                grads[n] += torch.cat([p.grad.reshape(-1) for p in self.replicated])
                for p in self.replicated:
                    p.grad = None
        return loss, grads

    def compressed_sum(self, step: int, grads) -> torch.Tensor:
        a = self.args
        settings = self.settings
        if a.ratio_ramp:
            ratio = max(settings.sparsification_ratio, settings.sparsification_ratio ** (min(step, a.ratio_ramp) / a.ratio_ramp))
            settings = CompressionSettings(ratio, settings.quantization_bits, settings.block_size)
        total = torch.zeros(self.numel)
        for piece, (r, lengths, owners) in enumerate(self.runs):
            out = total[r.start:r.stop]
            for n, grad in enumerate(grads):
                start = r.start
                for fb, length, owner in zip(self.feedback[n][piece], lengths, owners):
                    run = grad[start:start + length]
                    if owner < a.dense_below:
                        out[start - r.start:start - r.start + length] += run
                    else:
                        fb.settings = settings
                        message = fb.compress(run.clone())
                        decompress_add_(out[start - r.start:start - r.start + length], message, length, settings)
                    start += length
        return total

    def step(self, step: int, kind: str) -> float:
        a, cfg = self.args, self.cfg
        loss, grads = self.node_gradients(step)
        exact = torch.stack(grads).sum(0)
        compressing = kind == "topk" and a.warmup <= step < a.compress_until
        summed = self.compressed_sum(step, grads) if compressing else exact
        offset = 0
        for p in self.replicated:
            p.grad = summed[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        params = list(self.trainer.model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads_all = [p.grad for p in params]
        norm = float(torch.nn.utils.get_total_norm(grads_all))
        if a.exact_clip_norm:
            norm = (norm ** 2 - float(summed.norm()) ** 2 + float(exact.norm()) ** 2) ** 0.5
        coef = clip_coefficient(norm, cfg.train.gradient_clipping)
        if coef < 1.0:
            torch._foreach_mul_(grads_all, coef)
        if a.exact_variance:
            self._feed_exact_variance(exact * min(coef, 1.0))
        self.trainer.optimizer.step()
        self.trainer.scheduler.step()
        return loss

    def _feed_exact_variance(self, exact: torch.Tensor) -> None:
        """Set exp_avg_sq before AdamW's update so that after it, it is the EMA of the exact
        gradients' squares (where that would need a negative value, zero: rare)."""
        b2 = self.cfg.train.adam_beta2
        offset = 0
        for p in self.replicated:
            g = exact[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            want = b2 * self.exact_v.get(p, torch.zeros_like(p)) + (1 - b2) * g * g
            self.exact_v[p] = want
            state = self.trainer.optimizer.state.get(p)
            if state:  # from the second step; the first one's v is g^2 of what was sent
                state["exp_avg_sq"].copy_(((want - (1 - b2) * p.grad * p.grad) / b2).clamp_(min=0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kinds", default="none,topk", help="none and/or topk; the first is the baseline")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--warmup", type=int, help="first steps dense (default: comm.compression_warmup_steps)")
    parser.add_argument("--compress-until", type=int, default=None, help="steps from this one dense")
    parser.add_argument("--ratio-ramp", type=int, default=0, help="ratio from 1 down to the configured over N steps")
    parser.add_argument("--dense-below", type=int, default=0, help="tensors under N entries sent exact")
    parser.add_argument("--exact-variance", action="store_true", help="diagnostic: AdamW's v from exact gradients")
    parser.add_argument("--exact-clip-norm", action="store_true", help="diagnostic: clip by the exact norm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = C.load(ROOT / "cluster" / "local-cpu.yaml", [f"train.num_train_steps={args.steps}", *args.set])
    if args.warmup is None:
        args.warmup = cfg.comm.compression_warmup_steps
    if args.compress_until is None:
        args.compress_until = args.steps
    kinds = args.kinds.split(",")
    figures = {}
    for kind in kinds:
        sim, started = Simulation(cfg, args), time.perf_counter()
        losses = [sim.step(step, kind) for step in range(args.steps)]
        figures[kind] = {"final_loss": losses[-1], "final10_loss": sum(losses[-10:]) / len(losses[-10:]),
                         "seconds": time.perf_counter() - started, "losses": losses}
    against_baseline(figures, kinds[0])
    for kind in kinds:
        f = figures[kind]
        print(f"{kind:>5}: final {f['final_loss']:.4f} (last 10: {f['final10_loss']:.4f}), {f['final_rel_diff']:+.2%} "
              f"({f['final10_rel_diff']:+.2%}) against {kinds[0]}; {f['seconds']:.0f} s")
    options = {k: v for k, v in vars(args).items() if k not in ("kinds", "steps")}
    print(json.dumps({"steps": args.steps, "replicated_entries": sim.numel, "nodes": len(sim.layout.nodes),
                      "pieces": sim.layout.pieces, **options,
                      **{k: {x: y for x, y in f.items() if x != "losses"} for k, f in figures.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
