"""Host synchronisations of a train step, counted inside the real workers.

On a GPU, every read of a device value on the host, every op whose output size depends on the
data and every blocking copy of host data to the device makes the host wait until the device has
caught up: the host stops launching work, and the overlap of the two pools is gone. On CPU
nothing waits, but the calls can be seen. ``SyncProbe`` wraps them in each worker process of a
real ``WorkerSet`` on the shared emulated cluster, installed and read back through Ray's
``__ray_call__`` on the job's own worker actors; it counts the calls made under
``Role.train_step`` (on any other thread, or outside the step, nothing is counted), each by the
innermost ``ma_ray`` frame that made it and the schedule op it ran in (``step`` outside the ops):

* a device value read on the host: ``Tensor.item``, ``tolist``, ``numpy``, ``cpu``, ``cuda``,
  ``int()``, ``float()``, ``bool()`` and ``__index__`` of a tensor;
* an output sized by the data: ``nonzero``, ``bincount`` (CUDA reads the maximum),
  ``masked_select``, ``torch.unique``, boolean-mask indexing (``x[mask]``, ``x[mask] = v``), and
  ``repeat_interleave`` with a tensor of repeats and no ``output_size``;
* host data copied to the device: every ``Tensor.to`` that names a device (on CPU a copy from
  the host cannot be told from one already on the device, or from one to the host, so all are
  counted: the roles' only one is their input), and ``torch.tensor`` / ``torch.as_tensor`` made
  on a given device.

Not seen from Python: ``copy_`` across devices (the roles make none of host data) and the
syncs C++ makes inside an op (the data-dependent ops above are the ones of that kind). Two
sources are set aside, and reported: the gloo groups (``comm/torch_backend.py``, the CPU stand-in
for NCCL, whose strict mode reads its own handshake tensors; on a GPU the collectives are
NCCL's), and ``torch.optim`` (AdamW reads its step counters, host tensors unless capturable: no
device work is waited for).

What a step may make (``ATTENTION_ALLOWED``, ``MOE_ALLOWED``): per layer and micro-batch, the
sizes of the exchange between the pools, once on each side, and nothing else; per micro-batch,
the attention worker's input; per step, the losses read once and the global gradient norm.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter

import ray
import torch
from ray import cloudpickle

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.runtime.worker_set import WorkerSet

LOCAL = "cluster/local-cpu.yaml"
STEP = "step"  # the phase of a call outside the schedule's ops
OUTSIDE = "outside ma_ray"  # the site of a call no ma_ray frame made
COUNTED, CPU_BACKEND, OPTIMIZER = "counted", "cpu backend", "optimizer"

# (op, site, call) -> how many per run of the op, and what the read is for. Anything else counted
# inside an op fails the test.
ATTENTION_ALLOWED = {
    ("attn_fwd", "runtime/attention_role.py:attn_fwd", "tolist"):
        (1, "the kept rows of this worker's slice per expert: the size of every block it sends "
            "each MoE worker and receives back, forward and backward (the exchange's sizes)"),
    ("embed", "runtime/attention_role.py:embed", "to(device)"):
        (1, "the micro-batch's token ids and targets of this slice, one copy: the input, read "
            "from the dataset on the host (no computed value is waited for)"),
}
MOE_ALLOWED = {
    ("expert_recv", "runtime/moe_role.py:expert_recv", "tolist"):
        (1, "every source's row count per local expert, received together: the exchange's sizes, "
            "which plan the chunks and compute batches"),
}
# Outside the ops, per step: the attention worker reads its loss parts and dropped count once
# (end_micro_batches); every worker reads the global gradient norm (for clipping).
ATTENTION_PER_STEP = 2
MOE_PER_STEP = 1


class SyncProbe:
    """Wraps the calls that make the host wait for the device (module docstring) and counts
    those made under ``Role.train_step`` by ``(phase, site, call, kind)``."""

    def __init__(self, step_code, op_of):
        """``step_code``: the code of the step (``Role.train_step``); ``op_of``: the code of each
        op handler -> its op kind."""
        import ma_ray

        self.pkg = os.path.dirname(os.path.abspath(ma_ray.__file__)) + os.sep
        self.optim = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "optim") + os.sep
        self.step_code, self.op_of = step_code, op_of
        self.counts: Counter = Counter()
        self._undo = []

    # -- installing -----------------------------------------------------------------------

    def install(self) -> None:
        T = torch.Tensor
        for name in ("item", "tolist", "numpy", "cpu", "cuda", "__int__", "__float__", "__bool__", "__index__",
                     "nonzero", "bincount", "masked_select"):
            self._wrap(T, name, name)
        for name in ("nonzero", "bincount", "masked_select", "unique"):
            self._wrap(torch, name, name)
        self._wrap(T, "__getitem__", "x[mask]", _bool_index)
        self._wrap(T, "__setitem__", "x[mask] = v", _bool_index)
        self._wrap(T, "repeat_interleave", "repeat_interleave", _unsized_repeats)
        self._wrap(torch, "repeat_interleave", "repeat_interleave", _unsized_repeats)
        self._wrap(T, "to", "to(device)", _names_device)
        for name in ("tensor", "as_tensor"):
            self._wrap(torch, name, f"{name}(device=...)", lambda args, kwargs: kwargs.get("device") is not None)

    def uninstall(self) -> None:
        for owner, name, original, own in reversed(self._undo):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # it was inherited (torch.Tensor from its C base)
        self._undo.clear()

    def _wrap(self, owner, name, call, when=None) -> None:
        original = getattr(owner, name)
        probe = self

        def wrapper(*args, **kwargs):
            if when is None or when(args, kwargs):
                probe._record(call)
            return original(*args, **kwargs)

        wrapper.__name__ = name
        self._undo.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, wrapper)

    # -- counting -------------------------------------------------------------------------

    def _record(self, call: str) -> None:
        site, phase, in_step, via_optim = OUTSIDE, STEP, False, False
        f = sys._getframe(2)  # the caller of the wrapper
        while f is not None:
            code = f.f_code
            if site == OUTSIDE:
                if code.co_filename.startswith(self.pkg):
                    site = f"{code.co_filename[len(self.pkg):]}:{code.co_name}"
                elif code.co_filename.startswith(self.optim):
                    via_optim = True
            if phase == STEP and code in self.op_of:
                phase = self.op_of[code]
            if code is self.step_code:
                in_step = True
                break
            f = f.f_back
        if not in_step:
            return
        kind = (CPU_BACKEND if site.startswith("comm/torch_backend.py") else OPTIMIZER if via_optim else COUNTED)
        self.counts[(phase, site, call, kind)] += 1


def _bool_index(args, kwargs) -> bool:
    index = args[1]
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
               for i in (index if isinstance(index, tuple) else (index,)))


def _unsized_repeats(args, kwargs) -> bool:
    """The output size of ``repeat_interleave`` is read from the device: repeats are a tensor (or
    the one argument) and ``output_size`` is not given."""
    if kwargs.get("output_size") is not None:
        return False
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return repeats is None or isinstance(repeats, torch.Tensor)


def _names_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) or (isinstance(a, int) and not isinstance(a, bool))
               for a in args[1:])


# -- run in the worker processes (``__ray_call__``: fn(worker, ...)) --------------------------------

def _install(worker) -> dict:
    role = worker.role
    probe = SyncProbe(type(role).train_step.__code__,
                      {fn.__func__.__code__: kind for kind, fn in role.op_handlers().items()})
    probe.install()
    worker.host_sync_probe = probe
    return {"role": role.kind, "ops": dict(Counter(op.kind for op in role.schedule))}


def _collect(worker) -> list:
    probe = worker.host_sync_probe
    probe.uninstall()
    del worker.host_sync_probe
    return [(*key, n) for key, n in sorted(probe.counts.items())]


def config():
    """2 attention and 2 MoE workers (experts 3 + 2), 2 layers, 3 micro-batches of which 2 are in
    flight, top-2 with drops, and 4-row chunks: each exchange is several chunks and compute
    batches, so a read per chunk or per batch would show."""
    return C.load(LOCAL).replace(**{
        "cluster.num_nodes": 2, "cluster.gpus_per_node": 2, "cluster.attention_gpus": 2,
        "balance.min_attention_gpus": 1, "balance.max_attention_gpus": 3,
        "model.num_layers": 2, "model.hidden_size": 16, "model.num_attention_heads": 4,
        "model.attention_head_size": 4, "model.intermediate_size": 32, "model.max_position_embeddings": 8,
        "moe.num_experts": 5, "moe.top_k": 2, "moe.capacity_factor": 0.75,
        "train.seq_length": 8, "train.micro_batch_size": 3, "train.batch_size": 9,
        "train.gradient_accumulation_steps": 3, "schedule.micro_batches_in_flight": 2,
        "schedule.communication_chunk_size": 4, "data.kind": "synthetic",
    })


def test_probe_counts_each_kind_of_call():
    """The wrappers see each call they stand for, and only under the step."""
    t, mask = torch.arange(4), torch.tensor([True, False, True, False])

    def step():  # stands for Role.train_step
        t.sum().item(), t.tolist(), int(t[0]), float(t[1]), bool(t[2]), range(t[3])
        torch.nonzero(t), t.bincount(), t[mask], torch.repeat_interleave(t, t)
        u = t.clone()
        u[mask] = 0
        t.to("cpu"), torch.tensor([1], device="cpu")
        # None of these wait for the device:
        t.to(torch.float64), t[1:3], torch.repeat_interleave(t, t, output_size=6), torch.tensor([1])

    probe = SyncProbe(step.__code__, {})
    probe.install()
    try:
        t.tolist(), int(t[0]), t[mask]  # outside the step: not counted
        step()
    finally:
        probe.uninstall()
    assert "item" not in vars(torch.Tensor)
    step()  # undone: counted once each, not twice
    seen = Counter()
    for (phase, site, call, kind), n in probe.counts.items():
        assert (phase, site, kind) == (STEP, OUTSIDE, COUNTED)
        seen[call] += n
    assert seen == Counter({call: 1 for call in (
        "item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "bincount", "x[mask]",
        "repeat_interleave", "x[mask] = v", "to(device)", "tensor(device=...)")})


def test_host_syncs_per_layer_and_micro_batch_fit_the_budget(ray_cluster):
    cfg = config()
    layers, micro = cfg.model.num_layers, cfg.train.gradient_accumulation_steps
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this file
    try:
        job = WorkerSet(cfg.with_split(2), build_dataset(cfg), torch_threads=1)
        try:
            job.step(0)  # the optimizer's state exists from the first step on: count a later one
            actors = job.workers.actors
            setup = dict(zip(actors, ray.get([a.__ray_call__.remote(_install) for a in actors.values()], timeout=60)))
            metrics = job.step(1)
            counts = dict(zip(actors, ray.get([a.__ray_call__.remote(_collect) for a in actors.values()], timeout=60)))
        finally:
            job.shutdown()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert math.isfinite(metrics.loss) and metrics.dropped_fraction > 0  # the drop path ran
    for info in setup.values():  # one exchange per layer and micro-batch, one input per micro-batch
        exchange, once = ("attn_fwd", "embed") if info["role"] == "attention" else ("expert_recv", None)
        assert info["ops"][exchange] == layers * micro and (once is None or info["ops"][once] == micro)

    report, checks = [], []
    for slot, rows in counts.items():
        role, ops = setup[slot]["role"], setup[slot]["ops"]
        attention = role == "attention"
        allowed = ATTENTION_ALLOWED if attention else MOE_ALLOWED
        counted, set_aside = Counter(), Counter()
        for phase, site, call, kind, n in rows:
            (counted if kind == COUNTED else set_aside)[(phase, site, call)] += n
            report.append(f"{slot} {role:9} {phase:17} {site:45} {call:18} {kind:11} {n:4}")
        total = sum(counted.values())
        per_step = ATTENTION_PER_STEP if attention else MOE_PER_STEP
        budget = layers * micro + (micro if attention else 0) + per_step
        report.append(f"{slot} {role:9} counted {total} in the step (budget {budget}: {layers} layers x {micro} "
                      f"micro-batches, {'a micro-batch input each, ' if attention else ''}{per_step} per step)")
        checks.append((slot, role, ops, allowed, counted, set_aside, total, per_step, budget))
    listing = "\n".join(report)
    print(listing)
    for slot, role, ops, allowed, counted, set_aside, total, per_step, budget in checks:
        # Inside the ops: per layer and micro-batch the exchange's sizes once, per micro-batch the
        # input, nothing else.
        in_ops = {key: n for key, n in counted.items() if key[0] != STEP}
        want = {key: per_run * ops[key[0]] for key, (per_run, _why) in allowed.items()}
        assert in_ops == want, f"{slot} ({role}): {in_ops} != {want}\n{listing}"
        assert sum(n for key, n in counted.items() if key[0] == STEP) <= per_step, listing
        assert total <= budget, listing
        # The probe was live in this process: AdamW's reads of its host-side step counters are seen.
        assert any(phase == STEP for phase, _site, _call in set_aside), listing
