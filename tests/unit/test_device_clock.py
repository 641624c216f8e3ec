"""The modelled device clock (``runtime.device.ModelledDevice``, ``emulation.device_clock``): a
step's length on the modelled GPUs, advanced by modelled durations and by what a worker waits
for, never by the host's own time. No timed assertions: the clock's values are exact sums."""

from __future__ import annotations

import time
from contextlib import nullcontext

import pytest
import torch

from ma_ray import config as C
from ma_ray.runtime.device import ModelledDevice, RealDevice, Ready
from ma_ray.runtime.links import Links
from ma_ray.runtime.timing import DEVICE_CLOCK
from ma_ray.runtime.transport import ModelledBlockTransport, pack_block

CPU = torch.device("cpu")


def test_host_time_is_not_on_the_clock():
    d = ModelledDevice(CPU, keep_clock=True)
    with d.compute("attention", 0.002):
        time.sleep(0.01)  # the host's own work: on the wall timeline, not on the clock
    with d.compute("attention"):  # a region with no modelled time (norms, routing)
        time.sleep(0.005)
    assert d.clock == pytest.approx(0.002)
    ready = d.queue("moe", 0.001)
    assert isinstance(ready, Ready) and ready.clock == pytest.approx(0.003) and ready.wall == d.free_at
    assert d.ready_at().clock == pytest.approx(0.003)


def test_arrivals_come_one_after_another_over_the_inbound_link():
    d = ModelledDevice(CPU, keep_clock=True)
    with d.compute("moe", 0.001):
        pass
    d.arrived(sent=0.010, link_s=0.004)  # ready on its sender at 10 ms, 4 ms on the link
    assert d.clock == pytest.approx(0.014)
    d.arrived(sent=0.0, link_s=0.001)  # ready earlier, but the link was busy until 14 ms
    assert d.clock == pytest.approx(0.015)
    d.queue("moe", 0.002)
    d.arrived(sent=0.001, link_s=0.001)  # arrived while the device computed: it waits for nothing
    assert d.clock == pytest.approx(0.017) and d.link_clock == pytest.approx(0.016)


def test_a_collective_starts_at_its_latest_member_and_the_step_reports_its_end():
    d = ModelledDevice(CPU, keep_clock=True)
    with d.compute("attention", 0.001):
        pass
    seen = []
    d.pool_clock = lambda mine: seen.append(mine) or max(mine, 0.004)  # another member is at 4 ms
    with d.collective("comm_attention", 0.002):
        pass
    assert seen == [pytest.approx(0.001)] and d.clock == pytest.approx(0.006)
    d.end_step()
    totals = d.timer.totals()
    assert totals[DEVICE_CLOCK] == pytest.approx(0.006) and totals["comm_attention"] == pytest.approx(0.002)
    d.timer.reset()
    d.start_step()
    assert d.clock == 0.0 and d.link_clock == 0.0


def test_no_clock_reported_unless_asked():
    d = ModelledDevice(CPU)
    with d.compute("attention", 0.001):
        pass
    d.end_step()
    assert DEVICE_CLOCK not in d.timer.totals()
    r = RealDevice(CPU)
    r.start_step()
    r.end_step()
    assert DEVICE_CLOCK not in r.timer.totals() and r.queue("moe", 1.0).clock == 0.0


class _Handle:
    def __init__(self, fill):
        self.fill = fill

    def wait(self):
        self.fill()


class _Links:
    """irecv fills the landing buffer with the next prepared message of that source."""

    def __init__(self, messages):
        self.messages = messages

    def irecv(self, landing, src):
        return _Handle(lambda: landing.copy_(self.messages[src].pop(0)))


def test_a_received_chunk_advances_the_receivers_clock_from_its_stamp():
    d = ModelledDevice(CPU, keep_clock=True)
    chunks = [torch.randn(2, 3), torch.randn(1, 3)]
    # (ready on the wall clock: long past, so no sleep; ready on the sender's clock; bytes)
    stamps = [(0.0, 0.5, 2e9), (0.0, 0.75, 1e9)]
    links = _Links({7: [pack_block(chunks, stamps)]})
    transport = ModelledBlockTransport(links, 4, 2, lambda src: 1e10, d.ready_at, d.arrived)
    bufs = [torch.empty_like(c) for c in chunks]
    got = list(transport.receive_blocks([(7, bufs)], nullcontext))
    assert all(torch.equal(a, b) for a, b in zip(got, chunks))
    # 0.5 + 0.2 s on the link; the second is ready at 0.75 on its sender, then 0.1 s
    assert d.clock == pytest.approx(0.85)


def test_a_sent_block_is_stamped_on_both_clocks():
    d = ModelledDevice(CPU, keep_clock=True)
    d.queue("attention", 0.25)
    sent = []

    class Sink:
        def isend(self, tensor, dst):
            sent.append(tensor)

    transport = ModelledBlockTransport(Sink(), 4, 2, lambda src: 1e10, d.ready_at, d.arrived)
    transport.send(torch.zeros(2, 3), 1, nbytes=64.0)
    stamp = sent[0][-24:].clone().view(torch.float64).tolist()
    assert stamp[1:] == [0.25, 64.0] and stamp[0] >= d.free_at


class _Aggregation:
    def __init__(self, others):
        self.others = others
        self.level_bytes = {"intra_node": 5.0, "inter_node": 7.0}

    def gather_tokens(self, local, sizes, full_bytes=None):
        assert sizes == [1] * (1 + len(self.others)) and local.dtype == torch.float64
        self.level_bytes["inter_node"] += 100.0
        return torch.cat([local, torch.tensor([[v] for v in self.others], dtype=torch.float64)])


def test_the_pool_max_is_counted_in_no_level():
    links = Links.__new__(Links)
    links.aggregation, links.pool_size = _Aggregation([0.5, 2.5]), 3
    assert links.pool_max(1.25, CPU) == 2.5
    assert links.aggregation.level_bytes == {"intra_node": 5.0, "inter_node": 7.0}


def test_the_clock_is_off_by_default():
    assert C.load(None, []).emulation.device_clock is False
    assert C.load(None, ["emulation.device_clock=true"]).emulation.device_clock is True
