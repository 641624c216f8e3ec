"""What a change of split and a resume move, on the shared emulated cluster (``conftest.py``):

* a rebalance ships per slot exactly the names the plan diff gives it (moved heads and experts
  from their old owners, the replicated attention side to a slot that becomes an attention
  worker, from one old attention worker), nothing to itself, and the state comes through
  bit for bit;
* it leaves the count of named actors as it was (the rendezvous actors of the old groups are
  killed; Ray's NCCL groups would leave some, the stand-ins here are named as Ray names them),
  and a job's shutdown leaves none of its own;
* a resume reads per worker only the shards that hold its names, and of them only those names
  (also from a checkpoint written without ``shards.json``);
* the peak host memory of a migration and of a resume stays within one worker's own state.

``python tests/integration/test_migration_io.py --config cluster/paper-16gpu.yaml --set
emulation.modelled_compute=true --set cluster.fake_gpus=true`` prints the same figures for a
preset (bytes shipped by a rebalance against every worker's whole state, and each worker's peak
host memory against its own state, for the rebalance and for a resume).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from ray import cloudpickle

from ma_ray import config as C
from ma_ray.data import build_dataset
from ma_ray.parallel.diff import diff_plans
from ma_ray.parallel.emulation import stand_in_config
from ma_ray.parallel.placement import ATTENTION
from ma_ray.runtime import checkpoint
from ma_ray.runtime.worker_set import WorkerSet
from ma_ray.runtime.links import worker_name
from ma_ray.runtime.migration import payload_bytes

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "cluster" / "local-cpu.yaml"
MOMENTS = ("exp_avg", "exp_avg_sq")

if __name__ != "__main__":  # the probes below run inside the worker actors: ship them by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- the job's state as the driver sees it ------------------------------------------------------

def full_state(job) -> dict:
    """Every global tensor once: parameters and both AdamW moments."""
    return {"params": job.export(), **{key: job.export("state", key) for key in MOMENTS}}


def bytes_of(state: dict, names) -> int:
    return sum(t.numel() * t.element_size() for part in state.values() for n, t in part.items() if n in names)


def names_of_head(state: dict, head: int) -> set:
    return {n for n in state["params"] if f".attn.heads.{head}." in n}


def names_of_expert(state: dict, expert: int) -> set:
    return {n for n in state["params"] if f".experts.{expert}." in n}


def replicated(state: dict) -> set:
    return {n for n in state["params"] if ".heads." not in n and ".experts." not in n}


def held(state: dict, assignment) -> set:
    """The names the worker at ``assignment`` holds, from the plan's heads and experts."""
    out = set().union(*(names_of_head(state, h) for h in assignment.heads),
                      *(names_of_expert(state, e) for e in assignment.experts))
    return out | replicated(state) if assignment.role == ATTENTION else out


def assert_same_state(got: dict, want: dict) -> None:
    for key, tensors in want.items():
        assert set(got[key]) == set(tensors), key
        for name, t in tensors.items():
            assert torch.equal(got[key][name], t), (key, name)


def named_actors() -> set:
    return {(a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)}


def named_actors_settle_to(want: set, timeout_s: float = 10.0) -> set:
    """The named actors once they are ``want`` (a killed actor leaves the list when it is dead,
    shortly after ``ray.kill``), or as they are at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (now := named_actors()) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


# -- probes run in the workers ------------------------------------------------------------------

RSS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def _memory() -> dict:
    """This process's resident memory (bytes): all of it, its peak, and its parts: private
    (anonymous) memory, mapped files (a checkpoint's shards) and shared memory (Ray's object
    store, whose pages a process that writes or reads an object maps)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in RSS_KEYS:
            fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak(worker) -> dict:
    """Start a new peak: the kernel resets the high-water mark to the current RSS. And sample
    the private part every few milliseconds (the kernel keeps no peak of it) until
    ``_private_peak``."""
    import threading

    Path("/proc/self/clear_refs").write_text("5")
    peak, stop = {"RssAnon": 0}, threading.Event()

    def sample():
        while not stop.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], _memory()["RssAnon"])
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    worker._memory_sampler = (stop, thread, peak)
    return _memory()


def _private_peak(worker) -> int:
    stop, thread, peak = worker._memory_sampler
    stop.set()
    thread.join()
    return max(peak["RssAnon"], _memory()["RssAnon"])


