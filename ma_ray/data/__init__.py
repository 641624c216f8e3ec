"""The data layer: token sources and deterministic training batches.

The rest of the package calls ``build_dataset(cfg)`` once at start-up and then
``dataset.micro_batch(step, index)`` for each gradient-accumulation micro-batch::

    dataset = build_dataset(cfg)             # checks everything; raises DataError
    log(dataset.describe())                  # one line
    inputs, targets = dataset.micro_batch(step, i)   # int64 [micro_batch_size, seq_length]

Batches are a pure function of ``(train.seed, step, index)``: independent of the cluster split
and of the number of workers, and a resumed run needs only the step number. Modules:
``sources`` (bin memmap, byte-level text, synthetic), ``text`` (which files, in what order),
``binfile`` (the uint16 ``.bin`` layout, ``write_bin``), ``batches`` (window sampling),
``build`` (config to dataset, with the checks), ``errors`` (``DataError``).
"""

from .batches import Dataset
from .binfile import open_bin, write_bin
from .build import build_dataset, build_source
from .errors import DataError
from .sources import BinSource, SyntheticSource, TextSource, TokenSource
from .text import STDLIB_BYTE_BUDGET, TEXT_SUFFIXES

__all__ = [
    "BinSource", "DataError", "Dataset", "STDLIB_BYTE_BUDGET", "SyntheticSource", "TEXT_SUFFIXES",
    "TextSource", "TokenSource", "build_dataset", "build_source", "open_bin", "write_bin",
]
