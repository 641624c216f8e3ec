"""What every worker role shares: its parameters by global name, AdamW, the schedule loop, the
end-of-step gradient synchronisation and clipping, and timing.

A role (attention or MoE) owns a stack of the model (``model.stacks``) whose parameters are cut
from the global model by the names of ``ma_ray.model.naming``. It runs on a device and talks to
the other pool through a transport (``runtime.device``, ``runtime.transport``), both chosen once
by the worker, and reads the modelled costs of its stages from ``durations`` (all zeros when
computing for real), so no role asks whether compute is modelled. Each role maps the op kinds
of its schedule to its handlers in ``op_handlers``; the map is checked against the schedule when
the role is built, so a missing handler fails at set-up, not mid-step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Dict, List

import torch
from torch import nn

from ma_ray.model.naming import GlobalSlice, export_global, import_global, initialize
from ma_ray.optim import ADAM_MOMENTS, build_optimizer, clip_coefficient, lr_factor, param_dtype
from ma_ray.runtime.schedule import schedule_for
from ma_ray.runtime.step_metrics import WorkerStepResult
from ma_ray.runtime.timing import GRAD_SYNC, OPTIMIZER, PASSES


def grad_of(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient; zeros when nothing reached it (no token was routed through it)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


class Role:
    kind = ""

    def __init__(self, cfg, plan, me, links, device, transport, durations, module: nn.Module,
                 slices: List[GlobalSlice]):
        """``device``: ``runtime.device``'s; ``transport``: ``runtime.transport``'s;
        ``durations``: ``parallel.emulation.StageDurations``, the modelled cost of each stage
        and transfer (all zeros computing for real)."""
        self.cfg, self.plan, self.me, self.links = cfg, plan, me, links
        self.device, self.transport, self.durations = device, transport, durations
        self.torch_device = device.torch_device
        self.timer = device.timer
        self.module = module
        self.slices = slices
        initialize(self.module, self.slices, cfg.model.initializer_range, cfg.train.seed)
        self.module.to(self.torch_device, param_dtype(cfg))
        self.optimizer, self.scheduler = build_optimizer(self.module, self.slices, cfg.train)
        self.chunk_rows = transport.chunk_rows
        self.schedule = schedule_for(self.kind, cfg.model.num_layers, cfg.train.gradient_accumulation_steps,
                                     cfg.schedule.micro_batches_in_flight)
        handlers = self.op_handlers()
        missing = sorted({op.kind for op in self.schedule} - set(handlers))
        if missing:
            raise TypeError(f"{type(self).__name__} has no handler for schedule ops {missing}")
        self._handlers: Dict[str, Callable[[int, int], None]] = handlers
        self.checkpointing = cfg.train.activation_checkpointing
        bf16 = cfg.train.mixed_precision == "bf16"
        dev_type = device.torch_device.type
        self._autocast = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if bf16 else nullcontext
        # Activations and their gradients cross between the pools in this dtype.
        self.transfer_dtype = torch.bfloat16 if bf16 else param_dtype(cfg)

    def op_handlers(self) -> Dict[str, Callable[[int, int], None]]:
        """Schedule op kind -> the method that runs it (``runtime.schedule``)."""
        raise NotImplementedError

    # -- the step ---------------------------------------------------------------------------

    def train_step(self, step: int) -> WorkerStepResult:
        self.module.train()
        # Dropout's RNG is a function of (seed, step, worker): nothing to checkpoint.
        torch.manual_seed(hash((self.cfg.train.seed, step, self.me.node, self.me.local_gpu)) & 0x7FFF_FFFF)
        self.optimizer.zero_grad(set_to_none=False)
        self.timer.reset()
        self.begin_step(step)
        with self.timer.wait(PASSES):  # the passes, from first op to last, for overlap figures
            for op in self.schedule:
                self._handlers[op.kind](op.micro, op.layer)
            self.device.synchronize()
        result = self.end_micro_batches()
        for p in self.module.parameters():
            if p.grad is None:  # no row reached this worker's experts yet: their gradient is zero
                p.grad = torch.zeros_like(p)
        with self.timer.measure(GRAD_SYNC):
            self.synchronize_gradients()
        norm = self._global_grad_norm()
        coef = clip_coefficient(norm, self.cfg.train.gradient_clipping)
        grads = [p.grad for p in self.module.parameters()]
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        with self.timer.measure(OPTIMIZER):
            self.optimizer.step()
        self.scheduler.step()
        result.grad_norm, result.lr = norm, lr
        result.timings = self.timer.totals()
        return result

    def modelled_bytes(self, rows: int) -> float:
        """Bytes that ``rows`` activation rows stand for at the configured shapes (0 computing
        for real)."""
        return self.durations.rows_bytes(rows)

    def wait_sends(self, handles, label: str) -> None:
        with self.timer.wait(label):
            for handle in handles:
                handle.wait()

    def _global_grad_norm(self) -> float:
        sq = torch.zeros(1, dtype=torch.float64, device=self.torch_device)
        for p in self.norm_parameters():
            sq += p.grad.double().square().sum()
        self.links.allreduce_world(sq)
        return math.sqrt(float(sq))

    # -- hooks for the roles ----------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        pass

    def end_micro_batches(self) -> WorkerStepResult:
        return WorkerStepResult(grad_norm=0.0, lr=0.0)

    def synchronize_gradients(self) -> None:
        pass

    def norm_parameters(self):
        """Parameters whose gradients this worker counts in the global norm (each once overall)."""
        return self.module.parameters()

    # -- state by global name ---------------------------------------------------------------

    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        out = export_global(self.module, self.slices, which, self.optimizer, key)
        return {k: v.cpu() for k, v in out.items()}

    def export_state(self, names=None) -> dict:
        """Parameters and AdamW moments by global name (all, or only ``names``), and the step count:
        everything a worker of any layout needs to continue this training."""
        keep = (lambda d: d) if names is None else (lambda d: {k: v for k, v in d.items() if k in names})
        return {"params": keep(self.export("param")),
                **{key: keep(self.export("state", key)) for key in ADAM_MOMENTS},
                "optimizer_steps": self.scheduler.last_epoch}

    def load_state(self, state: dict) -> None:
        """Continue from ``export_state`` payloads (merged over the workers that held the names)."""
        import_global(self.module, self.slices, state["params"])
        steps = state["optimizer_steps"]
        if steps == 0:
            return  # AdamW has no moments before its first step
        params = dict(self.module.named_parameters())
        for key in ADAM_MOMENTS:
            moments = {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name, p in params.items()}
            import_global(self.module, self.slices, state[key], moments)
            for name, p in params.items():
                self.optimizer.state[p][key] = moments[name]
        for p in params.values():
            self.optimizer.state[p]["step"] = torch.tensor(float(steps))
        self.scheduler.last_epoch = steps
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_factor(steps, self.cfg.train)
