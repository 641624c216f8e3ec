"""``build_dataset``: from the config's ``data`` section to a ready ``Dataset``, with checks.

All data checks happen here, once, at start-up, so a bad path or vocabulary fails before any
Ray actor starts, with a one-line ``DataError`` naming the path and the rule:

* the path exists, is the right kind of thing, and holds data (files, bytes, at least
  ``seq_length + 1`` tokens);
* every token is inside ``model.vocab_size`` (a chunked scan of a ``.bin`` memmap; for byte-level
  text, only needed when ``vocab_size < 256``).

``data.path`` is resolved against the current directory here; ship the built ``Dataset`` to Ray
workers (it pickles small: a ``.bin`` source sends its path, not the file) rather than rebuilding
it from a relative path in a worker whose working directory differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from . import binfile, text
from .batches import Dataset
from .errors import DataError
from .sources import BinSource, SyntheticSource, TextSource, TokenSource

BYTE_VOCAB = 256


def build_dataset(cfg) -> Dataset:
    """The training ``Dataset`` for ``cfg`` (a ``ma_ray.config.Config``); raises ``DataError``."""
    t, d = cfg.train, cfg.data
    source = build_source(d.kind, d.path, cfg.model.vocab_size, t.seed,
                          byte_budget=d.max_text_bytes)
    need = t.seq_length + 1
    if source.num_tokens < need:
        where = f"data.path {d.path}" if d.path is not None else f"data ({source.describe()})"
        raise DataError(f"{where}: {source.num_tokens} tokens, fewer than train.seq_length + 1 ({need}) "
                        f"needed for one sample")
    return Dataset(source, seed=t.seed, batch_size=t.batch_size, micro_batch_size=t.micro_batch_size,
                   seq_length=t.seq_length)


def build_source(kind: str, path: Optional[str], vocab_size: int, seed: int,
                 byte_budget: Optional[int] = None) -> TokenSource:
    """The token source for ``data.kind`` / ``data.path``, checked against ``vocab_size``.

    ``byte_budget`` caps the bytes read for ``text`` (None: the whole path, or
    ``text.STDLIB_BYTE_BUDGET`` for the default stdlib corpus).
    """
    if kind == "synthetic":
        return SyntheticSource(vocab_size, seed)  # data.path is ignored: nothing to read
    if kind == "bin":
        if path is None:
            raise DataError("data.path: required when data.kind is bin (a uint16 .bin token file)")
        return _bin_source(_existing(path), path, vocab_size)
    if kind == "text":
        return _text_source(path, vocab_size, byte_budget)
    raise DataError(f"data.kind: must be one of synthetic, text, bin, got {kind!r}")


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path {path}: does not exist")
    return p.resolve()


def _bin_source(p: Path, path: str, vocab_size: int) -> BinSource:
    if p.is_dir():
        raise DataError(f"data.path {path}: is a directory; data.kind bin needs one uint16 .bin token file")
    source = BinSource(p, vocab_size)  # raises DataError for empty or odd-sized files
    bad = binfile.first_out_of_vocab(source._array(), vocab_size)
    if bad is not None:
        pos, tok = bad
        raise DataError(f"data.path {path}: token id {tok} at position {pos} is outside "
                        f"model.vocab_size ({vocab_size})")
    return source


def _text_source(path: Optional[str], vocab_size: int, byte_budget: Optional[int]) -> TextSource:
    if path is None:
        budget = text.STDLIB_BYTE_BUDGET if byte_budget is None else byte_budget
        corpus = text.read_stdlib_corpus(budget)
        label = f"data.path null (the stdlib of Python {text.python_version()} at {corpus.root})"
        origin = f"stdlib of Python {text.python_version()} ({corpus.root})"
        if not corpus.files:
            raise DataError(f"{label}: no .py source files found")
    else:
        p = _existing(path)
        label, origin = f"data.path {path}", str(p)
        if p.is_dir():
            corpus = text.read_corpus(text.walk_text_files(p), p, byte_budget)
            if not corpus.files:
                suffixes = ", ".join(f"*{s}" for s in sorted(text.TEXT_SUFFIXES))
                raise DataError(f"{label}: no non-empty text files ({suffixes}) under this folder")
        else:
            if p.suffix == ".bin":
                raise DataError(f"{label}: looks like a token file; use data.kind bin for .bin files")
            corpus = text.read_corpus(iter([p]), p.parent, byte_budget)
            if not corpus.files:
                raise DataError(f"{label}: is empty (0 bytes)")
    if vocab_size < BYTE_VOCAB:
        tokens = np.frombuffer(corpus.data, dtype=np.uint8)
        bad = np.flatnonzero(tokens >= vocab_size)
        if bad.size:
            pos = int(bad[0])
            raise DataError(f"{label}: byte 0x{tokens[pos]:02x} at offset {pos} (in {corpus.file_at(pos)}) is "
                            f"outside model.vocab_size ({vocab_size}); byte-level text needs vocab_size >= 256")
    return TextSource(corpus, vocab_size, origin)
