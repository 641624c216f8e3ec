"""Which saved replicas' sharded residuals a worker of a resumed run takes, and their files
(``runtime.residuals``): every saved replica's go to exactly one replica of the new run."""

from __future__ import annotations

import torch

from ma_ray.runtime import residuals


def test_every_saved_replica_goes_to_exactly_one_new_replica():
    for saved in ({0}, {0, 1}, {0, 1, 2}):
        for replicas in (1, 2, 3, 4):
            taken = [residuals.taken_replicas(r, replicas, saved) for r in range(replicas)]
            assert sorted(x for t in taken for x in t) == sorted(saved), (saved, replicas, taken)
            for r in range(1, replicas):
                assert taken[r] <= {r}
    assert residuals.taken_replicas(0, 1, {0, 1, 2}) == {0, 1, 2}
    assert residuals.taken_replicas(2, 3, {0, 1}) == set()


def test_sharded_residuals_are_written_and_read_by_name(tmp_path):
    a = {"layers.0.experts.1.w1": torch.arange(6.0).reshape(2, 3), "layers.0.experts.2.w1": torch.ones(2, 3)}
    path, nbytes = residuals.save_sharded(tmp_path, 1, 2, 0, a)
    assert path.relative_to(tmp_path).as_posix() == "residuals/replica1/node2-gpu0.pt" and nbytes == 48
    assert residuals.save_sharded(tmp_path, 0, 0, 0, {}) is None  # nothing held, no file
    assert residuals.saved_replicas(tmp_path) == {1}
    (part,) = residuals.read_sharded(tmp_path, {1}, {"layers.0.experts.2.w1", "other"})
    assert set(part) == {"layers.0.experts.2.w1"} and part["layers.0.experts.2.w1"].equal(torch.ones(2, 3))
    assert list(residuals.read_sharded(tmp_path, {0}, set(a))) == []
