"""Gradient compression for the cross-node level of the hierarchical all-reduce: the kernels (a
piece to one flat uint8 message and back), the error-feedback residual, a dense bf16 wire format
and the bytes of each scheme. No communication: the caller all-gathers the messages. Torch only,
CPU or CUDA, with no host synchronisation (no ``.item()``, ``nonzero`` or data-dependent
branch), so a GPU stream never stalls.

Scheme: top-k per block, then per-block quantisation. A global top-k of ~100 M entries is a
sort, slow on a GPU; ``topk(k, dim=1)`` over a ``[blocks, B]`` view is one batched kernel
(``B = min(block_size, numel)``, ``k = ceil(ratio * B)``). The last block's padding has
magnitude -1, so it is picked only when that block has fewer than ``k`` real entries, and it
decodes to a zero added at ``numel - 1``. Kept values are quantised with one symmetric fp32
scale per block, ``absmax / (2^(bits-1) - 1)``, rounded to nearest and stored as int8;
``bits == 1`` is the scaled sign of 1-bit Adam / signSGD (scale ``mean|v|``, which minimises a
sign code's squared error). A value takes one byte whatever ``bits``.

Message (uint8, native byte order, ``message_bytes = roundup4(nb * (4 + 3k))``, the same on
every member, as an all-gather requires)::

    [0, 4*nb)               scales   float32[nb]
    [4*nb, 4*nb + 2*nb*k)   offsets  int16[nb, k]   block-local offset - 32768
    [.., .. + nb*k)         values   int8[nb, k]
    then 0..3 zero bytes

Scales first and a size a multiple of 4 keep every section aligned for ``.view(dtype)`` when
messages lie back to back in one all-gather buffer; ``offset - 32768`` is an exact int16 cast of
a uint16 (B <= 65536).

Determinism: a message's decoded indices are distinct (the padding adds zero), and messages are
added one after the other in member order, never in one scatter whose colliding atomics would
add in any order, so every member's sum is bit-identical.

Error feedback (Deep Gradient Compression, 1-bit Adam): ``y = piece + residual``, ``message =
compress(y)``, ``residual = y - decode(message)``. The residuals telescope, so nothing is lost,
only delayed, while the residual stays bounded: with ``a = sqrt(1 - k/B) + sqrt(k) / (2L) < 1``
(``L = 2^(bits-1) - 1``) a block's ``||r|| <= a / (1 - a) * max ||g||`` (bits >= 2,
tests/unit/test_compression.py). The residual is training state (``state`` / ``load_state``); a
non-finite entry reaches it, so after a skipped step restore or ``reset`` it.

Why 16-bit offsets, 8-bit values and compression only across nodes: a sparse all-gather sends
``(N-1) * message_bytes`` per member, growing with N, against a ring all-reduce's
``2 (N-1)/N * numel * e``. At ratio 0.1, 8 bits, B = 2048 a message is 0.302 bytes per entry:
sparse beats a bf16 ring while N < 13.2 and fp32 while N < 26.5; with 32-bit indices and fp32
values it would tie bf16 at N = 5. Across nodes N counts nodes; inside a node it counts GPUs and
the links are fast. ``step_bytes`` counts the three levels of the hierarchical all-reduce.

Memory: ``compress`` allocates one dense temporary (``|x|`` padded to whole blocks) plus
O(blocks * k); an ``ErrorFeedback`` holds its residual and adds each piece into it in place.
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
    """The uint8 message of `x` (read flat), into `out` when given (e.g. this member's slot of
    the all-gather buffer)."""
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
    """out += decode(message), in place, in `out`'s dtype."""
    if out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor of {numel} entries, got shape "
                         f"{tuple(out.shape)}")
    index, values = decode(message, numel, settings)
    out.view(-1).scatter_add_(0, index, values.to(out.dtype))
    return out


def decompress_all_add_(out: torch.Tensor, messages: Union[torch.Tensor, Sequence[torch.Tensor]],
                        numel: int, settings: CompressionSettings) -> torch.Tensor:
    """out += the decoded messages, one after the other in member order (the order makes every
    member's sum bit-identical)."""
    for message in messages:
        decompress_add_(out, message, numel, settings)
    return out


class ErrorFeedback:
    """The residual of one piece: what this member has not sent yet, added to its next piece."""

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
        return self.residual.clone()

    def load_state(self, residual: torch.Tensor) -> None:
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
    """Bytes one member sends on the cross-node level for one piece, by scheme."""
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
