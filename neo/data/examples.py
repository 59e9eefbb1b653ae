"""Datasets of whole examples, for instruction tuning and preference learning (``--format chat`` /
``--format preference`` files, see records.py and indexed.py).

``ChatDataset``: one item is one training sample of seq_length + 1 tokens,

    {"tokens": int64[S+1], "loss_mask": uint8[S+1], "segments": int32[S+1]}

``loss_mask[i] == 1`` means token i is a label the model learns to predict from the tokens before it in the
same segment (the first token of an example never is). Without packing a sample holds one example, padded
with ``pad_id`` (segment -1, mask 0). With packing a sample holds several whole examples, segments 0, 1, 2...
and -1 on the padding after them: examples are taken in the shuffled order and each goes into the current
sample if it fits in the tokens left, else it starts the next one (no look-ahead, so the order is kept and
an example is never split). ``segment_positions`` gives the position of each token within its example.

``PreferenceDataset``: one item is one prompt's group (never split),

    {"sequences": [int64[L_k], ...], "loss_masks": [uint8[L_k], ...], "pairs": int64[P, 2]}

one sequence per answer (the prompt + that answer, L_k <= seq_length + 1), and the comparisons as indices into
``sequences``, the preferred one first (a ranking of K answers: K(K-1)/2 rows).

Order: each epoch is a permutation of the examples (or groups) drawn from the generator (seed, epoch); the
samples of epoch e are packed from epoch e's examples only, so the order for more samples extends the order
for fewer. Everything is a pure function of (data, range, seq_length, seed, num_samples, packing), so item i
is the same on every rank and after every restart: resuming is starting at sample ``consumed_samples`` of
``micro_batch_samples``. The index arrays are cached as .npy files like ``GPTDataset``'s.

An example longer than seq_length + 1 tokens (data preprocessed with a larger --seq-length) is cut to its
first seq_length + 1 tokens here, as ``--long-records truncate`` does; one left without any answer token is
skipped (a preference group with such an answer is skipped whole). ``truncated`` and ``skipped`` count them.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from .dataset import SPLITS, BlendedDataset, _key, blend_index, cached_arrays, split_ranges
from .indexed import DataError, IndexedTokens
from .tokenizer import same_tokenizer


def _cut_examples(data: IndexedTokens, docs: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths cut to ``limit``, whether each of ``docs`` keeps an answer token after the cut)."""
    lengths = np.minimum(data.doc_lengths[docs], limit)
    keep = np.ones(len(docs), bool)
    for k in np.flatnonzero(data.doc_lengths[docs] > limit):
        keep[k] = bool(np.any(data.doc_mask(int(docs[k]))[:limit]))
    return lengths, keep


