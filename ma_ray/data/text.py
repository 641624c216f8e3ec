"""Text corpora on disk: which files a folder holds, in what order, and reading them as bytes.

Order is part of the data: files are visited depth-first with each folder's entries sorted by
name, so the same folder gives the same byte stream on every machine. A folder contributes the
files whose suffix is in ``TEXT_SUFFIXES``; hidden entries and ``__pycache__`` are skipped and
symlinked folders are not followed (no cycles). A single file given directly is read whatever
its suffix.

The default corpus (``data.kind: text`` with ``data.path: null``) is the standard library's own
``.py`` sources: real text that every machine with Python has. Reading all of it (tens of MB,
and ``site-packages`` lives under it) on every start would be slow, so the walk is lazy and
stops at a byte budget (``STDLIB_BYTE_BUDGET``, 4 MiB: a few hundred files, well under a
second), skipping test suites and machine-specific files so that machines with the same Python
version read the same bytes.
"""

from __future__ import annotations

import bisect
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Iterator, List, Optional, Tuple

TEXT_SUFFIXES: FrozenSet[str] = frozenset({".txt", ".md", ".rst", ".py"})
STDLIB_BYTE_BUDGET = 4 * 1024 * 1024

# Folders under the stdlib that are not "the standard library's sources": third-party packages
# (huge, and differ per machine), test suites (tens of MB of fixtures), and the IDLE app.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                               "__pycache__"})
# Generated at build time and full of the build machine's paths: differs between machines.
_STDLIB_SKIP_PREFIXES = ("_sysconfigdata",)


@dataclass(frozen=True)
class TextCorpus:
    """The bytes of a text corpus and where they came from (for messages and logs)."""

    data: bytes
    files: Tuple[Path, ...]
    ends: Tuple[int, ...]  # ends[i] = offset just past files[i] in ``data``
    root: Path
    truncated: bool  # stopped at the byte budget before reading every file

    def file_at(self, offset: int) -> Path:
        """The file that byte ``offset`` of ``data`` came from."""
        return self.files[bisect.bisect_right(self.ends, offset)]


def stdlib_root() -> Path:
    """The standard library's source folder of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def walk_text_files(root: Path, suffixes: FrozenSet[str] = TEXT_SUFFIXES,
                    skip_dirs: FrozenSet[str] = frozenset({"__pycache__"}),
                    skip_prefixes: Tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield text files under ``root`` lazily, depth-first, each folder's entries sorted by name.

    Lazy so a caller with a byte budget stops walking (and stat-ing) as soon as it has enough.
    """
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (PermissionError, NotADirectoryError):
        return
    for entry in entries:
        name = entry.name
        if name.startswith(".") or name.startswith(skip_prefixes):
            continue
        if entry.is_dir(follow_symlinks=False):
            if name not in skip_dirs:
                yield from walk_text_files(Path(entry.path), suffixes, skip_dirs, skip_prefixes)
        elif entry.is_file() and os.path.splitext(name)[1] in suffixes:
            yield Path(entry.path)


def read_corpus(files: Iterator[Path], root: Path, byte_budget: Optional[int] = None) -> TextCorpus:
    """Concatenate ``files`` as raw bytes, stopping once ``byte_budget`` bytes are read.

    Files are concatenated as they are (no separator): they normally end in a newline already,
    and byte-level tokens have no spare id for a document separator. The file that crosses the
    budget is kept whole, so the corpus is always a set of complete files.
    """
    chunks: List[bytes] = []
    paths: List[Path] = []
    ends: List[int] = []
    total = 0
    truncated = False
    for path in files:
        if byte_budget is not None and total >= byte_budget:
            truncated = True
            break
        try:
            data = path.read_bytes()
        except OSError:
            continue  # an unreadable file in a big folder should not stop training
        if not data:
            continue
        chunks.append(data)
        paths.append(path)
        total += len(data)
        ends.append(total)
    return TextCorpus(b"".join(chunks), tuple(paths), tuple(ends), root, truncated)


def read_stdlib_corpus(byte_budget: Optional[int] = STDLIB_BYTE_BUDGET) -> TextCorpus:
    """The default corpus: the first ``byte_budget`` bytes of the stdlib's ``.py`` files."""
    root = stdlib_root()
    files = walk_text_files(root, frozenset({".py"}), _STDLIB_SKIP_DIRS, _STDLIB_SKIP_PREFIXES)
    return read_corpus(files, root, byte_budget)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