def _probe(worker) -> dict:
    return {**_memory(), "state_bytes": payload_bytes(worker.role.state_views()),
            "loaded_bytes": getattr(worker, "loaded_bytes", {})}


def probe(job, fn) -> dict:
    return {slot: ray.get(actor.__ray_call__.remote(fn)) for slot, actor in job.workers.actors.items()}


def migration_overhead(before: dict, after: dict, private_peaks: dict) -> dict:
    """Per worker: how far its peak RSS during a migration rose above what it must hold anyway
    (its RSS before, plus the state it gained, if it gained any), all of it and its private
    part (what is not the object store's shared pages or a mapped file), and its own state (the
    larger of what it held before and after)."""
    out = {}
    for slot, a in after.items():
        b = before[slot]
        gained = max(0, a["state_bytes"] - b["state_bytes"])
        out[worker_name(*slot)] = {
            "overhead_bytes": max(0, a["VmHWM"] - b["VmRSS"] - gained),
            "private_overhead_bytes": max(0, private_peaks[slot] - b["RssAnon"] - gained),
            "own_state_bytes": max(a["state_bytes"], b["state_bytes"])}
    return out


def resume_overhead(fresh: dict, resumed: dict) -> dict:
    """Per worker: how far its peak RSS, started from a checkpoint, rose above that of the same
    worker of the same split started from the seed, plus the state it holds beyond that one
    (the moments: a start from the seed has none yet), and its own state."""
    out = {}
    for slot, r in resumed.items():
        f = fresh[slot]
        needed = f["VmHWM"] + max(0, r["state_bytes"] - f["state_bytes"])
        out[worker_name(*slot)] = {"overhead_bytes": max(0, r["VmHWM"] - needed),
                                   "own_state_bytes": r["state_bytes"]}
    return out


# -- the cases ----------------------------------------------------------------------------------

@ray.remote
class StandInStore:
    """Named as Ray's NCCL group names its rendezvous store of a pair; holds nothing."""


def nccl_store_name(key: str, group: str) -> str:
    # ray.util.collective: get_store_name(f"{comm_key}@{group_name}"), a sha256 of it.
    from ray.util.collective.const import get_store_name
    return get_store_name(f"{key}@{group}")


@pytest.fixture(scope="module")
def local_cfg(ray_cluster):
    return C.load(LOCAL, ["data.kind=synthetic"])


def expected_receipts(before_state: dict, old_plan, new_plan) -> tuple:
    """From the plan diff: dst worker -> {src worker: bytes} of moved heads and experts, and the
    workers that become attention workers (they also need the replicated side, from one old
    attention worker)."""
    diff = diff_plans(old_plan, new_plan)
    want: dict = {}
    for moves, names in ((diff.head_moves, names_of_head), (diff.expert_moves, names_of_expert)):
        for m in moves:
            by_src = want.setdefault(worker_name(*m.dst), {})
            src = worker_name(*m.src)
            by_src[src] = by_src.get(src, 0) + bytes_of(before_state, names(before_state, m.item))
    new_attention = {worker_name(*c.slot) for c in diff.role_changes if c.new_role == ATTENTION}
    return want, new_attention


def check_receipts(received: dict, before_state: dict, old_plan, new_plan) -> None:
    want, new_attention = expected_receipts(before_state, old_plan, new_plan)
    old_attention = {worker_name(g.node, g.local_gpu) for g in old_plan.attention_workers()}
    replica = bytes_of(before_state, replicated(before_state))
    for dst in {worker_name(g.node, g.local_gpu) for g in new_plan.gpus}:
        got, exp = received.get(dst, {}), want.get(dst, {})
        assert dst not in got, f"{dst} sent itself something"
        extra = {src: got.get(src, 0) - exp.get(src, 0) for src in set(got) | set(exp)}
        extra = {src: n for src, n in extra.items() if n}
        if dst in new_attention:
            # The replicated side once, from one old attention worker; the rest as the diff says.
            assert len(extra) == 1 and set(extra.values()) == {replica}, (dst, extra)
            assert set(extra) <= old_attention, (dst, extra)
        else:
            assert extra == {}, (dst, got, exp)


