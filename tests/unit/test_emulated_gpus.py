"""``cluster.fake_gpus``: fake GPUs where a machine has none, its real GPUs where it has some."""

from __future__ import annotations

import pytest

from ma_ray import config as C
from ma_ray.runtime.cluster import ClusterError, emulated_gpus


def cluster(nodes, per_node, replicas=1):
    return C.load("cluster/local-cpu.yaml").replace(**{
        "cluster.num_nodes": nodes, "cluster.gpus_per_node": per_node, "cluster.replicas": replicas,
        "cluster.attention_gpus": nodes * per_node - nodes, "balance.min_attention_gpus": 1,
        "balance.max_attention_gpus": nodes * per_node - 1}).cluster


def test_without_gpus_the_topology_is_advertised():
    assert emulated_gpus(cluster(4, 4), 0) == 16
    assert emulated_gpus(cluster(2, 2, replicas=2), 0) == 8


def test_with_gpus_the_real_ones_are_advertised():
    """Every index Ray hands out is a GPU that exists: 2 emulated nodes of 3 on 8 real GPUs."""
    assert emulated_gpus(cluster(2, 3), 8) == 8
    assert emulated_gpus(cluster(2, 4), 8) == 8


def test_a_topology_larger_than_the_machine_is_one_line():
    with pytest.raises(ClusterError) as info:
        emulated_gpus(cluster(4, 4), 8)
    assert str(info.value) == ("cluster.fake_gpus: the topology needs 16 GPUs (1 replica(s) x 4 node(s) x 4) and "
                               "this machine has 8; on a machine with GPUs the emulated nodes stand on real ones: "
                               "make the topology fit")
