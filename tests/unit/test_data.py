"""The data layer: sources, deterministic batches, the stdlib corpus, and every DataError."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from ma_ray import config
from ma_ray.data import (BinSource, DataError, Dataset, STDLIB_BYTE_BUDGET, TextSource,
                         build_dataset, build_source, open_bin, write_bin)
from ma_ray.data import binfile, text


def make_cfg(**overrides) -> config.Config:
    """A small valid config; ``overrides`` are dotted keys."""
    base = {"train.batch_size": 8, "train.micro_batch_size": 4, "train.gradient_accumulation_steps": 2,
            "train.seq_length": 16, "model.vocab_size": 256}
    base.update(overrides)
    return config.Config().replace(**base)


def all_rows(ds: Dataset, step: int):
    """The step's whole batch, micro-batches concatenated."""
    parts = [ds.micro_batch(step, i) for i in range(ds.grad_accum)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def assert_one_line_error(exc_info, *needles: str) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_bytes(bytes(range(32, 127)) * 20)
    return p


# --- sources ---------------------------------------------------------------------------------

def test_synthetic_batches_shape_range_and_shift():
    ds = build_dataset(make_cfg(**{"data.kind": "synthetic", "model.vocab_size": 1000}))
    x, y = ds.micro_batch(3, 1)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert int(x.min()) >= 0 and int(x.max()) < 1000
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert len(torch.unique(x)) > 20  # random, not constant
    assert "synthetic" in ds.describe()


def test_synthetic_is_uniform_over_the_vocab():
    src = build_source("synthetic", None, vocab_size=7, seed=1)
    counts = np.bincount(src.windows(np.arange(0, 10_000, 100), 100).reshape(-1), minlength=7)
    assert counts.min() > 0.8 * counts.mean()


def test_synthetic_depends_on_seed_and_overlapping_windows_agree():
    a = build_source("synthetic", None, vocab_size=50257, seed=0)
    b = build_source("synthetic", None, vocab_size=50257, seed=1)
    wa = a.windows(np.array([100, 105]), 20)
    assert np.array_equal(wa[0, 5:], wa[1, :15])  # one stream, random access
    assert not np.array_equal(wa, b.windows(np.array([100, 105]), 20))


def test_text_file_windows_are_slices_of_its_bytes(text_file):
    data = text_file.read_bytes()
    ds = build_dataset(make_cfg(**{"data.kind": "text", "data.path": str(text_file)}))
    assert ds.num_tokens == len(data)
    x, y = all_rows(ds, 0)
    for xi, yi in zip(x.tolist(), y.tolist()):
        window = bytes(xi) + bytes(yi[-1:])
        assert window in data
        assert xi[1:] == yi[:-1]
    assert str(text_file) in ds.describe()


def test_text_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zzzz\n" * 10)
    (tmp_path / "b" / "a.py").write_text("aaaa\n" * 10)
    (tmp_path / "c.txt").write_text("cccc\n" * 10)
    (tmp_path / "a.rst").write_text("rrrr\n" * 10)
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 100)  # not a text suffix
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("hidden\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.txt").write_text("cache\n")
    src = build_source("text", str(tmp_path), vocab_size=256, seed=0)
    assert isinstance(src, TextSource)
    names = [p.relative_to(tmp_path).as_posix() for p in src.corpus.files]
    assert names == ["a.rst", "b/a.py", "b/z.md", "c.txt"]
    assert src.corpus.data == b"rrrr\n" * 10 + b"aaaa\n" * 10 + b"zzzz\n" * 10 + b"cccc\n" * 10


def test_text_byte_budget_keeps_whole_files(tmp_path):
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_bytes(name.encode() * 100)
    src = build_source("text", str(tmp_path), vocab_size=256, seed=0, byte_budget=150)
    assert src.corpus.data == b"a" * 100 + b"b" * 100
    assert src.corpus.truncated and "byte budget" in src.describe()


