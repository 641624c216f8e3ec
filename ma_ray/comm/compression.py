"""Gradient compression for the cross-node level of the hierarchical all-reduce.

What this module owns: the kernels (compress a piece into one flat uint8 message, decode it,
add it into a dense buffer), the error-feedback residual of one piece, a dense bf16 wire format,
and the byte accounting of each scheme. It owns no communication: the caller all-gathers the
messages among the N members (one GPU per node holding the same piece) and decodes them here.
Torch only, device-agnostic (CPU and CUDA), no host synchronisation (no ``.item()``,
``.tolist()``, ``nonzero`` or data-dependent Python branches), so a GPU stream never stalls.

Scheme (top-k per block, then per-block quantisation)
-----------------------------------------------------
The flat piece of ``numel`` entries is cut into blocks of ``B = min(block_size, numel)`` entries
(the last one padded). A global top-k of ~100 M entries is a sort, slow on a GPU; ``topk(k,
dim=1)`` over a ``[blocks, B]`` view is one batched kernel, with ``k = ceil(ratio * B)``.
Padded positions get magnitude -1, below every real ``|x| >= 0``, so they are picked only when
the last block has fewer than ``k`` real entries; their value is 0 and they decode to a zero
added at ``numel - 1`` (never past ``numel``; adding a zero changes no value, at most the
sign of a zero).
The kept values of a block are quantised to ``bits`` with one symmetric fp32 scale:
``scale = absmax(kept) / (2^(bits-1) - 1)``, ``q = round(v / scale)`` (round to nearest, so
``|v - q * scale| <= scale / 2``), stored as int8. ``bits == 1`` has no level besides 0 in that
formula, so it is the scaled sign of 1-bit Adam / signSGD: ``q = sign(v)``, ``scale = mean|v|``
(the scale that minimises the squared error of a sign code). ``bits`` narrows the grid; the
storage stays one byte per value (no sub-byte packing), so the message size does not depend
on it.

Message layout (one contiguous uint8 tensor, native byte order, size ``message_bytes``)
-----------------------------------------------------------------------------------------
    [0, 4*nb)                   scales   float32[nb]       one per block
    [4*nb, 4*nb + 2*nb*k)       offsets  int16[nb, k]      block-local offset - 32768
    [.., .. + nb*k)             values   int8[nb, k]       quantised kept values
    [.., message_bytes)         0..3 zero bytes, so the size is a multiple of 4
with ``nb = ceil(numel / B)``. Scales first and the size a multiple of 4 keep every section
aligned for ``.view(dtype)`` even when the messages lie back to back in one all-gather buffer
``[N, message_bytes]``. Offsets are < B <= 65536, i.e. uint16 values; storing
``offset - 32768`` in int16 is an exact in-range cast (no wrap-around, no endianness trick).
The size is a pure function of ``numel`` and the settings, equal on all members, as an
all-gather requires: ``message_bytes = roundup4(nb * (4 + 3k))``.

Determinism: decoding is a function of the message only. Within one message the indices are
distinct (top-k indices are distinct, blocks are disjoint) except the padded slots, which add
zero, so even an atomic ``scatter_add_`` gives the same bits (and a 1-D ``scatter_add_`` is one
that ``torch.use_deterministic_algorithms(True)`` accepts on CUDA). Messages are added one after the
other in member order (never one scatter over all N: colliding atomics would add in any
order), so every member that decodes the same N messages gets a bit-identical sum.

Error feedback (Deep Gradient Compression, 1-bit Adam)
------------------------------------------------------
``ErrorFeedback`` keeps what a member did not send: ``y = piece + residual``, ``message =
compress(y)``, ``residual = y - decode(message)``. Summed over T steps the decoded messages are
exactly ``sum(pieces) - residual_T`` (the residuals telescope), so nothing is lost, only
delayed, as long as the residual stays bounded. Per block, top-k keeps the k largest of B
entries, so ``||y - topk(y)|| <= sqrt(1 - k/B) ||y||``, and quantisation adds at most
``sqrt(k) * absmax / (2L) <= sqrt(k) / (2L) ||y||`` (``L = 2^(bits-1) - 1``); with
``a = sqrt(1 - k/B) + sqrt(k) / (2L) < 1`` the residual of a block obeys
``||r|| <= a (||g|| + ||r_prev||)``, hence ``||r|| <= a / (1 - a) * max ||g||`` for ever
(bits >= 2; tests/unit/test_compression.py checks it). The residual is training state:
checkpoint it with ``state()`` and restore it with ``load_state()``. A non-finite entry makes
its block's scale non-finite: the decoded sum carries it (an overflow check on the sum still
sees it) and so does the residual, so after a skipped step restore or ``reset()`` it.

Bytes a member sends per step (N members, ``numel`` entries, ``e`` bytes per entry)
--------------------------------------------------------------------------------------
- dense ring all-reduce: ``2 (N-1)/N * numel * e`` (reduce-scatter + all-gather, e = 4 fp32);
- bf16 ring all-reduce: the same with ``e = 2``;
- sparse: a ring all-gather of N messages sends ``(N-1)/N`` of ``N`` messages, i.e.
  ``(N-1) * message_bytes``, and receives as much. The cost grows with N (every member gets
  every message, no reduction on the way), the dense ring's does not.
At ratio 0.1, 8 bits, B = 2048 a message is ``(4 + 3 * 205) / 2048 = 0.302`` bytes per entry.
At N = 4: sparse 3 * 0.302 = 0.91 bytes per entry against 2 * 3/4 * 2 = 3 for a bf16 ring (and
6 for fp32). Sparse beats bf16 while ``(N-1) * m < 4 (N-1)/N``, i.e. ``N < 4/m = 13.2``
members, and fp32 while ``N < 8/m = 26.5``. With 32-bit indices and fp32 values (8 bytes per
kept entry, m = 0.8) it ties bf16 at N = 5, loses beyond, and at N = 12 loses even to fp32
(11 * 0.8 = 8.8 > 7.3): hence
the 16-bit offsets and 8-bit values, and compression only across nodes, where N is the number
of nodes, never inside a node (there N counts GPUs and the links are fast).
``step_bytes`` counts all three levels of the hierarchical all-reduce for each scheme.

Memory: ``compress`` allocates one dense temporary, ``|x|`` padded to whole blocks (x's
dtype), plus O(blocks * k) for the kept entries; decoding allocates O(blocks * k). An
``ErrorFeedback`` holds its residual (``numel`` entries, fp32 by default) and computes
``piece + residual`` in place in it.

Settings (``CompressionSettings``) come from ``comm.sparsification_ratio`` and
``comm.quantization_bits`` plus a block size; ``comm.compression_overhead`` is a time budget the
caller checks (bench/compression_kernels.py measures these kernels).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Union

import torch

from ma_ray.config import CommConfig
from ma_ray.errors import is_int

MAX_BLOCK_SIZE = 65536  # block-local offsets are stored in 16 bits
_OFFSET_BIAS = 32768    # uint16 offset - 32768 is an in-range int16
SCHEMES = ("dense", "bf16", "sparse")


@dataclass(frozen=True)
class CompressionSettings:
    """The compressor's settings: the ``comm`` keys of the same meaning, their defaults and their
    rules the config's (``config.validate``)."""

    sparsification_ratio: float = CommConfig.sparsification_ratio  # fraction of a block's entries kept
    quantization_bits: int = CommConfig.quantization_bits          # bits of each kept value
    block_size: int = CommConfig.compression_block_size            # entries per block

    @classmethod
    def of(cls, comm: CommConfig) -> "CompressionSettings":
        return cls(comm.sparsification_ratio, comm.quantization_bits, comm.compression_block_size)


