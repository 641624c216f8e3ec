"""The two-level collectives send what the model counts, per GPU and per level, at the splits of
4 x 4 whose nodes hold unequal numbers of attention GPUs (9: 2, 2, 2, 3 and 14: 3, 3, 4, 4), on
real groups of the CPU backend in strict NCCL mode, and their results stay exact.

``comm.uneven`` counts what leaves each process in each group; ``comm.aggregation`` scales it
like its model (``sent_bytes`` against ``level_bytes``). Padding every chunk to the largest sent
up to 1.5 x the model's intra-node bytes at 14; the check below is equality.
"""

from __future__ import annotations

import sys

import pytest
import ray
import torch
from ray import cloudpickle

PER_NODE = {9: (2, 2, 2, 3), 14: (3, 3, 4, 4)}


@ray.remote(num_cpus=0)
class Gpu:
    def __init__(self, index: int):
        import ma_ray.comm  # noqa: F401 - pay torch's import once, at start-up

        self.index = index

    def run(self, fn, *args):
        return fn(self.index, *args)


@pytest.fixture(scope="module")
def gpus(ray_cluster):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actors = [Gpu.remote(i) for i in range(max(PER_NODE))]
    ray.get([a.run.remote(lambda i: i) for a in actors], timeout=180)
    yield actors
    for actor in actors:
        ray.kill(actor)


def on(actors, indices, fn, *args, timeout=180):
    return ray.get([actors[i].run.remote(fn, *args) for i in indices], timeout=timeout)


def data(rank, sizes, width, numel):
    """Rank ``rank``'s integer-valued inputs: its token slice, a whole micro-batch to scatter, a
    flat vector. Any summation order is exact on them."""
    g = torch.Generator().manual_seed(1000 + rank)
    local = torch.randint(-50, 50, (sizes[rank], width), generator=g).double()
    full = torch.randint(-50, 50, (sum(sizes), width), generator=g).double()
    flat = torch.randint(-50, 50, (numel,), generator=g).double()
    return local, full, flat


@pytest.mark.parametrize("k", sorted(PER_NODE))
def test_bytes_sent_equal_bytes_modelled_at_uneven_splits(gpus, k):
    from ma_ray.parallel.hierarchy import TwoLevelLayout

    per_node = PER_NODE[k]
    starts = [sum(per_node[:i]) for i in range(len(per_node))]
    layout = TwoLevelLayout(nodes=tuple(tuple(range(s, s + n)) for s, n in zip(starts, per_node)),
                            node_ids=tuple(range(len(per_node))))
    prefix = f"bytes{k}"
    specs = {r: layout.groups_to_join(r) for r in range(k)}

    def join(index, prefix, specs):
        from ma_ray.comm import create_group
        for suffix, ranks, rank in specs[index]:
            create_group(f"{prefix}-{suffix}", [f"{prefix}-gpu{r}" for r in ranks], rank, strict=True)
        return [f"{prefix}-{suffix}" for suffix, _, _ in specs[index]]

    names = on(gpus, range(k), join, prefix, specs)

    def aggregate(index, layout, prefix, k, data):
        from ma_ray.comm.aggregation import TwoLevelAggregation
        from ma_ray.parallel.shares import share_counts

        # Two shapes of slices: the runtime's (a row apart) and ragged ones with empty slices.
        cases = [share_counts(10 * k + 3, k), [(3 * r) % 7 for r in range(k)]]
        out = []
        for sizes in cases:
            agg = TwoLevelAggregation(layout, index, prefix)
            local, full, flat = data(index, sizes, 3, 31)
            every = [data(r, sizes, 3, 31) for r in range(k)]
            gathered = agg.gather_tokens(local, sizes)
            scattered = agg.scatter_tokens(full, sizes)
            agg.allreduce(flat)
            start = sum(sizes[:index])
            exact = (torch.equal(gathered, torch.cat([e[0] for e in every]))
                     and torch.equal(scattered, sum(e[1] for e in every)[start:start + sizes[index]])
                     and torch.equal(flat, sum(e[2] for e in every)))
            out.append((sizes, exact, dict(agg.level_bytes), dict(agg.sent_bytes)))
        return out

    results = on(gpus, range(k), aggregate, layout, prefix, k, data)
    for rank, cases in enumerate(results):
        for sizes, exact, modelled, sent in cases:
            assert exact, f"rank {rank} at slices {sizes}: a result differs from the exact sum"
            for level in modelled:
                assert sent[level] == pytest.approx(modelled[level], rel=1e-12, abs=1e-9), (
                    f"rank {rank} at slices {sizes}, {level}: sent {sent[level]} B, modelled {modelled[level]} B")
    # The model is not trivially zero where it matters: every GPU of a node sends inside it.
    assert all(c[2]["intra_node"] > 0 for cases in results for c in cases)

    def leave(index, names):
        from ma_ray.comm import destroy_group
        for name in names[index]:
            destroy_group(name)

    on(gpus, range(k), leave, names)
