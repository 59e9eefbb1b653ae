"""Training datasets: packing, determinism, splits, blending, resumable and disjoint data-parallel order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from data_helpers import EOD, doc_of, synthetic_docs, write_synthetic

from neo.data import dataset as D
from neo.data.dataset import GPTDataset, build_datasets, micro_batches, split_ranges
from neo.data.indexed import DataError, IndexedTokens

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three token files with disjoint document ids: a = 0..999, b = 1000..1399, c = 2000..2299."""
    root = tmp_path_factory.mktemp("tokens")
    return {
        name: write_synthetic(root / name, synthetic_docs(n, seed=i, first=first))
        for i, (name, n, first) in enumerate([("a", 1000, 0), ("b", 400, 1000), ("c", 300, 2000)])
    }


def build(paths, tmp_path, n=2000, seed=1234, weights=None, split="969,30,1", **kw):
    return build_datasets(
        train_paths=paths,
        train_weights=weights,
        valid_paths=kw.pop("valid", []),
        test_paths=kw.pop("test", []),
        split=split,
        seq_length=SEQ,
        seed=seed,
        num_samples={"train": n, "valid": 300, "test": 50},
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def stream(ds: GPTDataset) -> np.ndarray:
    """The token stream the dataset cuts samples from: its documents in its order, epoch after epoch."""
    return np.concatenate([ds.data.doc(ds.lo + int(d)) for d in ds.doc_idx])


def test_samples_are_packed_windows_of_the_document_stream(corpus, tmp_path):
    ds = build([corpus["a"]], tmp_path, n=3000)["train"]
    data = IndexedTokens(corpus["a"])
    assert len(ds) >= 3000 and all(len(ds[i]) == SEQ + 1 for i in range(0, len(ds), 97))
    s = stream(ds)
    for i in range(0, len(ds), 13):
        j = int(ds.order[i])
        np.testing.assert_array_equal(ds[i], s[j * SEQ : j * SEQ + SEQ + 1])
    # samples cross document boundaries (EOD inside a sample), and each epoch holds every train doc once
    assert any(EOD in ds[i][:-1] for i in range(20))
    n_train = split_ranges("969,30,1", len(data))["train"][1]
    epochs = ds.doc_idx.reshape(-1, n_train)
    assert len(epochs) > 1 and all(sorted(e) == list(range(n_train)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])  # a new shuffle every epoch


def test_epochs_are_visited_in_turn(corpus, tmp_path):
    ds = build([corpus["a"]], tmp_path, n=5000)["train"]
    tokens_per_epoch = int(ds.starts[len(np.unique(ds.doc_idx))])
    epoch = np.asarray(ds.order) * SEQ // tokens_per_epoch  # the epoch in which each visited sample starts
    assert np.all(np.diff(epoch) >= 0) and epoch[-1] >= 1
    assert not np.all(np.diff(np.asarray(ds.order)) > 0)  # but shuffled within an epoch


def test_more_samples_extend_the_same_order(corpus, tmp_path):
    """Raising the iterations on resume must continue the sequence, not reshuffle what was planned:
    the samples of a short schedule are the first samples of a longer one (across epoch counts)."""
    short = build([corpus["a"]], tmp_path, n=700)["train"]
    long = build([corpus["a"]], tmp_path, n=5000)["train"]
    tokens_per_epoch = int(short.starts[len(np.unique(short.doc_idx))])
    assert 700 * SEQ < tokens_per_epoch < 5000 * SEQ // 2  # 1 epoch vs several
    for i in range(len(short)):
        np.testing.assert_array_equal(short[i], long[i])
    blend_short = build([corpus["a"], corpus["b"]], tmp_path, n=700, weights=[0.7, 0.3])["train"]
    blend_long = build([corpus["a"], corpus["b"]], tmp_path, n=5000, weights=[0.7, 0.3])["train"]
    for i in range(700):
        np.testing.assert_array_equal(blend_short[i], blend_long[i])


def test_deterministic_for_a_seed_and_cached(corpus, tmp_path, monkeypatch):
    a = build([corpus["a"]], tmp_path / "x")["train"]
    b = build([corpus["a"]], tmp_path / "y")["train"]  # separate cache: built again from scratch
    c = build([corpus["a"]], tmp_path / "z", seed=99)["train"]
    assert all(np.array_equal(a[i], b[i]) for i in range(200))
    assert not all(np.array_equal(a[i], c[i]) for i in range(200))
    # the second build in the same cache loads the arrays instead of rebuilding them
    monkeypatch.setattr(D, "_sample_index", lambda *a, **k: pytest.fail("index rebuilt despite the cache"))
    d = build([corpus["a"]], tmp_path / "x")["train"]
    assert all(np.array_equal(a[i], d[i]) for i in range(200))
    assert not list((tmp_path / "x" / "cache").glob("*.tmp"))


def test_split_by_documents(corpus, tmp_path):
    assert split_ranges("969,30,1", 1000) == {"train": (0, 969), "valid": (969, 999), "test": (999, 1000)}
    assert split_ranges("98,2", 10) == {"train": (0, 9), "valid": (9, 10), "test": (10, 10)}
    with pytest.raises(DataError, match="'969;30'"):
        split_ranges("969;30", 10)
    ds = build([corpus["a"]], tmp_path)
    for name, (lo, hi) in split_ranges("969,30,1", 1000).items():
        docs = {doc_of(t) for i in range(len(ds[name])) for t in ds[name][i]} - {-1}
        assert docs <= set(range(lo, hi)) and len(docs) > 0.5 * (hi - lo)
    assert build([corpus["a"]], tmp_path, split="100,0,0")["valid"] is None


def test_separate_split_paths(corpus, tmp_path):
    ds = build([corpus["a"]], tmp_path, valid=[corpus["b"]], test=[corpus["c"]])
    assert {doc_of(t) // 1000 for i in range(0, len(ds["train"]), 7) for t in ds["train"][i]} - {-1} == {0}
    assert {doc_of(t) // 1000 for i in range(len(ds["valid"])) for t in ds["valid"][i]} - {-1} == {1}
    assert {doc_of(t) // 1000 for i in range(len(ds["test"])) for t in ds["test"][i]} - {-1} == {2}


def test_blend_ratios_and_determinism(corpus, tmp_path):
    weights = [0.5, 0.3, 0.2]
    n = 6000
    ds = build([corpus["a"], corpus["b"], corpus["c"]], tmp_path, n=n, weights=weights)["train"]
    again = build([corpus["a"], corpus["b"], corpus["c"]], tmp_path / "other", n=n, weights=weights)["train"]
    assert len(ds) == n
    source = np.array([doc_of(next(t for t in ds[i] if t != EOD)) // 1000 for i in range(n)])
    for prefix in (n // 10, n):
        mix = np.bincount(source[:prefix], minlength=3) / prefix
        assert np.all(np.abs(mix - weights) < 0.01), mix
    assert all(np.array_equal(ds[i], again[i]) for i in range(0, n, 50))
    # valid is blended by token count, from the valid documents of each file
    valid = build([corpus["a"], corpus["b"], corpus["c"]], tmp_path, n=n, weights=weights)["valid"]
    assert len(valid) == 300


def test_blend_index_prefixes_track_weights():
    which, nth = D.blend_index([3, 1, 1, 5], 10_000)
    w = np.array([0.3, 0.1, 0.1, 0.5])
    for k in (10, 100, 1000, 10_000):
        assert np.all(np.abs(np.bincount(which[:k], minlength=4) - w * k) <= 1.5)
    for i in range(4):  # each dataset's samples are taken in order, none twice
        np.testing.assert_array_equal(nth[which == i], np.arange(np.sum(which == i)))


def samples_of(batch: torch.Tensor) -> list[tuple]:
    return [tuple(row.tolist()) for row in batch]


def test_micro_batches_dp_slices_are_disjoint_and_cover_the_batch(corpus, tmp_path):
    ds = build([corpus["a"]], tmp_path)["train"]
    G, micro, dp = 16, 2, 4
    ranks = [
        micro_batches(
            ds, consumed_samples=0, global_batch_size=G, micro_batch_size=micro, dp_rank=r, dp_size=dp
        )
        for r in range(dp)
    ]
    for step in range(3):
        got = [b for r in ranks for b in itertools.islice(r, G // (dp * micro))]
        assert all(b.shape == (micro, SEQ + 1) and b.dtype == torch.int64 for b in got)
        rows = [s for b in got for s in samples_of(b)]
        assert len(set(rows)) == G  # disjoint across ranks
        assert rows == [
            tuple(ds[i].tolist()) for i in range(step * G, (step + 1) * G)
        ]  # rank r: slice r, in order


def test_resume_equals_uninterrupted_run(corpus, tmp_path):
    G, micro, dp, k = 12, 3, 2, 5
    kw = dict(global_batch_size=G, micro_batch_size=micro, dp_size=dp)
    ds = build([corpus["a"], corpus["b"]], tmp_path, weights=[0.7, 0.3])["train"]
    full = {
        r: list(itertools.islice(micro_batches(ds, consumed_samples=0, dp_rank=r, **kw), 2 * (k + 4)))
        for r in range(dp)
    }
    # "restart": rebuild everything from the cache, continue after k global batches
    ds2 = build([corpus["a"], corpus["b"]], tmp_path, weights=[0.7, 0.3])["train"]
    for r in range(dp):
        resumed = list(itertools.islice(micro_batches(ds2, consumed_samples=k * G, dp_rank=r, **kw), 8))
        assert all(torch.equal(x, y) for x, y in zip(resumed, full[r][2 * k :], strict=True))


def test_bad_batch_arithmetic_tokenizer_mismatch_and_tiny_split(corpus, tmp_path):
    ds = build([corpus["a"]], tmp_path)["train"]
    with pytest.raises(DataError, match="not a multiple"):
        next(
            micro_batches(
                ds, consumed_samples=0, global_batch_size=10, micro_batch_size=4, dp_rank=0, dp_size=1
            )
        )
    with pytest.raises(DataError, match="tokenized with 'synthetic' but the run uses 'gpt2'"):
        build([corpus["a"]], tmp_path, tokenizer="gpt2")
    tiny = write_synthetic(tmp_path / "tiny", synthetic_docs(3, lo=1, hi=5))
    with pytest.raises(DataError, match="fewer than one sample"):
        build([tiny], tmp_path, split="1,0,0")


def _rank_main(rank: int, world: int, store: str, prefix: str, cache: str, out) -> None:
    """One process of a 2-rank gloo group: rank 1 must wait for rank 0's index, never build one itself."""
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)
    if rank:
        D._sample_index = lambda *a, **k: (_ for _ in ()).throw(AssertionError("rank 1 built an index"))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ds = build_datasets(
            train_paths=[prefix],
            train_weights=None,
            valid_paths=[],
            test_paths=[],
            split="969,30,1",
            seq_length=SEQ,
            seed=5,
            num_samples={"train": 500, "valid": 50},
            cache_dir=cache,
        )
        out.put((rank, [ds["train"][i].tolist() for i in range(0, 500, 25)]))
    except BaseException as e:  # report instead of hanging the other rank
        out.put((rank, repr(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_index_built_by_rank0_under_torch_distributed(corpus, tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_rank_main, args=(r, 2, str(tmp_path / "store"), corpus["a"], str(tmp_path / "c"), out)
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert isinstance(results[0], list) and results[0] == results[1], results
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "c").iterdir() if p.is_dir()) == [
        "train",
        "valid",
    ]