def test_bin_memmap_round_trip(tmp_path):
    tokens = np.arange(5000) % 1000
    path = tmp_path / "train.bin"
    assert write_bin(path, tokens) == 5000
    assert path.stat().st_size == 10000  # flat uint16, no header
    mm = open_bin(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    assert np.array_equal(np.asarray(mm), tokens)
    ds = build_dataset(make_cfg(**{"data.kind": "bin", "data.path": str(path), "model.vocab_size": 1000}))
    assert isinstance(ds.source, BinSource) and isinstance(ds.source._array(), np.memmap)
    assert ds.num_tokens == 5000
    x, y = all_rows(ds, 7)
    assert torch.equal(y, (x + 1) % 1000)  # consecutive tokens of the file
    assert "train.bin" in ds.describe()


def test_write_bin_takes_bytes_as_byte_tokens(tmp_path, text_file):
    path = tmp_path / "text.bin"
    write_bin(path, text_file.read_bytes())
    assert bytes(np.asarray(open_bin(path)).astype(np.uint8)) == text_file.read_bytes()


def test_bin_dataset_pickles_without_the_file(tmp_path):
    path = tmp_path / "big.bin"
    write_bin(path, np.arange(200_000) % 60000)
    ds = build_dataset(make_cfg(**{"data.kind": "bin", "data.path": str(path), "model.vocab_size": 60000}))
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # the path travels, not 400 kB of tokens
    clone = pickle.loads(blob)
    for a, b in zip(ds.micro_batch(2, 1), clone.micro_batch(2, 1)):
        assert torch.equal(a, b)


def test_text_dataset_pickles_its_bytes_once(text_file):
    ds = build_dataset(make_cfg(**{"data.kind": "text", "data.path": str(text_file)}))
    blob = pickle.dumps(ds)
    assert len(blob) < 1.5 * ds.num_tokens + 10_000
    clone = pickle.loads(blob)
    for a, b in zip(ds.micro_batch(1, 0), clone.micro_batch(1, 0)):
        assert torch.equal(a, b)


def test_vocab_scan_is_chunked_and_finds_the_first_bad_token(monkeypatch):
    monkeypatch.setattr(binfile, "_SCAN_CHUNK", 100)
    tokens = np.zeros(1000, dtype=np.uint16)
    tokens[[750, 900]] = [500, 700]
    assert binfile.first_out_of_vocab(tokens, 500) == (750, 500)
    assert binfile.first_out_of_vocab(tokens, 701) is None
    assert binfile.first_out_of_vocab(tokens, 65536) is None


# --- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["synthetic", "text"])
def test_same_seed_step_index_same_batch_and_steps_differ(kind, text_file):
    path = str(text_file) if kind == "text" else None
    cfg = make_cfg(**{"data.kind": kind, "data.path": path})
    a, b = build_dataset(cfg), build_dataset(cfg)  # built separately: no shared state
    for step in (0, 1, 12345):
        for i in range(a.grad_accum):
            xa, ya = a.micro_batch(step, i)
            xb, yb = b.micro_batch(step, i)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.micro_batch(0, 0)[0], a.micro_batch(1, 0)[0])
    assert not torch.equal(a.micro_batch(0, 0)[0], a.micro_batch(0, 1)[0])
    other_seed = build_dataset(make_cfg(**{"data.kind": kind, "data.path": path, "train.seed": 1}))
    assert not torch.equal(a.micro_batch(0, 0)[0], other_seed.micro_batch(0, 0)[0])


def test_access_order_does_not_matter():
    """Stateless: resuming at step s (or any worker asking for any micro-batch) sees the same data."""
    cfg = make_cfg()
    fresh = build_dataset(cfg)
    resumed = build_dataset(cfg)
    for step in range(5):
        for i in range(2):
            fresh.micro_batch(step, i)
    expected = fresh.micro_batch(5, 1)
    got = resumed.micro_batch(5, 1)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_batches_do_not_depend_on_the_cluster_split(text_file):
    data = {"data.kind": "text", "data.path": str(text_file)}
    reference = build_dataset(make_cfg(**data))
    for split in [{"cluster.attention_gpus": 10}, {"cluster.attention_gpus": 14},
                  {"cluster.num_nodes": 2, "cluster.gpus_per_node": 8},
                  {"cluster.fake_gpus": True, "balance.enabled": False}]:
        other = build_dataset(make_cfg(**data, **split))
        for step in (0, 3):
            for i in range(2):
                assert torch.equal(reference.micro_batch(step, i)[0], other.micro_batch(step, i)[0])


