"""What every worker role shares: its parameters by global name, AdamW, the schedule loop, the
end-of-step gradient synchronisation and clipping, and timing.

A role (attention or MoE) owns a module whose parameters are cut from the global model by the
names of ``ma_ray.model.naming``; a subclass provides the ops of its schedule as methods named
after the op kinds.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Dict, List, Optional

import torch
from torch import nn

from ma_ray.model.naming import GlobalSlice, export_global, import_global, initialize
from ma_ray.optim import build_optimizer, clip_coefficient, lr_factor, param_dtype
from ma_ray.runtime.emulated_device import EmulatedDevice
from ma_ray.runtime.schedule import schedule_for
from ma_ray.runtime.timing import StageTimer
from ma_ray.runtime.transfers import Transfers, sleep_until


MOMENTS = ("exp_avg", "exp_avg_sq")


def grad_of(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient; zeros when nothing reached it (no token was routed through it)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


class Role:
    kind = ""

    def __init__(self, cfg, plan, me, links, device: torch.device, module: nn.Module, slices: List[GlobalSlice],
                 durations=None):
        """``durations``: the emulation's time model (``parallel.emulation.StageDurations``) when
        stages stand for the configured shapes; None computes for real."""
        self.cfg, self.plan, self.me, self.links, self.device = cfg, plan, me, links, device
        self.durations = durations
        self.device_timeline = EmulatedDevice() if durations is not None else None
        self.module = module
        self.slices = slices
        initialize(self.module, self.slices, cfg.model.initializer_range, cfg.train.seed)
        self.module.to(device, param_dtype(cfg))
        self.optimizer, self.scheduler = build_optimizer(self.module, self.slices, cfg.train)
        self.timer = StageTimer(device)
        schedule = cfg.schedule
        self.transfers = (Transfers(links, schedule.max_concurrent_communications) if durations is None else
                          Transfers(links, schedule.max_concurrent_communications, self._inbound_bandwidth,
                                    self.device_timeline.ready_at))
        # Rows per transferred chunk: communication_chunk_size tokens at the configured shapes.
        scale = durations.token_scale if durations is not None else 1.0
        self.chunk_rows = max(1, round(schedule.communication_chunk_size / scale))
        self.schedule = schedule_for(self.kind, cfg.model.num_layers, cfg.train.gradient_accumulation_steps,
                                     cfg.schedule.micro_batches_in_flight)
        bf16 = cfg.train.mixed_precision == "bf16"
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        # Activations and their gradients cross between the pools in this dtype.
        self.transfer_dtype = torch.bfloat16 if bf16 else param_dtype(cfg)

    # -- the step ---------------------------------------------------------------------------

    def train_step(self, step: int) -> Dict[str, float]:
        self.module.train()
        # Dropout's RNG is a function of (seed, step, worker): nothing to checkpoint.
        torch.manual_seed(hash((self.cfg.train.seed, step, self.me.node, self.me.local_gpu)) & 0x7FFF_FFFF)
        self.optimizer.zero_grad(set_to_none=False)
        self.timer.reset()
        self.begin_step(step)
        with self.timer.wait("pipeline"):  # the passes, from first op to last, for overlap figures
            for op in self.schedule:
                getattr(self, op.kind)(op.micro, op.layer)
            if self.device_timeline is not None:
                self.device_timeline.synchronize()
        metrics = self.end_micro_batches()
        for p in self.module.parameters():
            if p.grad is None:  # no row reached this worker's experts yet: their gradient is zero
                p.grad = torch.zeros_like(p)
        with self.timer.measure("grad_sync"):
            self.synchronize_gradients()
        norm = self._global_grad_norm()
        coef = clip_coefficient(norm, self.cfg.train.gradient_clipping)
        grads = [p.grad for p in self.module.parameters()]
        if coef < 1.0:
            torch._foreach_mul_(grads, coef)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        with self.timer.measure("optimizer"):
            self.optimizer.step()
        self.scheduler.step()
        metrics.update(grad_norm=norm, lr=lr)
        metrics["timings"] = self.timer.totals()
        return metrics

    # -- compute and transfers, real or emulated --------------------------------------------

    @contextmanager
    def compute(self, label: str, emulated_s: float = 0.0):
        """A compute region, timed. Under emulation its device time is ``emulated_s``, queued on
        the emulated device (``runtime.emulated_device``) while the host goes on: a stage's time
        is queued where its main arithmetic runs, and its other pieces (norms, router, combine)
        add host work only, as their kernels would hide under the device's queue on a GPU."""
        if self.device_timeline is None:
            with self.timer.measure(label):
                yield
            return
        launched_at = time.time()
        yield
        self.device_timeline.launch(emulated_s, launched_at)
        self.timer.add(label, emulated_s)

    def queue_device(self, label: str, seconds: float) -> Optional[float]:
        """Under emulation, queue ``seconds`` of device work whose input is here now, and return
        when it will be done; None computing for real (work is timed where it runs)."""
        if self.device_timeline is None:
            return None
        self.device_timeline.launch(seconds, time.time())
        self.timer.add(label, seconds)
        return self.device_timeline.free_at

    @contextmanager
    def collective(self, label: str, emulated_s: float):
        """A collective over the stand-in tensors. Under emulation it waits for the device (its
        input is the device's output) and then lasts ``emulated_s``, the configured shapes'
        time, of which the stand-in's real collective is part; the hold is timed as ``label``."""
        if self.device_timeline is None:
            yield
            return
        self.device_timeline.synchronize()
        started = time.perf_counter()
        yield
        with self.timer.wait(label):
            sleep_until(started + emulated_s)

    def _inbound_bandwidth(self, src_gpu: int) -> float:
        return self.durations.bandwidth(self.plan.gpus[src_gpu].node == self.me.node)

    def modelled_bytes(self, rows: int) -> float:
        """Bytes that ``rows`` activation rows stand for (0 when computing for real)."""
        return self.durations.rows_bytes(rows) if self.durations is not None else 0.0

    def wait_sends(self, handles, label: str) -> None:
        with self.timer.wait(label):
            for handle in handles:
                handle.wait()

    def _global_grad_norm(self) -> float:
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        for p in self.norm_parameters():
            sq += p.grad.double().square().sum()
        self.links.allreduce_world(sq)
        return math.sqrt(float(sq))

    # -- hooks for the roles ----------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        pass

    def end_micro_batches(self) -> Dict[str, float]:
        return {}

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
                **{key: keep(self.export("state", key)) for key in MOMENTS},
                "optimizer_steps": self.scheduler.last_epoch}

    def load_state(self, state: dict) -> None:
        """Continue from ``export_state`` payloads (merged over the workers that held the names)."""
        import_global(self.module, self.slices, state["params"])
        steps = state["optimizer_steps"]
        if steps == 0:
            return  # AdamW has no moments before its first step
        params = dict(self.module.named_parameters())
        for key in MOMENTS:
            moments = {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name, p in params.items()}
            import_global(self.module, self.slices, state[key], moments)
            for name, p in params.items():
                self.optimizer.state[p][key] = moments[name]
        for p in params.values():
            self.optimizer.state[p]["step"] = torch.tensor(float(steps))
        self.scheduler.last_epoch = steps
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * lr_factor(steps, self.cfg.train)
