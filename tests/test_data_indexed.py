"""The .bin/.idx format reads back exactly, and broken pairs are refused with a clear error."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from data_helpers import synthetic_docs, write_synthetic

from neo.data.indexed import BIN_HEADER, IDX_HEADER, DataError, IndexedTokens, IndexedTokensWriter


@pytest.mark.parametrize("vocab, dtype", [(50257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_round_trip_exact(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, rng.integers(1, 500)) for _ in range(200)] + [np.array([vocab - 1])]
    with IndexedTokensWriter(tmp_path / "d", vocab_size=vocab, tokenizer="t", eod_id=7) as w:
        w.add(np.concatenate(docs[:50]), np.array([len(d) for d in docs[:50]]))  # batched
        for d in docs[50:]:
            w.add_doc(d)
    r = IndexedTokens(tmp_path / "d")
    assert (len(r), r.num_tokens, r.dtype) == (len(docs), sum(map(len, docs)), np.dtype(dtype))
    assert (r.tokenizer, r.eod_id, r.vocab_size) == ("t", 7, vocab)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(r.doc(i), d)
    assert os.path.getsize(tmp_path / "d.bin") == BIN_HEADER + r.num_tokens * np.dtype(dtype).itemsize
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_refuses_ids_outside_vocab(tmp_path):
    with (
        pytest.raises(DataError, match="vocab_size"),
        IndexedTokensWriter(tmp_path / "d", vocab_size=100) as w,
    ):
        w.add_doc([5, 100])
    assert not list(tmp_path.iterdir())  # aborted: no final files, no temporaries


def test_interrupted_writer_leaves_nothing_complete(tmp_path):
    old = write_synthetic(tmp_path / "d", synthetic_docs(5))
    w = IndexedTokensWriter(tmp_path / "d", vocab_size=1 << 20)
    w.add_doc([1, 2, 3])
    # mid-run (as if killed now): the old pair is gone and only temporary names exist
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin.tmp", "d.idx.tmp"]
    with pytest.raises(DataError, match="no such file"):
        IndexedTokens(old)
    w.close()
    assert len(IndexedTokens(old)) == 1


def _pair(tmp_path, name="d", n=20, seed=0):
    return write_synthetic(tmp_path / name, synthetic_docs(n, seed))


def test_truncated_bin(tmp_path):
    p = _pair(tmp_path)
    size = os.path.getsize(f"{p}.bin")
    os.truncate(f"{p}.bin", size - 2)
    with pytest.raises(DataError, match=r"d\.bin: .*truncated"):
        IndexedTokens(p)
    os.truncate(f"{p}.bin", 10)
    with pytest.raises(DataError, match="truncated"):
        IndexedTokens(p)


def test_truncated_idx(tmp_path):
    p = _pair(tmp_path)
    os.truncate(f"{p}.idx", os.path.getsize(f"{p}.idx") - 8)
    with pytest.raises(DataError, match=r"d\.idx: truncated"):
        IndexedTokens(p)
    os.truncate(f"{p}.idx", 5)
    with pytest.raises(DataError, match=r"d\.idx: truncated"):
        IndexedTokens(p)


def test_mismatched_pair(tmp_path):
    a, b = _pair(tmp_path, "a", seed=1), _pair(tmp_path, "b", seed=1)  # same content, different runs
    os.replace(f"{b}.bin", f"{a}.bin")
    with pytest.raises(DataError, match="different preprocessing runs"):
        IndexedTokens(a)


def test_other_version_and_foreign_files(tmp_path):
    p = _pair(tmp_path)
    with open(f"{p}.idx", "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 2))
    with pytest.raises(DataError, match="format version 2, this neo reads version 1"):
        IndexedTokens(p)
    with open(f"{p}.idx", "r+b") as f:
        f.write(b"MMIDIDX\x00\x00")
    with pytest.raises(DataError, match="Megatron"):
        IndexedTokens(p)
    q = _pair(tmp_path, "q")
    with open(f"{q}.bin", "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(DataError, match=r"q\.bin: not a neo \.bin"):
        IndexedTokens(q)


def test_corrupt_offsets(tmp_path):
    p = _pair(tmp_path)
    with open(f"{p}.idx", "r+b") as f:
        f.seek(IDX_HEADER + 8 * 3)
        f.write(struct.pack("<Q", 10**12))
    with pytest.raises(DataError, match="offsets are corrupt"):
        IndexedTokens(p)


def test_missing_half(tmp_path):
    p = _pair(tmp_path)
    os.remove(f"{p}.bin")
    with pytest.raises(DataError, match=r"d\.bin: no such file; run `python launch/preprocess.py"):
        IndexedTokens(p)
