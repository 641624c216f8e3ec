"""The topk reducer's warm-up (ma_ray/comm/cross_node.py, ``comm.compression_warmup_steps``):
which steps cross dense, what each step's wire factor and ``compresses`` say, and that a residual
held when a step crosses dense is sent, not dropped. No Ray: the collectives are those of a
group of two members whose other member sends zeros, so a sum is this member's own piece and
an all-gather yields its message beside an empty one (the multi-member sums are
tests/integration/test_comm.py's)."""

import pytest
import torch

from ma_ray.comm import cross_node
from ma_ray.comm.compression import CompressionSettings, compress, decompress_add_, message_bytes
from ma_ray.comm.cross_node import DenseCrossNode, TopKCrossNode, cross_node_reducer

SETTINGS = CompressionSettings(0.25, 8, 16)
NUMEL = 64


class TwoMembersOtherSilent:
    """groups' allreduce / allgather / world_size for a group of 2 whose other member adds zero."""

    def __init__(self):
        self.calls = []

    def allreduce(self, tensor, group):
        self.calls.append("allreduce")  # the other member's part is zero: the sum is ours

    def allgather(self, outputs, tensor, group):
        self.calls.append("allgather")
        outputs[0].copy_(tensor)
        outputs[1].copy_(compress(torch.zeros(NUMEL), SETTINGS))  # a message of zeros

    def world_size(self, group):
        return 2


@pytest.fixture
def wire(monkeypatch):
    fake = TwoMembersOtherSilent()
    for name in ("allreduce", "allgather", "world_size"):
        monkeypatch.setattr(cross_node.groups, name, getattr(fake, name))
    return fake


def _piece(seed):
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))


def test_warmup_steps_cross_dense_then_compressed(wire):
    reducer = TopKCrossNode(SETTINGS, warmup_steps=2)
    dense_factor = DenseCrossNode().wire_factor(2, NUMEL, 4)
    sparse_factor = message_bytes(NUMEL, SETTINGS) / (NUMEL * 4)
    for step in range(2):
        reducer.begin_step(step)
        assert not reducer.compresses and reducer.wire_factor(2, NUMEL, 4) == dense_factor
        piece = _piece(step)
        part = piece.clone()
        reducer.reduce(0, part, "g", [NUMEL])
        assert torch.equal(part, piece)  # exact
        assert reducer.residuals() == {}  # nothing held back
    assert wire.calls == ["allreduce", "allreduce"]

    reducer.begin_step(2)
    assert reducer.compresses and reducer.wire_factor(2, NUMEL, 4) == pytest.approx(sparse_factor)
    piece = _piece(2)
    part = piece.clone()
    reducer.reduce(0, part, "g", [NUMEL])
    assert wire.calls[-1] == "allgather"
    expected = decompress_add_(torch.zeros(NUMEL), compress(piece, SETTINGS), NUMEL, SETTINGS)
    assert torch.equal(part, expected)
    assert torch.count_nonzero(part) == 16  # a quarter of each 16-entry block
    assert torch.allclose(part + reducer.residuals()[0], piece, atol=1e-6)  # delayed, not lost


def test_no_warmup_compresses_from_step_zero_before_begin_step(wire):
    reducer = cross_node_reducer("topk", SETTINGS)
    assert reducer.compresses  # warmup_steps defaults to 0, the seed's scheme
    reducer.begin_step(0)
    part = _piece(0)
    reducer.reduce(0, part, "g", [NUMEL])
    assert wire.calls == ["allgather"]


def test_a_dense_step_sends_the_held_residual(wire):
    """A run resumed at a step before the warm-up's end, with residuals from later steps: the
    dense step sends them with its gradient, so decoded sums plus the residual stay exact."""
    reducer = TopKCrossNode(SETTINGS, warmup_steps=1)
    reducer.begin_step(1)
    first = _piece(1)
    sent = first.clone()
    reducer.reduce(0, sent, "g", [NUMEL])
    held = reducer.residuals()[0].clone()
    assert float(held.abs().sum()) > 0
    reducer.begin_step(0)
    second = _piece(2)
    part = second.clone()
    reducer.reduce(0, part, "g", [NUMEL])
    assert torch.allclose(part, second + held)
    assert float(reducer.residuals()[0].abs().sum()) == 0
    assert torch.allclose(sent + part, first + second, atol=1e-6)


def test_warmup_steps_validated():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="warmup_steps: must be a non-negative integer"):
            TopKCrossNode(SETTINGS, warmup_steps=bad)
