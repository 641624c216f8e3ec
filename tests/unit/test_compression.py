"""The gradient-compression kernels (ma_ray/comm/compression.py): selection, quantisation,
message layout and size, decoding, the member-order sum, error feedback, the bf16 wire, byte
accounting, the absence of host syncs and the settings' validation. CPU only, small sizes."""

import math

import pytest
import torch

from ma_ray.comm import compression as C
from ma_ray.config import CommConfig, ConfigError, load
from ma_ray.comm.compression import (CompressionSettings, ErrorFeedback, compress, decode,
                                     decompress_add_, decompress_all_add_, from_bf16_wire,
                                     message_bytes, to_bf16_wire)

EPS32 = 2.0 ** -24  # unit roundoff of fp32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _decoded(x, settings):
    """compress then decompress_add_ into zeros (fp32)."""
    out = torch.zeros(x.numel())
    return decompress_add_(out, compress(x, settings), x.numel(), settings)


def _scales(message, numel, settings):
    """The per-block fp32 scales: the first 4 * blocks bytes of the message."""
    blocks = -(-numel // min(settings.block_size, numel))
    return message[:4 * blocks].view(torch.float32)


def _expected_bytes(numel, settings):
    """The layout's size, from the module docstring's formula (not from the module)."""
    block = min(settings.block_size, numel)
    blocks = -(-numel // block)
    k = min(block, max(1, math.ceil(round(settings.sparsification_ratio * block, 9))))
    return -(-blocks * (4 + 3 * k) // 4) * 4


# 65536: offsets above 32767, the top of the int16 range the uint16 offsets are stored in.
@pytest.mark.parametrize("block,ratio", [(64, 0.1), (128, 0.25), (33, 0.5), (16, 1 / 16),
                                         (65536, 0.001)])
def test_topk_per_block_keeps_the_k_largest_of_each_block(block, ratio):
    s = CompressionSettings(ratio, 8, block)
    blocks = 9
    x = torch.randn(blocks * block, generator=_gen(block))  # continuous: no ties
    index, _ = decode(compress(x, s), x.numel(), s)
    k = C.kept_per_block(x.numel(), s)
    assert k == math.ceil(ratio * block - 1e-9)
    chosen = index.view(blocks, k)
    for b in range(blocks):
        seg = x[b * block:(b + 1) * block].abs()
        reference = set((torch.sort(seg, descending=True).indices[:k] + b * block).tolist())
        assert set(chosen[b].tolist()) == reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [64 * 12, 64 * 12 + 17])
def test_quantisation_error_of_each_kept_entry_is_at_most_half_the_scale(bits, numel):
    s = CompressionSettings(0.25, bits, 64)
    x = torch.randn(numel, generator=_gen(bits)) * torch.logspace(-3, 3, numel)
    msg = compress(x, s)
    index, values = decode(msg, numel, s)
    scales = _scales(msg, numel, s)
    k = C.kept_per_block(numel, s)
    block_of = torch.arange(index.numel()) // k
    kept = x[index].double()
    absmax = torch.zeros(scales.numel(), dtype=torch.float64).scatter_reduce_(
        0, block_of, kept.abs(), "amax")
    levels = 2 ** (bits - 1) - 1
    # The scale is absmax / L, rounded once in fp32.
    assert torch.allclose(scales.double(), absmax / levels, rtol=EPS32, atol=0)
    # Round to nearest: s/2, plus fp32 rounding of v/s and of q*s (each <= EPS32 * absmax).
    bound = scales.double()[block_of] / 2 + 2 * EPS32 * absmax[block_of]
    assert ((kept - values.double()).abs() <= bound).all()
    # The int8 codes, read from the message's last section, are within the grid.
    blocks = scales.numel()
    codes = msg[4 * blocks + 2 * blocks * k:][:blocks * k].view(torch.int8)
    assert int(codes.abs().max()) == levels  # the absmax entry of a block is a full code
    assert torch.equal(values, codes.float() * scales[block_of])  # decode is code * scale


def test_one_bit_is_the_scaled_sign_of_the_kept_entries():
    s = CompressionSettings(0.25, 1, 32)
    x = torch.randn(32 * 5, generator=_gen(1))
    index, values = decode(compress(x, s), x.numel(), s)
    kept = x[index].view(5, -1)
    expected = torch.sign(kept) * kept.abs().mean(1, keepdim=True)
    assert torch.allclose(values.view(5, -1), expected, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("settings", [CompressionSettings(), CompressionSettings(0.3, 4, 100),
                                      CompressionSettings(1.0, 8, 1), CompressionSettings(0.01, 8, 65536)])
@pytest.mark.parametrize("numel", [1, 2, 7, 99, 100, 101, 2047, 2048, 2049, 3 * 2048, 70001])
def test_message_size_is_message_bytes_for_any_numel(settings, numel):
    x = torch.randn(numel, generator=_gen(numel))
    msg = compress(x, settings)
    assert msg.dtype == torch.uint8 and msg.dim() == 1
    assert msg.numel() == message_bytes(numel, settings) == _expected_bytes(numel, settings)
    assert msg.numel() % 4 == 0
    # The size depends on numel and the settings only: the data does not change it.
    assert compress(torch.zeros(numel), settings).numel() == msg.numel()


def test_ratio_one_and_eight_bits_decode_every_entry_within_quantisation_error():
    s = CompressionSettings(1.0, 8, 64)
    for numel in (64 * 7, 64 * 7 + 5, 1, 40):
        x = torch.randn(numel, generator=_gen(numel)) * 3
        msg = compress(x, s)
        got = decompress_add_(torch.zeros(numel), msg, numel, s)
        block = min(64, numel)
        scales = _scales(msg, numel, s).double().repeat_interleave(block)[:numel]
        bound = scales / 2 + 2 * EPS32 * scales * 127
        assert ((x.double() - got.double()).abs() <= bound).all(), numel


def test_the_padded_tail_adds_nothing_past_numel():
    s = CompressionSettings(1.0, 8, 64)  # k = 64: the last block's padding is selected too
    numel = 64 * 3 + 5
    x = torch.randn(numel, generator=_gen(5)) + 10  # no zero entries
    msg = compress(x, s)
    index, values = decode(msg, numel, s)
    assert int(index.max()) == numel - 1
    padded_slots = 64 * 4 - numel
    assert int((values == 0).sum()) == padded_slots  # the pads are zeros
    buf = torch.full((numel + 100,), 7.0)
    buf[:numel] = 0
    decompress_add_(buf[:numel], msg, numel, s)
    assert (buf[numel:] == 7.0).all()
    # Every real entry got exactly its own decoded value: the pads at numel - 1 added zero.
    real = values != 0  # x has no zeros and its codes none either
    assert torch.unique(index[real]).numel() == numel
    assert torch.equal(buf[:numel], torch.zeros(numel).index_put_((index[real],), values[real]))


def test_n_member_sum_is_bit_identical_however_the_messages_arrive():
    s = CompressionSettings(0.1, 8, 256)
    numel, members = 256 * 10 + 33, 4
    pieces = [torch.randn(numel, generator=_gen(m)) * (m + 1) for m in range(members)]
    size = message_bytes(numel, s)
    gathered = torch.empty(members, size, dtype=torch.uint8)  # an all-gather's output buffer
    for m, piece in enumerate(pieces):
        compress(piece, s, out=gathered[m])
    # A byte-misaligned copy of the same messages (e.g. a slice of a larger receive buffer).
    odd = torch.empty(members * size + 1, dtype=torch.uint8)[1:].view(members, size)
    odd.copy_(gathered)
    sums = []
    for _member in range(members):  # every member decodes all N messages in member order
        sums.append(decompress_all_add_(torch.zeros(numel), gathered, numel, s))
    sums.append(decompress_all_add_(torch.zeros(numel), [g.clone() for g in gathered], numel, s))
    sums.append(decompress_all_add_(torch.zeros(numel), odd, numel, s))
    # Reference: the dense decoded messages added in member order in fp32.
    reference = torch.zeros(numel)
    for m in range(members):
        index, values = decode(gathered[m], numel, s)
        reference = reference + torch.zeros(numel).scatter_add_(0, index, values)
    for total in sums:
        assert torch.equal(total.view(torch.int32), reference.view(torch.int32))


def test_error_feedback_residual_stays_bounded_and_the_mean_message_converges_to_g():
    s = CompressionSettings(0.1, 8, 64)
    block, blocks, steps = 64, 24, 300
    k = C.kept_per_block(block * blocks, s)
    levels = 2 ** (s.quantization_bits - 1) - 1
    a = math.sqrt(1 - k / block) + math.sqrt(k) / (2 * levels)  # the docstring's contraction
    assert a < 1
    g = torch.randn(block * blocks, generator=_gen(3)) * torch.linspace(0.01, 5, block * blocks)
    bound = a / (1 - a) * g.view(blocks, block).double().norm(dim=1)
    ef = ErrorFeedback(g.numel(), s)
    total = torch.zeros(g.numel(), dtype=torch.float64)
    for _ in range(steps):
        decompress_add_(total, ef.compress(g), g.numel(), s)
        assert (ef.residual.view(blocks, block).double().norm(dim=1) <= bound).all()
    # Nothing is lost: the decoded messages sum to steps * g minus what is still owed.
    expected = steps * g.double() - ef.residual.double()
    assert torch.allclose(total, expected, rtol=0, atol=1e-4 * float(steps * g.abs().max()))
    mean_error = (total / steps - g.double()).view(blocks, block).norm(dim=1)
    assert (mean_error <= bound / steps + 1e-4 * float(g.abs().max())).all()
    # ... and that bound is small: after 300 steps the mean is within 7% of g, block by block.
    assert (bound / steps < 0.07 * g.view(blocks, block).double().norm(dim=1)).all()


def test_error_feedback_state_restores_the_residual():
    s = CompressionSettings(0.1, 4, 128)
    gs = [torch.randn(1000, generator=_gen(i)) for i in range(6)]
    a = ErrorFeedback(1000, s)
    for g in gs[:3]:
        a.compress(g)
    saved = a.state()
    assert saved.data_ptr() != a.residual.data_ptr() and torch.equal(saved, a.residual)
    b = ErrorFeedback(1000, s)
    b.load_state(saved)
    for g in gs[3:]:
        assert torch.equal(a.compress(g), b.compress(g))
    assert torch.equal(a.residual, b.residual)
    with pytest.raises(ValueError, match="residual"):
        b.load_state(torch.zeros(999))


def test_error_feedback_accepts_bf16_pieces_and_decodes_into_bf16():
    s = CompressionSettings(0.5, 8, 32)
    g = torch.randn(96, generator=_gen(7)).to(torch.bfloat16)
    ef = ErrorFeedback(96, s)
    msg = ef.compress(g)
    assert ef.residual.dtype == torch.float32
    out = decompress_add_(torch.zeros(96, dtype=torch.bfloat16), msg, 96, s)
    _, values = decode(msg, 96, s)
    dense = torch.zeros(96).index_put_((decode(msg, 96, s)[0],), values)
    assert torch.equal(out, dense.to(torch.bfloat16))
    assert torch.equal(ef.residual + dense, g.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_bf16_wire_round_trip_is_the_cast_pair(dtype):
    x = (torch.randn(1000, generator=_gen(2)) * 100).to(dtype)
    wire = to_bf16_wire(x)
    assert wire.dtype == torch.bfloat16 and wire.is_contiguous()
    assert torch.equal(from_bf16_wire(wire, dtype), x.to(torch.bfloat16).to(dtype))
    out = torch.empty(10, 100, dtype=dtype)
    from_bf16_wire(wire, out=out)
    assert torch.equal(out.view(-1), x.to(torch.bfloat16).to(dtype))


_SYNCS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy")


def _run_every_kernel(device):
    for s, numel in [(CompressionSettings(0.1, 8, 64), 64 * 5 + 3),
                     (CompressionSettings(0.2, 1, 50), 500), (CompressionSettings(), 10)]:
        x = torch.randn(numel, device=device) if device != "meta" else torch.empty(numel, device="meta")
        msg = compress(x, s)
        decode(msg, numel, s)
        decompress_all_add_(torch.zeros(numel, device=device), [msg, msg], numel, s)
        ErrorFeedback(numel, s, device=device).compress(x)


def test_no_host_syncs_in_compress_or_decompress(monkeypatch):
    calls = {name: 0 for name in _SYNCS + ("torch.nonzero",)}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in _SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counting("torch.nonzero", torch.nonzero))
    _run_every_kernel("cpu")
    assert torch.tensor([3]).item() == 3 and calls["item"] == 1  # the wrappers do count
    calls["item"] = 0
    assert calls == {name: 0 for name in calls}


def test_kernels_run_on_the_meta_device():
    # Meta tensors hold no values: any data-dependent op (a sync on a GPU) would raise here.
    _run_every_kernel("meta")


@pytest.mark.parametrize("override", [
    "comm.sparsification_ratio=0.0", "comm.sparsification_ratio=1.5", "comm.sparsification_ratio=.nan",
    "comm.quantization_bits=0", "comm.quantization_bits=9", "comm.quantization_bits=4.0",
    "comm.compression_block_size=0", "comm.compression_block_size=65537", "comm.compression_block_size=true",
])
def test_bad_settings_raise_a_one_line_error_naming_the_key(override):
    """The compressor's settings are the config's, checked there."""
    with pytest.raises(ConfigError) as err:
        load(None, [override])
    text = str(err.value)
    assert text.startswith(override.partition("=")[0] + ":") and "\n" not in text


def test_settings_are_the_configs():
    assert CompressionSettings() == CompressionSettings.of(CommConfig())
    assert CompressionSettings.of(load(None, ["comm.compression_block_size=64"]).comm).block_size == 64


def test_bad_messages_and_buffers_are_refused():
    s = CompressionSettings()
    msg = compress(torch.randn(5000), s)
    with pytest.raises(ValueError, match="message"):
        decode(msg[:-4], 5000, s)
    with pytest.raises(ValueError, match="out"):
        decompress_add_(torch.zeros(4999), msg, 5000, s)
    with pytest.raises(ValueError, match="message"):
        compress(torch.randn(5000), s, out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="scheme"):
        C.cross_node_bytes(100, 4, "zip")


def test_empty_piece_gives_an_empty_message():
    s = CompressionSettings()
    msg = compress(torch.empty(0), s)
    assert msg.numel() == message_bytes(0, s) == 0
    assert decompress_add_(torch.empty(0), msg, 0, s).numel() == 0


def test_byte_accounting_follows_the_ring_and_all_gather_formulas():
    s = CompressionSettings(0.1, 8, 2048)
    numel = 2048 * 1000
    m = _expected_bytes(numel, s)
    for n in (2, 4, 12):
        assert C.ring_allreduce_bytes(numel, n, 4) == 2 * (n - 1) * numel * 4 // n
        assert C.cross_node_bytes(numel, n, "bf16") == 2 * (n - 1) * numel * 2 // n
        assert C.cross_node_bytes(numel, n, "dense", torch.bfloat16) == C.cross_node_bytes(numel, n, "bf16")
        assert C.cross_node_bytes(numel, n, "sparse", settings=s) == (n - 1) * m
    # The docstring's comparison: at N = 4 sparse sends under a third of a bf16 ring.
    per_entry = C.sparse_allgather_bytes(numel, 4, s) / numel
    assert per_entry == pytest.approx(3 * (4 + 3 * 205) / 2048)
    assert per_entry < C.ring_allreduce_bytes(numel, 4, 2) / numel / 3
    # The hierarchical step: dense inside the node on the whole tensor, the scheme on the piece.
    levels = C.step_bytes(numel, 8, 4, "sparse", settings=s)
    piece = numel // 8
    assert levels["intra_reduce_scatter"] == levels["intra_allgather"] == 7 * numel * 4 // 8
    assert levels["cross_node"] == 3 * _expected_bytes(piece, s)
    assert levels["total"] == sum(v for key, v in levels.items() if key != "total")
