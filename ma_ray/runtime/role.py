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
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from ma_ray.model.naming import GlobalSlice, global_view, global_views, initialize
from ma_ray.optim import ADAM_MOMENTS, build_optimizer, clip_coefficient, lr_factor, param_dtype
from ma_ray.parallel.hierarchy import INTER_NODE
from ma_ray.runtime.migration import SHARD_RESIDUAL, TENSOR_KEYS
from ma_ray.runtime.schedule import schedule_for
from ma_ray.runtime.step_metrics import WorkerStepResult
from ma_ray.runtime.timing import COMPRESSION, GRAD_SYNC, OPTIMIZER, PASSES


def grad_of(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient; zeros when nothing reached it (no token was routed through it)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def release_output(root: torch.Tensor) -> None:
    """Drop the data of a graph's output that backward reaches only as a root: no op saved it,
    so only its ``grad_fn`` is needed (Megatron's ``deallocate_output_tensor``). Backward from
    it must go through ``backward``, which skips the shape check the data would have passed."""
    root.data = torch.empty((1,), dtype=root.dtype, device=root.device)


def backward(roots: List[torch.Tensor], grads: List[torch.Tensor]) -> None:
    """``torch.autograd.backward`` of ``roots`` (some perhaps ``release_output``'s) with ``grads``
    of their original shapes; the engine checks each against its node's recorded shape."""
    torch.autograd.Variable._execution_engine.run_backward(
        tuple(roots), tuple(grads), False, False, (), True, True)


def rng_state(device: torch.device) -> tuple:
    """The RNG state a recompute replays, dropout masks included (as torch's checkpoint does)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def replayed_rng(device: torch.device, state: tuple):
    """Run with the RNG at ``state``; the RNG goes on afterwards as if nothing ran."""
    cpu, accelerator = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if accelerator is not None:
            torch.cuda.set_rng_state(accelerator, device)
        yield


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
        # Not filled yet: the worker fills every parameter once, from the seed (``initialize``)
        # or from state (``load_state``). Until then the tensors are untouched (on the host, no
        # pages), so a parameter taken over from the worker's previous role costs nothing.
        self.module.to(self.torch_device, param_dtype(cfg))
        self.optimizer, self.scheduler = build_optimizer(self.module, self.slices, cfg.train)
        self.chunk_rows = transport.chunk_rows
        # This replica's share of the step's micro-batches (all of them with one replica).
        self.schedule = schedule_for(self.kind, cfg.model.num_layers, cfg.micro_batches_per_replica,
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
        self.master_dtype = param_dtype(cfg)
        # The sharded gradients at the configured shapes (zero computing for real: the
        # tensors' own bytes are counted); their modelled all-reduce with the counterparts, by
        # whether the reducer compresses (its warm-up crosses dense).
        self.shard_grad_bytes = (len(me.heads) * durations.head_grad_bytes
                                 + len(me.experts) * durations.expert_grad_bytes)
        self.modelled_counterparts: Dict[bool, tuple] = {}
        self.unsent_shards: Dict[str, torch.Tensor] = {}  # residuals no reducer keeps (``add_shard_residuals``)

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
        self.device.start_step()
        self.begin_step(step)
        self.links.counterpart_reducer.begin_step(step)
        undo_residuals = self._residuals_undo() if self.cfg.train.on_nonfinite == "skip" else None
        with self.timer.wall(PASSES):  # the passes, first op to the device's last, for overlap figures
            for op in self.schedule:
                self._handlers[op.kind](op.micro, op.layer)
            self.device.synchronize()
        result = self.end_micro_batches()
        for p in self.module.parameters():
            if p.grad is None:  # no row reached this worker's experts yet: their gradient is zero
                p.grad = torch.zeros_like(p)
        self.synchronize_gradients()
        counterpart_bytes = self.synchronize_counterparts()
        self.device.end_step()  # the modelled step ends with the gradients' synchronisation
        norm = self._global_grad_norm(finite_loss=math.isfinite(result.loss_share))
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step applies
        if math.isfinite(norm):
            coef = clip_coefficient(norm, self.cfg.train.gradient_clipping)
            grads = [p.grad for p in self.module.parameters()]
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
            with self.timer.measure(OPTIMIZER):
                self.optimizer.step()
            self.scheduler.step()
        else:
            # A non-finite loss or gradient is never applied. The norm is all-reduced, so every
            # worker skips alike, and the schedule does not advance (Megatron's skipped step);
            # whether the run goes on is the controller's call (train.on_nonfinite).
            result.skipped = True
            if undo_residuals is not None:
                undo_residuals()
        result.grad_norm, result.lr = norm, lr
        result.timings = self.timer.totals()
        result.level_bytes = self.step_level_bytes()
        if counterpart_bytes:  # the counterparts are all on other nodes
            result.level_bytes[INTER_NODE] = result.level_bytes.get(INTER_NODE, 0.0) + counterpart_bytes
        return result

    def _residuals_undo(self) -> Callable[[], None]:
        """What puts the error-feedback residuals back as they were before this step (the
        reducers', and those no reducer keeps, which go with this step's gradients): a skipped
        step leaves the training state as the last applied step left it, or one non-finite
        gradient would stay in the residuals and poison every later step."""
        kept = [(r, {piece: t.clone() for piece, t in r.residuals().items()}) for r in self.links.reducers()]
        unsent = self.unsent_shards

        def undo() -> None:
            with torch.no_grad():
                for reducer, before in kept:
                    for piece, residual in reducer.residuals().items():
                        # In place: the reducer's error feedback holds views of it.
                        residual.copy_(before[piece]) if piece in before else residual.zero_()
            self.unsent_shards = unsent
        return undo

    def modelled_bytes(self, rows: int) -> float:
        """Bytes that ``rows`` activation rows stand for at the configured shapes (0 computing
        for real)."""
        return self.durations.rows_bytes(rows)

    def wait_sends(self, handles, label: str) -> None:
        with self.device.waiting(label):
            for handle in handles:
                handle.wait()

    def synchronize_counterparts(self) -> float:
        """Sum the sharded gradients with the counterparts' in the other replicas (each holds
        the same heads or experts; nothing to do with one replica), with the links' counterpart
        reducer, of the kind ``comm.gradient_compression`` names (top-k with its error feedback
        in ``shard_residuals``). Returns the bytes it sent."""
        self._send_unsent_shards()
        if self.links.counterparts is None:
            return 0.0
        reducer = self.links.counterpart_reducer
        grads = [p.grad for p in self.sharded_parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if reducer.compresses not in self.modelled_counterparts:
            self.modelled_counterparts[reducer.compresses] = self.durations.counterparts_allreduce_s(
                self.plan.replicas, self.shard_grad_bytes, reducer.wire_factor, reducer.compresses)
        allreduce_s, compression_s = self.modelled_counterparts[reducer.compresses]
        with self.device.collective(GRAD_SYNC, allreduce_s):
            self.links.allreduce_counterparts(flat, [g.numel() for g in grads])
        self.timer.add(COMPRESSION, compression_s)
        full_bytes = self.shard_grad_bytes or flat.numel() * flat.element_size()
        element = flat.element_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return full_bytes * reducer.wire_factor(self.plan.replicas, int(full_bytes / element), element)

    def _global_grad_norm(self, finite_loss: bool = True) -> float:
        """The global gradient norm; infinite on every worker when any one's loss is not finite.
        Every replica holds the same summed gradients by now, so replica 0's count, once."""
        sq = torch.zeros(1, dtype=torch.float64, device=self.torch_device)
        for p in self.norm_parameters() if self.plan.replica == 0 else ():
            sq += p.grad.double().square().sum()
        if not finite_loss:
            sq.fill_(math.inf)
        self.links.allreduce_everyone(sq)
        return math.sqrt(float(sq))

    # -- hooks for the roles ----------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        pass

    def step_level_bytes(self) -> Dict[str, float]:
        """Bytes this worker's collectives sent this step, by level (``parallel.hierarchy``)."""
        return {}

    def residual_parts(self) -> list:
        """Gradient compression's residuals this worker holds (``runtime.residuals``)."""
        return []

    def load_residuals(self, parts, nodes: set) -> None:
        pass

    def end_micro_batches(self) -> WorkerStepResult:
        return WorkerStepResult(grad_norm=0.0, lr=0.0)

    def synchronize_gradients(self) -> None:
        pass

    def norm_parameters(self):
        """Parameters whose gradients this worker counts in the global norm (each once overall)."""
        return self.module.parameters()

    def sharded_parameters(self) -> list:
        """Parameters this worker holds a shard of (its heads or experts): what it sums with its
        counterparts in the other replicas."""
        return list(self.module.parameters())

    # -- state by global name ---------------------------------------------------------------

    def initialize(self) -> None:
        """Fill every parameter with its layout-independent seeded value (a start from scratch)."""
        initialize(self.module, self.slices, self.cfg.model.initializer_range, self.cfg.train.seed)

    def export(self, which: str = "param", key: str = "") -> Dict[str, torch.Tensor]:
        """Copies on the host by global name, for verification (``model.naming.global_views``;
        ``which="shard_residual"``: ``shard_residuals``)."""
        views = (self.shard_residuals() if which == SHARD_RESIDUAL
                 else global_views(self.module, self.slices, which, self.optimizer, key))
        return {k: v.to("cpu", copy=True) for k, v in views.items()}

    # -- the counterparts' error feedback by global name (runtime.residuals) ----------------

    def shard_residuals(self, names=None) -> Dict[str, torch.Tensor]:
        """What this worker has not yet sent of its sharded gradients to its counterparts (top-k
        compression across replicas), by global name (all, or only ``names``), as views: of the
        counterpart reducer's residual, or, where no reducer keeps one, of what goes with the
        next step's gradients (``add_shard_residuals``). Each replica's are its own: heads and
        experts take theirs along when they move, as they take their moments."""
        views = self._reducer_residual_views(create=False) or self.unsent_shards
        return {n: t for n, t in views.items() if names is None or n in names}

    def add_shard_residuals(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Add residuals by global name (the names this worker holds; others are ignored) into
        its own. Several replicas' add up when fewer replicas resume them: the counterparts'
        reductions only ever see their sum. Where no reducer keeps residuals (one replica, or
        a resume without top-k) they are added, dense, to the next step's sharded gradients,
        as the reducer's warm-up sends a residual, so nothing unsent is lost."""
        if not tensors:
            return
        views = self._reducer_residual_views(create=True)
        with torch.no_grad():
            if views:
                for name in tensors.keys() & views.keys():
                    views[name].add_(tensors[name].reshape(views[name].shape).to(views[name]))
                return
            for name in tensors.keys() & {s.name for s in self._sharded_slices()}:
                t = tensors[name].to(device=self.torch_device, copy=True)
                self.unsent_shards[name] = self.unsent_shards[name].add_(t) if name in self.unsent_shards else t

    def _send_unsent_shards(self) -> None:
        """Add the residuals no reducer keeps into this step's sharded gradients (once)."""
        if not self.unsent_shards:
            return
        grads = global_views(self.module, self._sharded_slices(), "grad")
        with torch.no_grad():
            for name, t in self.unsent_shards.items():
                grads[name].add_(t.reshape(grads[name].shape).to(grads[name]))
        self.unsent_shards = {}

    def _sharded_slices(self) -> List[GlobalSlice]:
        """The global slices of ``sharded_parameters``, in their order."""
        local_names = {id(p): n for n, p in self.module.named_parameters()}
        by_local = _slices_by_local(self.slices)
        return [s for p in self.sharded_parameters() for s in by_local[local_names[id(p)]]]

    def _reducer_residual_views(self, create: bool) -> Dict[str, torch.Tensor]:
        """The counterpart reducer's residual by global name (``create``: zeros if it has none
        yet); empty where it keeps none."""
        reducer = self.links.counterpart_reducer
        params = self.sharded_parameters()
        residual = reducer.residuals().get(0)
        if residual is None and create and self.links.counterparts is not None:
            reducer.load_residuals({0: torch.zeros(sum(p.numel() for p in params))}, self.torch_device,
                                   params[0].dtype)
            residual = reducer.residuals().get(0)  # still none: a reducer that keeps no residual
        if residual is None:
            return {}
        local_names = {id(p): n for n, p in self.module.named_parameters()}
        by_local = _slices_by_local(self.slices)
        out, offset = {}, 0
        for p in params:  # the order ``synchronize_counterparts`` flattens them in
            local = residual[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            for s in by_local[local_names[id(p)]]:
                out[s.name] = global_view(s, local)
        return out

    def state_views(self, names=None) -> dict:
        """Parameters and AdamW moments by global name (all, or only ``names``), as views of this
        role's tensors (no copy: serialise or write them before the role changes them), and the
        step count: everything a worker of any layout needs to continue this training."""
        slices = self.slices if names is None else [s for s in self.slices if s.name in names]
        return {"params": global_views(self.module, slices, "param"),
                **{key: global_views(self.module, slices, "state", self.optimizer, key) for key in ADAM_MOMENTS},
                "optimizer_steps": self.scheduler.last_epoch}

    def export_state(self, names=None) -> dict:
        """``state_views`` as host copies of their own."""
        views = self.state_views(names)
        out = {key: {n: t.to("cpu", copy=True) for n, t in views[key].items()} for key in TENSOR_KEYS}
        out["optimizer_steps"] = views["optimizer_steps"]
        return out

    def load_state(self, parts: Union[dict, Iterable[dict]], keep: Optional["Role"] = None) -> None:
        """Fill every parameter (and, past step 0, its AdamW moments) from ``keep``, the role this
        worker held before (what it holds of this role's names), and ``parts``: ``export_state``
        payloads each holding some names, read one at a time (a generator may produce them as it
        goes; each is emptied as it is read, so its tensors are freed one by one). A local
        tensor of ``keep`` whose global slices are exactly those of a tensor here is taken over
        as it is, with its moments; the rest is copied name by name, and each of ``keep``'s
        tensors is released once nothing more is taken from it, so the old and the new state
        together stay within the larger of the two and one tensor, beside the part being read.
        Every name must come from somewhere (``KeyError`` naming the first missing ones); the
        step counts must agree."""
        loader = _StateLoader(self)
        if keep is not None:
            loader.keep(keep)
        for part in ([parts] if isinstance(parts, dict) else parts):
            loader.add(part)
        loader.finish()

    def release(self) -> None:
        """Drop this role's tensors (parameters, grads, optimizer state) now, not when the role
        object is collected: the worker does so as it takes another role."""
        self.optimizer.state.clear()
        for p in self.module.parameters():
            p.grad = None
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def _slices_by_local(slices: Iterable[GlobalSlice]) -> Dict[str, List[GlobalSlice]]:
    out: Dict[str, List[GlobalSlice]] = {}
    for s in slices:
        out.setdefault(s.local, []).append(s)
    return out


def _layout(slices: List[GlobalSlice]) -> frozenset:
    return frozenset((s.name, s.dim, s.start, s.stop) for s in slices)


class _StateLoader:
    """Fills a role's parameters and moments name by name (``Role.load_state``)."""

    def __init__(self, role: Role):
        self.role = role
        self.params = dict(role.module.named_parameters())
        self.by_name = {s.name: s for s in role.slices}
        self.by_local = _slices_by_local(role.slices)
        for local, slices in self.by_local.items():
            _check_covers(local, self.params[local], slices)
        self.moments: Dict[str, Dict[str, torch.Tensor]] = {key: {} for key in ADAM_MOMENTS}
        self.filled: Dict[str, set] = {key: set() for key in TENSOR_KEYS}
        self.steps: Optional[int] = None

    def _agree(self, steps: int, where: str) -> None:
        if self.steps is None:
            self.steps = steps
        elif steps != self.steps:
            raise ValueError(f"state parts disagree on the optimizer step: {self.steps} and {steps} ({where})")

    def _target(self, key: str, local: str) -> torch.Tensor:
        if key == "params":
            return self.params[local].data
        moments = self.moments[key]
        if local not in moments:
            # Every slice of it will be written: ``finish`` checks that every name was.
            moments[local] = torch.empty_like(self.params[local], memory_format=torch.preserve_format)
        return moments[local]

    def _copy(self, key: str, name: str, value: torch.Tensor) -> None:
        s = self.by_name[name]
        dst = s.view(self._target(key, s.local))
        with torch.no_grad():
            dst.copy_(value.reshape(dst.shape))
        self.filled[key].add(name)

    def keep(self, old: Role) -> None:
        self._agree(old.scheduler.last_epoch, "the worker's previous role")
        old_params = dict(old.module.named_parameters())
        for p in old_params.values():
            p.grad = None  # gradients do not travel; drop them before anything new is filled
        old_by_name = {s.name: s for s in old.slices}
        old_by_local = _slices_by_local(old.slices)
        kept = {local: [s for s in slices if s.name in self.by_name] for local, slices in old_by_local.items()}
        by_layout = {_layout(slices): local for local, slices in old_by_local.items()}
        for local in [l for l, slices in kept.items() if not slices]:
            _release(old, old_params[local])  # everything of it moved away (or another role)
        moment_keys = ADAM_MOMENTS if self.steps > 0 else ()
        for local, slices in self.by_local.items():
            p = self.params[local]
            source = by_layout.get(_layout(slices))
            if source is not None:
                q = old_params[source]
                if (q.shape, q.dtype, q.device) == (p.shape, p.dtype, p.device):
                    state = old.optimizer.state.get(q, {})
                    p.data = q.data  # taken over: the very tensor, and its moments
                    for key in moment_keys:
                        self.moments[key][local] = state[key]
                    for key in ("params", *moment_keys):
                        self.filled[key].update(s.name for s in slices)
                    kept[source] = []
                    _release(old, q)
                    continue
            for s in slices:
                o = old_by_name.get(s.name)
                if o is None:
                    continue  # it comes in a part
                q = old_params[o.local]
                self._copy("params", s.name, global_view(o, q.data))
                state = old.optimizer.state.get(q, {})
                for key in moment_keys:
                    self._copy(key, s.name, global_view(o, state[key]))
                kept[o.local].remove(o)
                if not kept[o.local]:
                    _release(old, q)
        for local in old_params:
            _release(old, old_params[local])

    def add(self, part: dict) -> None:
        self._agree(part["optimizer_steps"], "a state part")
        keys = TENSOR_KEYS if self.steps > 0 else ("params",)
        for key in keys:
            tensors = part.get(key, {})
            for name in [n for n in tensors if n in self.by_name]:
                self._copy(key, name, tensors.pop(name))  # popped: each value is freed once copied

    def finish(self) -> None:
        role, steps = self.role, self.steps
        if steps is None:
            raise ValueError("no state to load")
        for key in TENSOR_KEYS if steps > 0 else ("params",):
            missing = sorted(set(self.by_name) - self.filled[key])
            if missing:
                raise KeyError(f"missing {key} of {len(missing)} names, e.g. {missing[:3]}")
        if steps > 0:
            for local, p in self.params.items():
                state = role.optimizer.state[p]
                for key in ADAM_MOMENTS:
                    state[key] = self.moments[key][local]
                state["step"] = torch.tensor(float(steps))
        role.scheduler.last_epoch = steps
        for group, base in zip(role.optimizer.param_groups, role.scheduler.base_lrs):
            group["lr"] = base * lr_factor(steps, role.cfg.train)


def _check_covers(local: str, p: torch.Tensor, slices: List[GlobalSlice]) -> None:
    """The global slices of a local tensor cover all of it (so filling every name fills it)."""
    if any(s.dim is None for s in slices):
        return
    dims = {s.dim for s in slices}
    extent = sum(s.stop - s.start for s in slices)
    if len(dims) != 1 or extent != p.shape[dims.pop()]:
        raise ValueError(f"the global slices of {local} do not cover it")


def _release(old: Role, p: torch.Tensor) -> None:
    old.optimizer.state.pop(p, None)
    p.grad = None
    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