@dataclass(frozen=True)
class _Layout:
    numel: int
    block: int    # B: entries per block
    blocks: int   # nb
    k: int        # kept entries per block
    offsets_at: int
    values_at: int
    end: int      # end of the values; message_bytes rounds it up to 4
    nbytes: int

    @property
    def padded(self) -> bool:
        return self.blocks * self.block != self.numel


@functools.lru_cache(maxsize=256)
def _layout(numel: int, settings: CompressionSettings) -> _Layout:
    if not is_int(numel) or numel < 0:
        raise ValueError(f"numel: must be a non-negative integer, got {numel!r}")
    if numel == 0:
        return _Layout(0, 0, 0, 0, 0, 0, 0, 0)
    block = min(settings.block_size, numel)  # a piece smaller than a block is one block
    blocks = -(-numel // block)
    # round() first: 0.7 * 10 is 7.000000000000001 in floating point, and must give 7
    k = min(block, max(1, math.ceil(round(settings.sparsification_ratio * block, 9))))
    offsets_at = 4 * blocks
    values_at = offsets_at + 2 * blocks * k
    end = values_at + blocks * k
    return _Layout(numel, block, blocks, k, offsets_at, values_at, end, -(-end // 4) * 4)


def kept_per_block(numel: int, settings: CompressionSettings) -> int:
    """k: entries kept in each block of a piece of `numel` entries."""
    return _layout(numel, settings).k


def message_bytes(numel: int, settings: CompressionSettings) -> int:
    """Exact size of the message of a piece of `numel` entries (same on every member)."""
    return _layout(numel, settings).nbytes


def compress(x: torch.Tensor, settings: CompressionSettings,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The uint8 message of `x` (any shape, floating; read flat). `out`: a contiguous uint8
    tensor of `message_bytes(x.numel(), settings)` bytes to write into (e.g. this member's slot
    of the all-gather buffer); a new one otherwise."""
    lay = _layout(x.numel(), settings)
    msg = _message_buffer(out, lay, x.device)
    if lay.numel == 0:
        return msg
    flat = x.reshape(-1)
    n, nb, block, k = lay.numel, lay.blocks, lay.block, lay.k
    # The one dense temporary: |x| padded to whole blocks, -1 on the padding so it loses to
    # every real entry in the top-k.
    mag = flat.new_empty(nb * block)
    torch.abs(flat, out=mag[:n])
    mag[n:].fill_(-1)
    offsets = mag.view(nb, block).topk(k, dim=1, sorted=False).indices   # [nb, k] int64
    index = offsets + torch.arange(0, nb * block, block, device=flat.device).unsqueeze(1)
    if lay.padded:
        valid = index < n
        kept = torch.where(valid, flat[index.clamp(max=n - 1)], 0).float()
    else:
        valid = None
        kept = flat[index].float()
    scales, q = _quantise(kept, valid, settings.quantization_bits)
    msg[:lay.offsets_at].view(torch.float32).copy_(scales)
    msg[lay.offsets_at:lay.values_at].view(torch.int16).view(nb, k).copy_(offsets - _OFFSET_BIAS)
    msg[lay.values_at:lay.end].view(torch.int8).view(nb, k).copy_(q)
    return msg


def _quantise(kept: torch.Tensor, valid: Optional[torch.Tensor], bits: int):
    """Per-block scales [nb] (fp32) and codes [nb, k] (integral floats) of the kept values."""
    if bits == 1:  # scaled sign: the mean magnitude of the block's real kept entries
        count = valid.sum(1).clamp_(min=1) if valid is not None else kept.shape[1]
        return kept.abs().sum(1) / count, torch.sign(kept)
    levels = 2 ** (bits - 1) - 1
    scales = kept.abs().amax(1) / levels
    safe = torch.where(scales > 0, scales, 1.0)  # an all-zero block: codes 0, scale 0
    return scales, torch.round(kept / safe.unsqueeze(1)).clamp_(-levels, levels)


def _message_buffer(out: Optional[torch.Tensor], lay: _Layout, device) -> torch.Tensor:
    if out is None:
        msg = torch.empty(lay.nbytes, dtype=torch.uint8, device=device)
    else:
        _check_message(out, lay)
        msg = out
    msg[lay.end:].zero_()  # the alignment bytes: zero, so equal messages are equal bytes
    return msg


def _check_message(message: torch.Tensor, lay: _Layout) -> None:
    if message.dtype != torch.uint8 or message.dim() != 1 or message.numel() != lay.nbytes \
            or not message.is_contiguous():
        raise ValueError(f"message: expected a contiguous 1-D uint8 tensor of {lay.nbytes} bytes "
                         f"(numel {lay.numel}), got {message.dtype} of shape "
                         f"{tuple(message.shape)}")


def decode(message: torch.Tensor, numel: int, settings: CompressionSettings):
    """The message as sparse entries: (flat indices int64 [nb*k], values fp32 [nb*k]).
    Padded slots come out as index numel-1, value 0."""
    lay = _layout(numel, settings)
    _check_message(message, lay)
    if lay.numel == 0:
        return (torch.empty(0, dtype=torch.int64, device=message.device),
                torch.empty(0, dtype=torch.float32, device=message.device))
    if message.storage_offset() % 4:  # a slice of someone else's buffer: realign (small copy)
        message = message.clone()
    nb, k = lay.blocks, lay.k
    scales = message[:lay.offsets_at].view(torch.float32)
    offsets = message[lay.offsets_at:lay.values_at].view(torch.int16).view(nb, k)
    codes = message[lay.values_at:lay.end].view(torch.int8).view(nb, k)
    base = torch.arange(_OFFSET_BIAS, _OFFSET_BIAS + nb * lay.block, lay.block,
                        device=message.device)
    index = offsets.to(torch.int64).add_(base.unsqueeze(1))
    if lay.padded:
        index.clamp_(max=numel - 1)
    values = codes.to(torch.float32).mul_(scales.unsqueeze(1))
    return index.view(-1), values.view(-1)


def decompress_add_(out: torch.Tensor, message: torch.Tensor, numel: int,
                    settings: CompressionSettings) -> torch.Tensor:
    """out += decode(message), in place; `out`: contiguous, `numel` entries, any float dtype
    (values are cast to it before the add). Returns `out`."""
    if out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor of {numel} entries, got shape "
                         f"{tuple(out.shape)}")
    index, values = decode(message, numel, settings)
    out.view(-1).scatter_add_(0, index, values.to(out.dtype))
    return out


def decompress_all_add_(out: torch.Tensor, messages: Union[torch.Tensor, Sequence[torch.Tensor]],
                        numel: int, settings: CompressionSettings) -> torch.Tensor:
    """out += the decoded messages, one after the other in member order (rows of an
    all-gather buffer [N, message_bytes], or a sequence). The order is what makes every
    member's sum bit-identical."""
    for message in messages:
        decompress_add_(out, message, numel, settings)
    return out


class ErrorFeedback:
    """The residual of one piece: what this member has not sent yet, added to its next piece.

    ``residual`` (fp32 by default, on the piece's device) is training state; ``state()`` /
    ``load_state()`` checkpoint and restore it."""

    def __init__(self, numel: int, settings: CompressionSettings, device=None,
                 dtype: torch.dtype = torch.float32):
        _layout(numel, settings)  # validates numel
        self.numel = numel
        self.settings = settings
        self.residual = torch.zeros(numel, dtype=dtype, device=device)

    def compress(self, piece: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """message = compress(piece + residual); the residual becomes what it did not carry."""
        if piece.numel() != self.numel:
            raise ValueError(f"piece: expected {self.numel} entries, got {piece.numel()}")
        y = self.residual.add_(piece.reshape(-1))  # y = piece + residual, in the residual's memory
        message = compress(y, self.settings, out=out)
        # Subtract exactly what every receiver decodes from this message.
        index, values = decode(message, self.numel, self.settings)
        y.scatter_add_(0, index, values.neg_().to(y.dtype))
        return message

    def state(self) -> torch.Tensor:
        """A copy of the residual, for a checkpoint."""
        return self.residual.clone()

    def load_state(self, residual: torch.Tensor) -> None:
        """Restore a residual from `state()` (any device; copied into this one's)."""
        if residual.numel() != self.numel:
            raise ValueError(f"residual: expected {self.numel} entries, got {residual.numel()}")
        self.residual.copy_(residual.reshape(-1))

    def reset(self) -> None:
        self.residual.zero_()


def to_bf16_wire(x: torch.Tensor) -> torch.Tensor:
    """A dense bf16 copy of `x` for the wire: the math of torch's ``bf16_compress_hook``
    (torch.distributed.algorithms.ddp_comm_hooks.default_hooks), which casts the bucket to bf16,
    all-reduces it and casts back. The hook itself cannot be used: it takes a torch.distributed
    ProcessGroup and a DDP GradBucket, and our groups are ray.util.collective's. Unlike the hook
    this does not divide by the world size: the caller sums."""
    return x.to(torch.bfloat16).contiguous()


def from_bf16_wire(wire: torch.Tensor, dtype: torch.dtype = torch.float32,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (summed) bf16 wire tensor back in the gradient's dtype, into `out` if given."""
    if out is not None:
        return out.copy_(wire.reshape(out.shape))
    return wire.to(dtype)


def ring_reduce_scatter_bytes(numel: int, members: int, element_bytes: int) -> int:
    """Bytes one member sends in a ring reduce-scatter: (N-1)/N of the tensor."""
    return (members - 1) * numel * element_bytes // members


def ring_allgather_bytes(numel: int, members: int, element_bytes: int) -> int:
    """Bytes one member sends in a ring all-gather of a `numel`-entry result."""
    return ring_reduce_scatter_bytes(numel, members, element_bytes)


def ring_allreduce_bytes(numel: int, members: int, element_bytes: int) -> int:
    """Bytes one member sends in a ring all-reduce: 2 (N-1)/N * numel * element_bytes."""
    return 2 * (members - 1) * numel * element_bytes // members


def sparse_allgather_bytes(numel: int, members: int, settings: CompressionSettings) -> int:
    """Bytes one member sends (and receives) all-gathering the N members' messages:
    (N-1) * message_bytes."""
    return (members - 1) * message_bytes(numel, settings)


def cross_node_bytes(piece_numel: int, nodes: int, scheme: str,
                     grad_dtype: torch.dtype = torch.float32,
                     settings: Optional[CompressionSettings] = None) -> int:
    """Bytes one member sends on the cross-node level for one piece, by scheme
    ('dense': ring all-reduce in grad_dtype, 'bf16': ring all-reduce in bf16, 'sparse':
    all-gather of messages)."""
    if scheme == "dense":
        return ring_allreduce_bytes(piece_numel, nodes, grad_dtype.itemsize)
    if scheme == "bf16":
        return ring_allreduce_bytes(piece_numel, nodes, 2)
    if scheme == "sparse":
        return sparse_allgather_bytes(piece_numel, nodes, settings or CompressionSettings())
    raise ValueError(f"scheme: must be one of {', '.join(SCHEMES)}, got {scheme!r}")


def step_bytes(numel: int, gpus_per_node: int, nodes: int, scheme: str,
               grad_dtype: torch.dtype = torch.float32,
               settings: Optional[CompressionSettings] = None) -> Dict[str, int]:
    """Bytes one GPU sends per step at each level of the hierarchical all-reduce of `numel`
    entries: dense reduce-scatter inside the node, `scheme` across nodes on its piece
    (ceil(numel / gpus_per_node) entries), dense all-gather inside the node."""
    element = grad_dtype.itemsize
    piece = -(-numel // gpus_per_node)
    levels = {
        "intra_reduce_scatter": ring_reduce_scatter_bytes(numel, gpus_per_node, element),
        "cross_node": cross_node_bytes(piece, nodes, scheme, grad_dtype, settings),
        "intra_allgather": ring_allgather_bytes(numel, gpus_per_node, element),
    }
    levels["total"] = sum(levels.values())
    return levels