def test_rebalance_ships_only_what_moves_and_leaves_no_actors_behind(local_cfg):
    """The local preset, 12 -> 10 (experts move to two GPUs that become MoE workers, heads shift)
    and 10 -> 13 (three become attention workers): every receiver gets exactly the bytes of the
    names the plan diff moves to it. Before the first rebalance, stand-ins of the rendezvous
    actors Ray's NCCL groups create per pair and per collective group (named as Ray names them,
    in the world group and the attention pool's two levels) stand for the old groups';
    the rebalance removes them with the groups, so the count of named actors is as it was."""
    actors_before_job = named_actors()
    job = WorkerSet(local_cfg, build_dataset(local_cfg), torch_threads=1)
    try:
        job.step(0)
        actors_with_job = named_actors()
        world = f"{job.name}-g0-world"
        stores = [StandInStore.options(name=nccl_store_name(key, group), lifetime="detached", num_cpus=0).remote()
                  for key, group in (("3_0:7_0", world), ("1_0:2_0", f"{job.name}-g0-attn-node0"),
                                     ("0", f"{job.name}-g0-attn-x1"))]
        ray.get([s.__ray_ready__.remote() for s in stores])
        assert len(named_actors()) == len(actors_with_job) + 3
        figures = []
        for k in (10, 13):
            old_plan = job.plan
            before = full_state(job)
            result = job.move_to(k)
            after = full_state(job)
            assert_same_state(after, before)  # moved, not changed
            check_receipts(result["received_bytes"], before, old_plan, job.plan)
            whole = sum(bytes_of(before, held(before, g)) for g in job.plan.gpus)
            assert result["shipped_bytes"] < whole
            figures.append((k, result["shipped_bytes"], whole))
            assert named_actors_settle_to(actors_with_job) == actors_with_job
        assert job.step(1).loss > 0  # and it trains on
        print("\nlocal preset: shipped / every worker's whole state (what each rebalance moved before):",
              ", ".join(f"-> {k}: {s} / {w} bytes" for k, s, w in figures))
    finally:
        job.shutdown()
    assert named_actors_settle_to(actors_before_job) == actors_before_job


def small_cfg(**over):
    base = C.load(ROOT / "tests" / "configs" / "live-job.yaml", ["train.num_train_steps=6"])
    return base.replace(**over) if over else base


def shard_owners(state: dict, plan) -> dict:
    """Shard file -> the names it holds, from the plan (the replicated side: attention rank 0)."""
    out = {}
    for g in plan.gpus:
        names = held(state, g)
        if not (g.role == ATTENTION and g.rank == 0):
            names -= replicated(state)
        out[f"{worker_name(g.node, g.local_gpu)}.pt"] = names
    return out


def test_resume_reads_only_the_names_each_worker_holds(ray_cluster, tmp_path):
    """A checkpoint of 4 attention GPUs resumed on 2, then (without its ``shards.json``, as a
    checkpoint written before it) on 3: every worker's state is the saved one bit for bit, and it
    read exactly the bytes of its own names, from only the shards that hold them (with the index;
    without it every shard is opened and still only its names are read)."""
    cfg = small_cfg()
    dataset = build_dataset(cfg)
    job = WorkerSet(cfg.with_split(4), dataset, torch_threads=1)
    try:
        job.step(0)
        folder = checkpoint.save(job, tmp_path, 0)
        saved, saved_plan = full_state(job), job.plan
    finally:
        job.shutdown()
    owners = shard_owners(saved, saved_plan)
    assert json.loads((folder / "shards.json").read_text()) == {f: sorted(n) for f, n in owners.items()}
    for k, index in ((2, True), (3, False)):
        if not index:
            (folder / "shards.json").unlink()
        job = WorkerSet(cfg.with_split(k), dataset, torch_threads=1, checkpoint=str(folder))
        try:
            assert_same_state(full_state(job), saved)
            seen = probe(job, _probe)
            for g in job.plan.gpus:
                mine = held(saved, g)
                loaded = seen[g.slot]["loaded_bytes"]
                want = {f: bytes_of(saved, names & mine) for f, names in owners.items() if names & mine}
                assert loaded == want, (worker_name(g.node, g.local_gpu), loaded, want)
                assert sum(loaded.values()) == seen[g.slot]["state_bytes"]  # its own state, once
            assert job.step(1).loss > 0
        finally:
            job.shutdown()