def test_step_batch_does_not_depend_on_the_micro_batch_size():
    whole = {}
    for mbs in (1, 2, 4, 8):
        ds = build_dataset(make_cfg(**{"train.micro_batch_size": mbs, "train.gradient_accumulation_steps": 8 // mbs}))
        whole[mbs] = all_rows(ds, 4)
    for mbs in (1, 2, 4):
        assert torch.equal(whole[mbs][0], whole[8][0]) and torch.equal(whole[mbs][1], whole[8][1])


def test_rows_slices_a_micro_batch():
    ds = build_dataset(make_cfg())
    x, y = ds.micro_batch(2, 1)
    xs, ys = ds.rows(2, 5, 7)
    assert torch.equal(xs, x[1:3]) and torch.equal(ys, y[1:3])


def test_bad_step_or_index_is_a_value_error():
    ds = build_dataset(make_cfg())
    with pytest.raises(ValueError, match="index"):
        ds.micro_batch(0, 2)
    with pytest.raises(ValueError, match="step"):
        ds.micro_batch(-1, 0)


# --- the default corpus ----------------------------------------------------------------------

def test_default_stdlib_corpus_loads_fast_and_is_real_python():
    t0 = time.perf_counter()
    ds = build_dataset(make_cfg(**{"data.kind": "text", "data.path": None}))
    elapsed = time.perf_counter() - t0
    corpus = ds.source.corpus
    assert STDLIB_BYTE_BUDGET <= ds.num_tokens < STDLIB_BYTE_BUDGET + 2 * 1024 * 1024
    assert len(corpus.files) >= 50
    assert all(p.suffix == ".py" for p in corpus.files)
    for p in corpus.files:
        parts = set(p.relative_to(corpus.root).parts)
        assert not parts & {"site-packages", "dist-packages", "test", "tests", "__pycache__"}, p
        assert not p.name.startswith("_sysconfigdata")
    assert corpus.data.count(b"def ") > 1000 and corpus.data.count(b"import ") > 100
    assert "stdlib" in ds.describe()
    assert elapsed < 5.0, f"stdlib corpus took {elapsed:.2f} s"
    x, y = ds.micro_batch(0, 0)
    assert int(x.max()) < 256 and torch.equal(x[:, 1:], y[:, :-1])


def test_default_stdlib_corpus_is_the_same_every_time():
    a = text.read_stdlib_corpus(200_000)
    b = text.read_stdlib_corpus(200_000)
    assert a.files == b.files and a.data == b.data


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["text", "bin"])
def test_missing_path(kind, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as err:
        build_source(kind, str(missing), vocab_size=256, seed=0)
    assert_one_line_error(err, "data.path", str(missing), "does not exist")


def test_bin_without_path():
    with pytest.raises(DataError) as err:
        build_source("bin", None, vocab_size=256, seed=0)
    assert_one_line_error(err, "data.path", "required", "bin")
    # The config itself already refuses it, with its own error type.
    with pytest.raises(config.ConfigError, match="data.path"):
        make_cfg(**{"data.kind": "bin"})


def test_empty_folder_and_folder_without_text_files(tmp_path):
    with pytest.raises(DataError) as err:
        build_source("text", str(tmp_path), vocab_size=256, seed=0)
    assert_one_line_error(err, str(tmp_path), "no non-empty text files")
    (tmp_path / "data.csv").write_text("1,2,3\n")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as err:
        build_source("text", str(tmp_path), vocab_size=256, seed=0)
    assert_one_line_error(err, str(tmp_path), "*.txt")


@pytest.mark.parametrize("kind,name", [("text", "empty.txt"), ("bin", "empty.bin")])
def test_zero_byte_file(kind, name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        build_source(kind, str(path), vocab_size=256, seed=0)
    assert_one_line_error(err, str(path), "empty (0 bytes)")


@pytest.mark.parametrize("kind", ["text", "bin"])
def test_fewer_tokens_than_one_sample(kind, tmp_path):
    path = tmp_path / ("short.bin" if kind == "bin" else "short.txt")
    if kind == "bin":
        write_bin(path, range(16))
    else:
        path.write_bytes(b"x" * 16)
    with pytest.raises(DataError) as err:
        build_dataset(make_cfg(**{"data.kind": kind, "data.path": str(path)}))
    assert_one_line_error(err, str(path), "16 tokens", "train.seq_length + 1 (17)")
    path.write_bytes(path.read_bytes() * 2)  # now enough
    assert build_dataset(make_cfg(**{"data.kind": kind, "data.path": str(path)})).num_tokens >= 17


def test_odd_sized_bin_file(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError) as err:
        build_source("bin", str(path), vocab_size=256, seed=0)
    assert_one_line_error(err, str(path), "3 bytes", "uint16")


def test_bin_directory(tmp_path):
    with pytest.raises(DataError) as err:
        build_source("bin", str(tmp_path), vocab_size=256, seed=0)
    assert_one_line_error(err, str(tmp_path), "is a directory")


def test_bin_tokens_outside_the_vocab(tmp_path):
    path = tmp_path / "train.bin"
    tokens = np.arange(3000) % 100
    tokens[2345] = 4000
    write_bin(path, tokens)
    with pytest.raises(DataError) as err:
        build_source("bin", str(path), vocab_size=1000, seed=0)
    assert_one_line_error(err, str(path), "token id 4000", "position 2345", "model.vocab_size (1000)")
    assert isinstance(build_source("bin", str(path), vocab_size=4001, seed=0), BinSource)


def test_text_bytes_outside_a_small_vocab(tmp_path):
    (tmp_path / "a.txt").write_text("plain ascii\n" * 10)
    (tmp_path / "b.txt").write_text("caf\u00e9\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        build_source("text", str(tmp_path), vocab_size=128, seed=0)
    assert_one_line_error(err, str(tmp_path), "byte 0xc3", "b.txt", "model.vocab_size (128)")
    # ASCII-only text fits a 128-token vocabulary.
    assert build_source("text", str(tmp_path / "a.txt"), vocab_size=128, seed=0).num_tokens == 120


def test_text_kind_refuses_a_bin_file(tmp_path):
    path = tmp_path / "train.bin"
    write_bin(path, range(100))
    with pytest.raises(DataError) as err:
        build_source("text", str(path), vocab_size=256, seed=0)
    assert_one_line_error(err, str(path), "data.kind bin")


def test_write_bin_rejects_ids_that_do_not_fit_uint16(tmp_path):
    with pytest.raises(DataError) as err:
        write_bin(tmp_path / "x.bin", [1, 70000])
    assert_one_line_error(err, "x.bin", "65535")
    with pytest.raises(DataError):
        write_bin(tmp_path / "x.bin", [-1, 2])
    assert not (tmp_path / "x.bin").exists()
