"""ChatDataset and PreferenceDataset: whole examples, aligned masks and segments, padding, resumable order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from data_helpers import STRIDE, SYN_VOCAB

from neo.data.dataset import micro_batch_samples
from neo.data.examples import ChatDataset, PreferenceDataset, build_example_datasets, segment_positions
from neo.data.indexed import DataError, IndexedTokens, IndexedTokensWriter

SEQ = 48
PAD = 0
TEMPLATE = {"name": "chatml", "source": "x"}


def synthetic_chat(n: int, seed: int = 0, lo: int = 4, hi: int = 40, first: int = 0) -> list:
    """Documents whose token j of document d is 1 + d*STRIDE + j; a random answer span carries loss."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(first, first + n):
        length = int(rng.integers(lo, hi))
        mask = np.zeros(length, np.uint8)
        a = int(rng.integers(1, length))
        mask[a : int(rng.integers(a + 1, length + 1))] = 1
        out.append((1 + d * STRIDE + np.arange(length), mask))
    return out


def write(prefix, docs, fmt="chat", pairs=None, template=TEMPLATE, tokenizer="synthetic"):
    with IndexedTokensWriter(prefix, vocab_size=SYN_VOCAB, tokenizer=tokenizer, eod_id=PAD, data_format=fmt, mask=True,
                             pairs=pairs is not None, meta={"chat_template": template}) as w:  # fmt: skip
        for ids, mask in docs:
            w.add_doc(ids, mask)
        if pairs is not None:
            w.add_pairs(pairs)
    return str(prefix)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    docs = synthetic_chat(300, hi=40) + synthetic_chat(20, seed=1, lo=60, hi=120, first=300)  # 20 overlong
    return write(root / "c", docs), docs


def doc_of(token) -> int:
    return (int(token) - 1) // STRIDE


def segments_of(item):
    """[(segment id, slice)] of a sample, in order."""
    seg = item["segments"]
    out = []
    for k, grp in itertools.groupby(range(len(seg)), key=lambda i: int(seg[i])):
        idx = list(grp)
        out.append((k, slice(idx[0], idx[-1] + 1)))
    return out


