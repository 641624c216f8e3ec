"""Token sources: a flat, random-access stream of token ids, whatever is behind it.

A source knows its length and can copy out windows ``[offset, offset + length)``; sampling
which windows make a batch is ``batches.py``'s concern. Three kinds:

* ``BinSource``: a uint16 ``.bin`` memmap (never read whole; see ``binfile.py``).
* ``TextSource``: byte-level tokens (token = byte value, vocab 256) of a text corpus held in
  memory (see ``text.py``).
* ``SyntheticSource``: a virtual stream whose token at position ``p`` is a hash of
  ``(seed, p)``: stateless like the others, so overlapping windows agree, and nothing is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import binfile
from .text import TextCorpus


class TokenSource:
    """A random-access stream of ``num_tokens`` token ids in ``[0, vocab_size)``."""

    num_tokens: int
    vocab_size: int

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        """int64 array [len(offsets), length]: row r is tokens ``offsets[r] .. offsets[r]+length-1``."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class _ArraySource(TokenSource):
    """A source backed by a 1-D numpy array (in memory or memmap)."""

    def _array(self) -> np.ndarray:
        raise NotImplementedError

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        arr = self._array()
        out = np.empty((len(offsets), length), dtype=np.int64)
        # One contiguous slice per row: on a memmap that reads just the pages of the window,
        # which beats fancy-indexing a [rows, length] index array.
        for r, off in enumerate(offsets.tolist()):
            out[r] = arr[off:off + length]
        return out


class BinSource(_ArraySource):
    """Tokens of a uint16 ``.bin`` file, read through a memmap.

    The memmap is reopened lazily after unpickling (and is not pickled): shipping the source to a
    Ray worker sends the path, not a copy of the file.
    """

    def __init__(self, path: Path, vocab_size: int, label: str = "data.path"):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self._mm: Optional[np.memmap] = binfile.open_bin(self.path, label)
        self.num_tokens = len(self._mm)

    def _array(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=binfile.BIN_DTYPE, mode="r")
        return self._mm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def describe(self) -> str:
        return f"bin {self.path} ({self.num_tokens:,} uint16 tokens)"


class TextSource(_ArraySource):
    """Byte-level tokens of a text corpus: token id = byte value, so ids are in [0, 256)."""

    def __init__(self, corpus: TextCorpus, vocab_size: int, origin: str):
        self.corpus = corpus
        self.vocab_size = vocab_size
        self.origin = origin  # e.g. "stdlib of Python 3.11.7" or the user's path
        self._tokens = np.frombuffer(corpus.data, dtype=np.uint8)
        self.num_tokens = len(self._tokens)

    def _array(self) -> np.ndarray:
        return self._tokens

    # The token array is a view of corpus.data: pickle the bytes once, rebuild the view after.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_tokens"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokens = np.frombuffer(self.corpus.data, dtype=np.uint8)

    def describe(self) -> str:
        n = len(self.corpus.files)
        cut = ", stopped at the byte budget" if self.corpus.truncated else ""
        return (f"text {self.origin}: {self.num_tokens:,} bytes from {n} file{'s' * (n != 1)}{cut}, "
                f"byte-level tokens")


# The virtual stream is long enough that sampled windows practically never repeat, and short
# enough that int64 offsets and uint64 hashing never overflow.
SYNTHETIC_TOKENS = 2 ** 40
_SYNTHETIC_TAG = 0x5EED_DA7A


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed bijection on uint64 (wraps by design)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SyntheticSource(TokenSource):
    """Seeded random tokens, uniform over ``[0, vocab_size)``; token ``p`` = hash(seed, p).

    A counter-based generator rather than a stateful one: any window is computed directly from
    its offset, so the stream needs no storage and random access is as cheap as sequential.
    """

    def __init__(self, vocab_size: int, seed: int):
        self.vocab_size = vocab_size
        self.seed = seed
        self.num_tokens = SYNTHETIC_TOKENS
        key = np.array([(seed ^ _SYNTHETIC_TAG) & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)
        self._key = _mix64(key)[0]

    def windows(self, offsets: np.ndarray, length: int) -> np.ndarray:
        pos = offsets.astype(np.uint64)[:, None] + np.arange(length, dtype=np.uint64)[None, :]
        # (pos + key) * golden ratio before mixing: the usual splitmix64 stream, keyed by seed.
        h = _mix64((pos + self._key) * np.uint64(0x9E3779B97F4A7C15))
        # Modulo bias is < vocab / 2**64: negligible.
        return (h % np.uint64(self.vocab_size)).astype(np.int64)

    def describe(self) -> str:
        return f"synthetic: seeded uniform tokens over vocab {self.vocab_size:,} (unbounded stream)"