def _pack(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Where each sample starts in a sequence of examples, filled greedily in order: [0, ..., len]."""
    starts, used = [0], 0
    for k, n in enumerate(lengths.tolist()):
        if used + n > capacity:
            starts.append(k)
            used = 0
        used += n
    return np.array([*starts, len(lengths)], np.int64)


def _chat_index(lengths: np.ndarray, capacity: int, seed: int, num_samples: int, packing: bool) -> dict:
    """doc_idx: examples in sample order (positions into ``lengths``); starts[i]..starts[i+1]: sample i's."""
    docs, starts, total = [], [np.zeros(1, np.int64)], 0
    for epoch in itertools.count():
        perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
        bounds = _pack(lengths[perm], capacity) if packing else np.arange(len(perm) + 1, dtype=np.int64)
        docs.append(perm)
        starts.append(bounds[1:] + total)
        total += len(perm)
        if sum(len(s) for s in starts) - 1 >= num_samples:
            break
    return {"doc_idx": np.concatenate(docs).astype(np.int64), "starts": np.concatenate(starts)}


def segment_positions(segments: np.ndarray) -> np.ndarray:
    """Each token's position within its example (0 at every segment start; padding counts on from 0 too)."""
    segments = np.asarray(segments)
    idx = np.arange(len(segments))
    new = np.ones(len(segments), bool)
    new[1:] = segments[1:] != segments[:-1]
    return idx - np.maximum.accumulate(np.where(new, idx, 0))


def _cache_root(data: IndexedTokens, cache_dir: str | None) -> Path:
    return Path(cache_dir) if cache_dir else Path(f"{data.prefix}.cache")


class ChatDataset(torch.utils.data.Dataset):
    """Samples of whole chat examples from documents [lo, hi) of a chat file; len >= num_samples."""

    def __init__(self, data: IndexedTokens, lo: int, hi: int, *, seq_length: int, seed: int, num_samples: int,
                 packing: bool, pad_id: int | None = None, cache_dir: str | None = None, split: str = "train"):  # fmt: skip
        _need_format(data, "chat")
        self.data, self.lo, self.seq_length, self.packing = data, lo, seq_length, packing
        self.pad_id = data.eod_id if pad_id is None else int(pad_id)
        docs = np.arange(lo, hi)
        lengths, keep = _cut_examples(data, docs, seq_length + 1)
        self.truncated, self.skipped = (
            int(np.sum(data.doc_lengths[docs] > seq_length + 1)),
            int(np.sum(~keep)),
        )
        if not keep.any():
            raise DataError(f"{data.prefix}: the {split} split (documents {lo}..{hi}) has no example with an "
                            "answer token; use more data, another split or a longer seq_length")  # fmt: skip
        kept = np.flatnonzero(keep)
        key = _key(kind="chat", run=data.meta["run_id"], lo=lo, hi=hi, seq=seq_length, seed=seed, n=num_samples,
                   packing=packing)  # fmt: skip
        index = cached_arrays(
            _cache_root(data, cache_dir) / f"{Path(data.prefix).name}-{split}-chat-{key}",
            lambda: _chat_index(lengths[kept], seq_length + 1, seed, num_samples, packing),
        )
        self.doc_idx = kept[np.asarray(index["doc_idx"])] + lo  # absolute document numbers
        self.starts = index["starts"]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        size = self.seq_length + 1
        tokens = np.full(size, self.pad_id, np.int64)
        mask = np.zeros(size, np.uint8)
        segments = np.full(size, -1, np.int32)
        pos = 0
        for k, d in enumerate(self.doc_idx[int(self.starts[i]) : int(self.starts[i + 1])]):
            doc = self.data.doc(int(d))[:size]
            n = len(doc)
            tokens[pos : pos + n] = doc
            mask[pos : pos + n] = self.data.doc_mask(int(d))[:n]
            mask[pos] = 0  # the first token of an example has nothing before it in its segment
            segments[pos : pos + n] = k
            pos += n
        return {"tokens": tokens, "loss_mask": mask, "segments": segments}


def _group_index(num_groups: int, seed: int, num_samples: int) -> dict:
    epochs = max(1, -(-num_samples // max(num_groups, 1)))
    order = [np.random.default_rng([seed, e]).permutation(num_groups) for e in range(epochs)]
    return {"order": np.concatenate(order).astype(np.int64)}


class PreferenceDataset(torch.utils.data.Dataset):
    """One prompt's answers and comparisons per item, from groups [lo, hi) of a preference file."""

    def __init__(self, data: IndexedTokens, lo: int, hi: int, *, seq_length: int, seed: int, num_samples: int,
                 cache_dir: str | None = None, split: str = "train"):  # fmt: skip
        _need_format(data, "preference")
        self.data, self.seq_length = data, seq_length
        docs = np.arange(int(data.group_docs[lo]), int(data.group_docs[hi]))
        _, keep_doc = _cut_examples(data, docs, seq_length + 1)
        self.truncated = int(np.sum(data.doc_lengths[docs] > seq_length + 1))
        bad_groups = set(np.searchsorted(data.group_docs, docs[~keep_doc], side="right") - 1)
        kept = np.array([g for g in range(lo, hi) if g not in bad_groups], np.int64)
        self.skipped = (hi - lo) - len(kept)
        if not len(kept):
            raise DataError(f"{data.prefix}: the {split} split (groups {lo}..{hi}) has no usable comparison; use "
                            "more data, another split or a longer seq_length")  # fmt: skip
        key = _key(kind="preference", run=data.meta["run_id"], lo=lo, hi=hi, seq=seq_length, seed=seed,
                   n=num_samples)  # fmt: skip
        index = cached_arrays(
            _cache_root(data, cache_dir) / f"{Path(data.prefix).name}-{split}-pref-{key}",
            lambda: _group_index(len(kept), seed, num_samples),
        )
        self.groups = kept[np.asarray(index["order"])]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        g = int(self.groups[i])
        d0, d1 = int(self.data.group_docs[g]), int(self.data.group_docs[g + 1])
        size = self.seq_length + 1
        sequences, masks = [], []
        for d in range(d0, d1):
            sequences.append(np.array(self.data.doc(d)[:size], np.int64))
            m = np.array(self.data.doc_mask(d)[:size], np.uint8)
            m[0] = 0
            masks.append(m)
        rows = self.data.pairs[int(self.data.group_pairs[g]) : int(self.data.group_pairs[g + 1]), :2]
        return {"sequences": sequences, "loss_masks": masks, "pairs": np.array(rows, np.int64) - d0}


def _need_format(data: IndexedTokens, kind: str) -> None:
    if data.format != kind:
        flag = {"chat": "--format chat", "preference": "--format preference"}[kind]
        raise DataError(f"{data.prefix}: a {data.format} file, but this objective reads {kind} data; preprocess "
                        f"the records with {flag}")  # fmt: skip


def data_template(readers: list[IndexedTokens]) -> dict | None:
    """The chat template the files were rendered with (``ChatTemplate.to_dict()``); they must share one, since
    a model learns one way of marking turns."""
    found = {r.prefix: r.chat_template for r in readers}
    sources = {(t or {}).get("source") for t in found.values()}
    if len(sources) > 1:
        names = ", ".join(f"{p}: {(t or {}).get('name')}" for p, t in found.items())
        raise DataError(f"data files rendered with different chat templates ({names}); preprocess them all with "
                        "the same --chat-template")  # fmt: skip
    return next(iter(found.values()), None)


def _check_readers(readers: dict[str, IndexedTokens], kind: str, tokenizer: str | None) -> None:
    names = {r.tokenizer for r in readers.values()}
    if len(names) > 1:
        raise DataError(f"data files were made with different tokenizers ({', '.join(sorted(names))}); "
                        "preprocess them all with the same --tokenizer")  # fmt: skip
    if tokenizer is not None and not all(same_tokenizer(n, tokenizer) for n in names):
        raise DataError(f"the data was tokenized with {names.pop()!r} but the run uses {tokenizer!r}; preprocess "
                        "again with --tokenizer matching data.tokenizer (or change data.tokenizer)")  # fmt: skip
    for r in readers.values():
        _need_format(r, kind)
    data_template(list(readers.values()))


def build_example_datasets(*, kind: str, train_paths: list[str], train_weights: list[float] | None,
                           valid_paths: list[str], test_paths: list[str], split: str, seq_length: int, seed: int,
                           num_samples: dict[str, int], packing: bool = False, pad_id: int | None = None,
                           cache_dir: str | None = None, tokenizer: str | None = None
                           ) -> dict[str, torch.utils.data.Dataset | None]:  # fmt: skip
    """Datasets for 'train', 'valid', 'test' (None where a split has no data or no samples are asked for), as
    ``build_datasets`` makes them: ``kind`` "chat" (ChatDataset; ``packing``, ``pad_id``) or "preference"
    (PreferenceDataset). With no valid/test paths each train file is split by ``split``: chat files by
    documents, preference files by groups (prompts). Several paths are blended: train by ``train_weights``
    (default: by size), valid/test by size; size is tokens for chat, groups for preference."""
    if kind not in ("chat", "preference"):
        raise ValueError(f"kind {kind!r}: chat or preference")
    if not train_paths:
        raise DataError("no train data paths given")
    readers = {p: IndexedTokens(p) for p in [*train_paths, *valid_paths, *test_paths]}
    _check_readers(readers, kind, tokenizer)
    units = {p: len(r) if kind == "chat" else r.num_groups for p, r in readers.items()}
    if valid_paths or test_paths:
        parts = {
            s: [(p, 0, units[p]) for p in paths]
            for s, paths in zip(SPLITS, (train_paths, valid_paths, test_paths))
        }
    else:
        ranges = {p: split_ranges(split, units[p]) for p in train_paths}
        parts = {s: [(p, *ranges[p][s]) for p in train_paths] for s in SPLITS}

    def make(p: str, lo: int, hi: int, n: int, s: str, seed_: int):
        if kind == "chat":
            return ChatDataset(readers[p], lo, hi, seq_length=seq_length, seed=seed_, num_samples=n, packing=packing,
                               pad_id=pad_id, cache_dir=cache_dir, split=s)  # fmt: skip
        return PreferenceDataset(readers[p], lo, hi, seq_length=seq_length, seed=seed_, num_samples=n,
                                 cache_dir=cache_dir, split=s)  # fmt: skip

    def size(p: str, lo: int, hi: int) -> int:
        r = readers[p]
        return int(r.offsets[hi] - r.offsets[lo]) if kind == "chat" else hi - lo

    out: dict[str, torch.utils.data.Dataset | None] = {}
    for s in SPLITS:
        n = int(num_samples.get(s, 0))
        weights = (
            list(train_weights)
            if s == "train" and train_weights is not None
            else [size(*q) for q in parts[s]]
        )
        live = [(q, w) for q, w in zip(parts[s], weights) if w > 0 and q[2] > q[1]]
        if n <= 0 or not live:
            out[s] = None
        elif len(live) == 1:
            out[s] = make(*live[0][0], n, s, seed)
        else:
            out[s] = _blend(live, n, s, seed, readers, cache_dir, seq_length, kind, make)
    return out


def _blend(live: list, n: int, s: str, seed: int, readers: dict, cache_dir: str | None, seq_length: int,
           kind: str, make) -> BlendedDataset:  # fmt: skip
    """Several parts interleaved by weight (dataset.blend_index); part i draws with seed + i."""
    key = _key(kind=kind, parts=[(readers[p].meta["run_id"], lo, hi) for (p, lo, hi), _ in live],
               w=[w for _, w in live], n=n, seq=seq_length, seed=seed)  # fmt: skip
    blend = cached_arrays(
        _cache_root(readers[live[0][0][0]], cache_dir) / f"blend-{kind}-{s}-{key}",
        lambda: dict(zip(("which", "nth"), blend_index([w for _, w in live], n))),
    )
    counts = np.bincount(blend["which"], minlength=len(live))
    datasets = [make(p, lo, hi, int(c), s, seed + i) if c else None
                for i, (((p, lo, hi), _), c) in enumerate(zip(live, counts))]  # fmt: skip
    return BlendedDataset(datasets, blend["which"], blend["nth"])