def test_packing_keeps_examples_whole_and_aligned(chat, tmp_path):
    prefix, docs = chat
    data = IndexedTokens(prefix)
    ds = ChatDataset(data, 0, 320, seq_length=SEQ, seed=3, num_samples=400, packing=True, pad_id=PAD,
                     cache_dir=str(tmp_path))  # fmt: skip
    assert len(ds) >= 400 and ds.truncated == 20
    seen, cursor, kept = [], 0, 320 - ds.skipped
    for i in range(len(ds)):
        item = ds[i]
        assert [item[k].dtype for k in ("tokens", "loss_mask", "segments")] == [np.int64, np.uint8, np.int32]
        assert all(len(item[k]) == SEQ + 1 for k in item)
        parts = segments_of(item)
        ids = [k for k, _ in parts if k >= 0]
        assert ids == list(range(len(ids))) and (parts[-1][0] == -1 or parts[-1][1].stop == SEQ + 1)
        for k, sl in parts:
            if k < 0:  # padding: pad id, no loss, only at the end
                assert (
                    (item["tokens"][sl] == PAD).all()
                    and not item["loss_mask"][sl].any()
                    and sl.stop == SEQ + 1
                )
                continue
            d = doc_of(item["tokens"][sl][0])
            want_ids, want_mask = docs[d][0][: SEQ + 1], docs[d][1][: SEQ + 1].copy()
            want_mask[0] = 0  # a segment's first token is never a label
            np.testing.assert_array_equal(item["tokens"][sl], want_ids)  # the whole example, never split
            np.testing.assert_array_equal(item["loss_mask"][sl], want_mask)
            assert (segment_positions(item["segments"])[sl] == np.arange(sl.stop - sl.start)).all()
            seen.append(d)
        used = sum(sl.stop - sl.start for k, sl in parts if k >= 0)
        cursor += len(ids)
        if cursor % kept:  # within an epoch the next example starts the next sample only if it did not fit
            assert used + min(int(data.doc_lengths[ds.doc_idx[cursor]]), SEQ + 1) > SEQ + 1
    epochs = np.array(seen[: kept * (len(seen) // kept)]).reshape(-1, kept)
    assert all(sorted(e) == sorted(set(seen)) for e in epochs)  # every example once per epoch
    assert ds.skipped == sum(not docs[d][1][: SEQ + 1].any() for d in range(320))


def test_without_packing_one_padded_example_per_sample(chat, tmp_path):
    prefix, docs = chat
    ds = ChatDataset(IndexedTokens(prefix), 10, 300, seq_length=SEQ, seed=0, num_samples=700, packing=False,
                     pad_id=7, cache_dir=str(tmp_path))  # fmt: skip
    assert len(ds) == 3 * 290 and ds.truncated == 0
    for i in range(0, len(ds), 7):
        item = ds[i]
        d = doc_of(item["tokens"][0])
        n = len(docs[d][0])
        assert 10 <= d < 300 and (item["segments"][:n] == 0).all() and (item["segments"][n:] == -1).all()
        assert (item["tokens"][n:] == 7).all() and not item["loss_mask"][n:].any()
        np.testing.assert_array_equal(item["loss_mask"][1:n], docs[d][1][1:])
    assert sorted(doc_of(ds[i]["tokens"][0]) for i in range(290)) == list(range(10, 300))


def test_order_is_resumable_and_extends(chat, tmp_path):
    prefix, _ = chat
    data = IndexedTokens(prefix)

    def make(n, cache):
        return ChatDataset(data, 0, 320, seq_length=SEQ, seed=5, num_samples=n, packing=True,
                           cache_dir=str(tmp_path / cache))  # fmt: skip

    a, b, small = make(300, "a"), make(300, "b"), make(100, "c")  # b rebuilt elsewhere; small: fewer samples
    for i in range(0, 100):
        for k in ("tokens", "loss_mask", "segments"):
            assert np.array_equal(a[i][k], b[i][k]) and np.array_equal(a[i][k], small[i][k])
    kw = dict(global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    whole = list(itertools.islice(micro_batch_samples(a, consumed_samples=0, **kw), 20))
    resumed = list(itertools.islice(micro_batch_samples(b, consumed_samples=8 * 6, **kw), 8))
    for x, y in zip(whole[12:], resumed):
        assert all(np.array_equal(p["tokens"], q["tokens"]) for p, q in zip(x, y))
    other = ChatDataset(
        data, 0, 320, seq_length=SEQ, seed=6, num_samples=300, packing=True, cache_dir=str(tmp_path)
    )
    assert not all(np.array_equal(a[i]["tokens"], other[i]["tokens"]) for i in range(5))


def synthetic_preference(tmp_path, groups=40, seed=0):
    """Group g: K in 2..4 answers (docs), all K(K-1)/2 pairs of a random ranking; doc tokens name the doc."""
    rng = np.random.default_rng(seed)
    docs, pairs, d, want = [], [], 0, []
    for g in range(groups):
        k = int(rng.integers(2, 5))
        for j in range(k):
            length = int(rng.integers(5, 30)) if not (g == 7 and j == 1) else 90  # one answer far too long
            mask = np.zeros(length, np.uint8)
            mask[length // 2 if length < 60 else 70 :] = 1
            docs.append((1 + (d + j) * STRIDE + np.arange(length), mask))
        order = [int(x) for x in rng.permutation(k)]
        rows = [(d + order[a], d + order[b], g) for a in range(k) for b in range(a + 1, k)]
        pairs += rows
        want.append([(r[0] - d, r[1] - d) for r in rows])
        d += k
    return write(tmp_path / "p", docs, fmt="preference", pairs=np.array(pairs)), docs, want


def test_preference_groups_are_whole_and_pairs_expand(tmp_path):
    prefix, docs, want = synthetic_preference(tmp_path)
    data = IndexedTokens(prefix)
    assert data.num_groups == 40 and len(data.pairs) == sum(len(w) for w in want)
    ds = PreferenceDataset(data, 0, 40, seq_length=SEQ, seed=1, num_samples=100, cache_dir=str(tmp_path))
    assert ds.skipped == 1 and ds.truncated == 1 and len(ds) == 3 * 39  # group 7 loses its answer
    epoch = []
    for i in range(len(ds)):
        item = ds[i]
        first = [doc_of(s[0]) for s in item["sequences"]]
        g = int(np.searchsorted(data.group_docs, first[0], side="right")) - 1
        assert first == list(range(int(data.group_docs[g]), int(data.group_docs[g + 1])))  # the whole group
        k = len(first)
        assert item["pairs"].dtype == np.int64 and item["pairs"].shape == (k * (k - 1) // 2, 2)
        assert [tuple(p) for p in item["pairs"].tolist()] == want[g]
        for s, m, d in zip(item["sequences"], item["loss_masks"], first):
            assert s.dtype == np.int64 and m.dtype == np.uint8 and len(s) == len(m) <= SEQ + 1
            np.testing.assert_array_equal(m[1:], docs[d][1][1 : len(m)])
        epoch.append(g)
    assert all(sorted(epoch[e * 39 : (e + 1) * 39]) == [g for g in range(40) if g != 7] for e in range(3))
    again = PreferenceDataset(
        data, 0, 40, seq_length=SEQ, seed=1, num_samples=100, cache_dir=str(tmp_path / "x")
    )
    assert np.array_equal(again.groups, ds.groups)


def test_build_example_datasets_splits_blends_and_refuses(chat, tmp_path):
    prefix, _ = chat
    other = write(tmp_path / "o", synthetic_chat(50, seed=9, first=1000))
    ds = build_example_datasets(kind="chat", train_paths=[prefix, other], train_weights=None, valid_paths=[],
                                test_paths=[], split="8,2", seq_length=SEQ, seed=1,
                                num_samples={"train": 200, "valid": 20}, packing=True, cache_dir=str(tmp_path),
                                tokenizer="synthetic")  # fmt: skip
    assert ds["test"] is None and len(ds["train"]) == 200
    train_docs = {doc_of(ds["train"][i]["tokens"][0]) for i in range(200)}
    valid_docs = {doc_of(ds["valid"][i]["tokens"][0]) for i in range(20)}
    assert train_docs.isdisjoint(valid_docs) and any(d >= 1000 for d in train_docs)
    pref, _, _ = synthetic_preference(tmp_path)
    p = build_example_datasets(kind="preference", train_paths=[pref], train_weights=None, valid_paths=[],
                               test_paths=[], split="3,1", seq_length=SEQ, seed=1, num_samples={"train": 10, "valid": 4},
                               cache_dir=str(tmp_path))  # fmt: skip
    assert (p["train"].groups < 30).all() and (p["valid"].groups >= 30).all()  # split by groups
    common = dict(train_weights=None, valid_paths=[], test_paths=[], split="1", seq_length=SEQ, seed=1,
                  num_samples={"train": 4}, cache_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(
        DataError, match=r"c: a chat file, but this objective reads preference data; .*--format preference"
    ):
        build_example_datasets(kind="preference", train_paths=[prefix], **common)
    with pytest.raises(DataError, match="tokenized with 'synthetic' but the run uses 'gpt2'"):
        build_example_datasets(kind="chat", train_paths=[prefix], tokenizer="gpt2", **common)
    third = write(tmp_path / "t", synthetic_chat(5), template={"name": "plain", "source": "y"})
    with pytest.raises(DataError, match="different chat templates .*same --chat-template"):
        build_example_datasets(kind="chat", train_paths=[prefix, third], **common)
    text = tmp_path / "text"
    with IndexedTokensWriter(text, vocab_size=SYN_VOCAB, tokenizer="synthetic") as w:
        w.add_doc([1, 2, 3])
    with pytest.raises(DataError, match="a text file, but this objective reads chat data; .*--format chat"):
        build_example_datasets(kind="chat", train_paths=[str(text)], **common)


def test_mask_and_pairs_files_round_trip_and_are_checked(tmp_path):
    long_template = {
        "name": "jinja:abc",
        "source": "{# " + "x" * 9000 + " #}",
    }  # the .idx header grows past 4 KiB
    docs = synthetic_chat(6)
    prefix = write(tmp_path / "p", docs, fmt="preference", pairs=np.array([[0, 1, 0], [3, 2, 1], [5, 4, 2]]),
                   template=long_template)  # fmt: skip
    r = IndexedTokens(prefix)
    assert r.chat_template == long_template and r.num_groups == 3 and r.group_docs.tolist() == [0, 2, 4, 6]
    assert all(np.array_equal(r.doc_mask(i), docs[i][1]) for i in range(6))
    for bad in ([[0, 1, 0], [2, 3, 2]], [[0, 1, 1]], [[0, 2, 0], [1, 3, 1]], [[0, 0, 0]], [[0, 9, 0]]):
        write(tmp_path / "b", synthetic_chat(4), fmt="preference", pairs=np.array(bad))
        with pytest.raises(DataError, match=r"b\.pairs: comparisons are corrupt"):
            IndexedTokens(tmp_path / "b")
    old = tmp_path / "old"
    with IndexedTokensWriter(
        old, vocab_size=100, tokenizer="t", eod_id=0
    ) as w:  # a pretraining file: no mask
        w.add_doc([1, 2, 3])
    r = IndexedTokens(old)
    assert (r.format, r.has_mask, r.pairs, r.num_groups) == ("text", False, None, 0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("old")) == ["old.bin", "old.idx"]
    with pytest.raises(DataError, match="a text file without loss masks"):
        r.doc_mask(0)
