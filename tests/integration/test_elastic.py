"""Elastic restart on a real multi-node local cluster: ``ray.cluster_utils.Cluster`` with a head
without GPUs and two nodes of 2 fake GPUs each, the placement group spread over both. One node
is removed mid-run; with ``train.elastic`` the run goes on by itself on the node that is left,
at the split the predictor chooses. A node is added back, and at its next checkpoint the run
grows back onto both nodes at the configured split. Its losses are an uninterrupted run's
throughout (fp64; the layout changes, so within rounding).

The cluster is its own, so the run is a subprocess (this file, run as a script): a process
joins one Ray cluster, and the tests' shared one may be up already.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "configs" / "live-job.yaml"
STEPS = 10


def test_a_run_goes_on_with_fewer_nodes(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    print("\n" + res.stdout.strip().splitlines()[-1])


def rows(out: Path):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main(tmp: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import ma_ray
    from ma_ray import config as C
    from ma_ray.run_folder import new_job_id
    from ma_ray.train import train
    from ma_ray.verify import TOLERANCE, exact_settings

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    cfg = exact_settings(C.load(CONFIG, [
        "cluster.gpus_per_node=2", "cluster.attention_gpus=2", "cluster.fake_gpus=false",
        f"cluster.address={cluster.address}", "cluster.placement_timeout_s=10", "balance.min_attention_gpus=1",
        "balance.max_attention_gpus=3", "train.checkpoint_interval=2", "train.elastic=true",
        "comm.synchronization_timeout_ms=2000", "control.namespace=elastic-test",
        f"train.num_train_steps={STEPS}"]), "fp64")
    try:
        train(cfg, tmp / "straight", new_job_id(), progress=False)
        want = {r["step"]: r["loss"] for r in rows(tmp / "straight")}

        out, ended = tmp / "elastic", {}
        thread = threading.Thread(target=lambda: ended.update(result=train(cfg, out, new_job_id(), progress=False)))
        thread.start()
        deadline = time.time() + 300
        while not any(r.get("step") == 3 for r in rows(out)):
            assert thread.is_alive() and time.time() < deadline, "the run did not reach step 3"
            time.sleep(0.05)
        removed_at = time.time()
        cluster.remove_node(nodes[1])
        shrunk_from = len(rows(out))
        while not any(r.get("attention_gpus") == 1 for r in rows(out)[shrunk_from:]):  # a step on one node
            assert thread.is_alive() and time.time() < deadline, "the run did not go on with one node"
            time.sleep(0.05)
        # Paused while the node joins, so that steps are left to grow back in (one may still run).
        client = ma_ray.connect(run=out)
        client.pause()
        cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes()
        client.resume()
        thread.join(timeout=600)
        assert "result" in ended, "the run failed or did not end"
        got = rows(out)
        steps = [r for r in got if "event" not in r]
        assert [r["step"] for r in steps] == list(range(STEPS)), [r.get("step") for r in got]
        failures = [r for r in got if r.get("event") == "failure"]
        last = failures[-1]
        grown = [r for r in got if r.get("event") == "grow"]
        assert len(grown) == 1 and grown[0]["nodes"] == 2 and grown[0]["to"] == 2, grown
        assert [r["attention_gpus"] for r in steps if r["step"] > last["resumed_from"]] == \
            [1 if r["step"] < grown[0]["before_step"] else 2 for r in steps if r["step"] > last["resumed_from"]]
        assert grown[0]["before_step"] < STEPS, "the run ended before it grew back"
        worst = max(abs(r["loss"] - want[r["step"]]) / abs(want[r["step"]]) for r in steps)
        assert worst < TOLERANCE, worst
        assert any("going on with 1 of 2 nodes" in note for note in last["notes"]), failures
        print(f"elastic: node removed at step 4; {len(failures)} failure record(s), the first detected "
              f"{failures[0]['detected_at'] - removed_at:.1f} s after the removal; back at step "
              f"{last['resumed_from'] + 1} on 1 node {last['detected_at'] + last['recover_s'] - removed_at:.1f} s "
              f"after it; grown back to 2 nodes before step {grown[0]['before_step']} in "
              f"{grown[0]['pause_s']:.1f} s; worst loss rel err {worst:.1e}")
    finally:
        ray.shutdown()  # the driver first: the cluster will not remove the node it is attached to
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