def big_experts():
    """2 nodes x 3 GPUs with experts big enough that a worker's state stands out from the noise
    of a process's memory: about 95 MB of fp32 parameters and moments per MoE worker at 4
    attention GPUs."""
    return small_cfg(**{"model.num_layers": 4, "model.hidden_size": 192, "model.attention_head_size": 32,
                        "model.intermediate_size": 2048})


def measure(cfg, k_from=None, k_to=10, root: Path = None) -> dict:
    """Bytes a rebalance ships, and each worker's peak host memory above what it must hold anyway,
    for the rebalance and for a resume (on ``k_from``) from a checkpoint of the result."""
    data_cfg = stand_in_config(cfg) if cfg.emulation.modelled_compute else cfg
    dataset = build_dataset(data_cfg)
    job = WorkerSet(cfg.with_split(k_from), dataset, torch_threads=1)
    try:
        job.step(0)
        before_state = full_state(job)
        before = probe(job, _probe)
        probe(job, _reset_peak)
        result = job.move_to(k_to)
        private = probe(job, _private_peak)
        migration = migration_overhead(before, probe(job, _probe), private)
        new_whole = sum(bytes_of(before_state, held(before_state, g)) for g in job.plan.gpus)
        folder = checkpoint.save(job, root, 1)
    finally:
        job.shutdown()
    peaks = {}
    for start in (None, str(folder)):
        job = WorkerSet(cfg.with_split(k_from), dataset, torch_threads=1, checkpoint=start)
        try:
            peaks[start] = probe(job, _probe)
        finally:
            job.shutdown()
    return {"shipped_bytes": result["shipped_bytes"], "whole_state_bytes": new_whole,
            "migration": migration, "resume": resume_overhead(peaks[None], peaks[str(folder)])}


def test_peak_host_memory_stays_within_one_workers_state(ray_cluster, tmp_path):
    """4 -> 3 attention GPUs (experts spread from two MoE workers to three), then a resume of
    that on 4: no worker's peak RSS rises above what it must hold anyway by more than its own
    state (plus 24 MB for what a process allocates around it: new collective groups, Ray's
    messages; ``migration_overhead``, ``resume_overhead``), and its private memory during the
    migration rises by less than that (what it sends and receives are the object store's pages,
    mapped, not copies of its own). The old migration cloned and shipped every worker's whole
    state and a resume read every shard, the whole model, into every worker."""
    figures = measure(big_experts(), 4, 3, tmp_path)
    print("\n" + json.dumps(summary(figures), indent=1))
    slack = 24 << 20
    for phase in ("migration", "resume"):
        for worker, f in figures[phase].items():
            assert f["overhead_bytes"] <= f["own_state_bytes"] + slack, (phase, worker, f)
            assert f.get("private_overhead_bytes", 0) <= slack, (phase, worker, f)
    # Big enough to tell: reading every shard, as a resume did, would break the bound.
    assert max(f["own_state_bytes"] for f in figures["migration"].values()) > 60 << 20
    assert figures["whole_state_bytes"] > max(f["own_state_bytes"] for f in figures["resume"].values()) + slack


def summary(figures: dict) -> dict:
    """The largest overheads of each phase, and the worker closest to its bound (its own state)."""
    out = {k: figures[k] for k in ("shipped_bytes", "whole_state_bytes")}
    for phase in ("migration", "resume"):
        rows = figures[phase]
        worst = max(rows.items(), key=lambda kv: kv[1]["overhead_bytes"] - kv[1]["own_state_bytes"])
        out[phase] = {key: max(r[key] for r in rows.values())
                      for key in ("overhead_bytes", "private_overhead_bytes", "own_state_bytes") if key in worst[1]}
        out[phase]["closest_to_its_bound"] = {worst[0]: worst[1]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(LOCAL))
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--from", dest="k_from", type=int, default=None)
    parser.add_argument("--to", dest="k_to", type=int, default=10)
    parser.add_argument("--out", default="/tmp/ma-ray-migration-io")
    args = parser.parse_args(argv)
    from ma_ray.runtime.cluster import init_ray
    cfg = C.load(args.config, args.set)
    init_ray(cfg.cluster, num_cpus=2)
    root = Path(args.out)
    figures = measure(cfg, args.k_from, args.k_to, root)
    print(json.dumps({"summary": summary(figures), **figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
