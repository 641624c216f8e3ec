"""Token files in the common ``.bin`` layout: a flat array of little-endian uint16 token ids, no
header.

This is the nanoGPT / Megatron-style "train.bin" layout (``np.memmap(path, np.uint16)``), so
files prepared by those tools load as-is. Files are opened as read-only memmaps and never read
whole: batches touch only the pages of the windows they sample, and the vocabulary check scans
the file in bounded chunks. uint16 caps vocabularies at 65536 ids; larger ones need another
layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Tuple, Union

import numpy as np

from .errors import DataError

BIN_DTYPE = np.dtype("<u2")  # little-endian uint16 on every host, as the layout is defined
# 8 Mi tokens = 16 MiB per chunk: big enough that numpy's max is bandwidth-bound, small enough
# that scanning a multi-GB file never holds more than this in memory.
_SCAN_CHUNK = 8 * 1024 * 1024

TokensLike = Union[bytes, bytearray, memoryview, np.ndarray, Iterable[int]]


def write_bin(path: Union[str, Path], tokens: TokensLike) -> int:
    """Write ``tokens`` as a uint16 ``.bin`` file; returns the number of tokens written.

    ``tokens`` is bytes (each byte one token, i.e. byte-level text) or integer ids in
    [0, 65535]. The file is written to a temporary name and renamed, so a reader never sees a
    half-written file.
    """
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(bytes(tokens), dtype=np.uint8)
    else:
        arr = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens))
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"write_bin {path}: token ids must be integers, got dtype {arr.dtype}")
        arr = arr.reshape(-1)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(BIN_DTYPE).max):
            raise DataError(f"write_bin {path}: token ids must be in [0, 65535] for a uint16 .bin file, "
                            f"got [{int(arr.min())}, {int(arr.max())}]")
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    arr.astype(BIN_DTYPE).tofile(tmp)
    os.replace(tmp, path)
    return int(arr.size)


def open_bin(path: Union[str, Path], label: str = "data.path") -> np.memmap:
    """Open a ``.bin`` token file as a read-only uint16 memmap, checking only its size."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{label} {path}: is empty (0 bytes)")
    if size % BIN_DTYPE.itemsize:
        raise DataError(f"{label} {path}: {size} bytes is not a whole number of uint16 tokens "
                        f"(a .bin token file is a flat uint16 array)")
    return np.memmap(p, dtype=BIN_DTYPE, mode="r")


def first_out_of_vocab(tokens: np.ndarray, vocab_size: int) -> Optional[Tuple[int, int]]:
    """``(position, token)`` of the first token >= ``vocab_size``, or None; scans in chunks.

    Chunked so a memmap of any size is checked with bounded memory; the per-chunk ``max`` is the
    fast path, and only a failing chunk is searched for the exact position.
    """
    if vocab_size > np.iinfo(tokens.dtype).max:
        return None  # every value of the dtype is a valid id
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = np.asarray(tokens[start:start + _SCAN_CHUNK])
        if int(chunk.max()) >= vocab_size:
            pos = int(np.argmax(chunk >= vocab_size))
            return start + pos, int(chunk[pos])
    return None
