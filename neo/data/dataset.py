"""Training datasets over `.bin`/`.idx` token files: packed samples, splits, blending, resumable order.

A dataset is a stream of documents (in a shuffled order, reshuffled every epoch) cut into samples
of `seq_length + 1` tokens; consecutive samples share one token, so that every token is a label
once. Samples are visited in a seeded random order, one epoch after the other. Everything is a pure
function of (data, split, seq_length, seed, num_samples), so sample i is the same on every rank and
after every restart: resuming is just starting at sample `consumed_samples`.

The index arrays are built once, by one process, and cached as .npy files beside the data (or in
`cache_dir`); other processes wait (torch.distributed barrier, or a file lock) and memory-map them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .indexed import DataError, IndexedTokens
from .splits import parse_split
from .tokenizer import same_tokenizer

INDEX_VERSION = 1
SPLITS = ("train", "valid", "test")


# ------------------------------------------------------------------------------- cached indices


def _dist():
    """torch.distributed when a process group is up, else None (imported lazily: it is slow to import)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def cached_arrays(folder: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from `folder`, building them first if needed, safely under many processes.

    Under torch.distributed the local rank 0 of each node builds and everyone meets at a barrier; a
    file lock and an atomic directory rename keep builders on a shared filesystem from colliding.
    """
    dist = _dist()
    builder = dist is None or int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0
    if builder and not folder.is_dir():
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            lock = open(folder.parent / ".lock", "a")
        except OSError as e:
            raise DataError(
                f"cannot write the index cache in {folder.parent} ({e.strerror}); "
                "set cache_dir to a writable directory"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not folder.is_dir():
                tmp = folder.parent / f"{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
                tmp.mkdir()
                try:
                    for name, arr in build().items():
                        np.save(tmp / f"{name}.npy", arr)
                    os.rename(tmp, folder)
                except OSError:
                    if not folder.is_dir():
                        raise
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    if not folder.is_dir():
        raise DataError(
            f"{folder}: index cache missing after the build barrier; is cache_dir on a filesystem "
            "that all ranks of this node see?"
        )
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}


def _key(**fields) -> str:
    return hashlib.sha256(json.dumps({"v": INDEX_VERSION, **fields}, sort_keys=True).encode()).hexdigest()[
        :16
    ]


# ------------------------------------------------------------------------------------- datasets


def _sample_index(lengths: np.ndarray, seq_length: int, seed: int, num_samples: int) -> dict[str, np.ndarray]:
    """doc_idx: documents in stream order (each epoch a new permutation); starts: stream position of
    each of them; order: sample ids, shuffled within each epoch so epochs are visited one by one.

    Epoch e draws from its own generator (seed, e) and always holds the samples that start in it, so
    the order for more samples extends the order for fewer: a run whose iterations are raised on
    resume continues the same sequence. The stream holds one epoch more than the samples need, for the
    last sample's tail, which runs into the next epoch."""
    total = int(lengths.sum())
    epochs = max(1, -(-num_samples * seq_length // total))
    rngs = [np.random.default_rng([seed, e]) for e in range(epochs + 1)]
    doc_idx = np.concatenate([rng.permutation(len(lengths)) for rng in rngs])
    starts = np.zeros(len(doc_idx) + 1, np.int64)
    np.cumsum(lengths[doc_idx], out=starts[1:])
    # sample j starts at token j*seq_length and belongs to the epoch in which it starts
    bounds = -(-np.arange(epochs + 1, dtype=np.int64) * total // seq_length)
    order = np.concatenate([a + rng.permutation(b - a) for rng, a, b in zip(rngs, bounds[:-1], bounds[1:])])
    return {"doc_idx": doc_idx.astype(np.int64), "starts": starts, "order": order.astype(np.int64)}


class GPTDataset(torch.utils.data.Dataset):
    """Samples of seq_length + 1 tokens from documents [lo, hi) of one token file; len >= num_samples."""

    def __init__(
        self,
        data: IndexedTokens,
        lo: int,
        hi: int,
        *,
        seq_length: int,
        seed: int,
        num_samples: int,
        cache_dir: str | None = None,
        split: str = "train",
    ):
        self.data, self.lo, self.seq_length = data, lo, seq_length
        lengths = data.doc_lengths[lo:hi]
        if int(lengths.sum()) < seq_length + 1:
            raise DataError(
                f"{data.prefix}: the {split} split (documents {lo}..{hi}) has {int(lengths.sum())} tokens, "
                f"fewer than one sample of {seq_length + 1}; use more data, another split or shorter seq_length"
            )
        root = Path(cache_dir) if cache_dir else Path(f"{data.prefix}.cache")
        key = _key(run=data.meta["run_id"], lo=lo, hi=hi, seq=seq_length, seed=seed, n=num_samples)
        self.index = cached_arrays(
            root / f"{Path(data.prefix).name}-{split}-{key}",
            lambda: _sample_index(lengths, seq_length, seed, num_samples),
        )
        self.doc_idx, self.starts, self.order = (
            self.index["doc_idx"],
            self.index["starts"],
            self.index["order"],
        )

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> np.ndarray:
        pos = int(self.order[i]) * self.seq_length
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        off, out, filled = pos - int(self.starts[k]), np.empty(self.seq_length + 1, np.int64), 0
        while filled < len(out):
            piece = self.data.doc(self.lo + int(self.doc_idx[k]))[off : off + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled, k, off = filled + len(piece), k + 1, 0
        return out


def blend_index(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Which dataset (and which of its samples) serves each blended sample.

    Dataset i's k-th sample is due at time (k + 0.5) / w_i; taking samples in order of due time keeps
    every prefix of the blend within about one sample of the weights. Vectorised, deterministic.
    """
    w = np.asarray(weights, np.float64) / np.sum(weights)
    due, src, nth = [], [], []
    for i, wi in enumerate(w):
        if wi > 0:
            k = np.arange(int(np.ceil(wi * num_samples)) + 2)
            due.append((k + 0.5) / wi)
            src.append(np.full(len(k), i, np.int16))
            nth.append(k)
    pick = np.argsort(np.concatenate(due), kind="stable")[:num_samples]
    return np.concatenate(src)[pick], np.concatenate(nth)[pick]


class BlendedDataset(torch.utils.data.Dataset):
    """Interleaves datasets by weight; sample i is `datasets[which[i]][nth[i]]`."""

    def __init__(self, datasets: list, which: np.ndarray, nth: np.ndarray):
        self.datasets, self.which, self.nth = datasets, which, nth

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.which[i])][int(self.nth[i])]


def split_ranges(split: str, num_docs: int) -> dict[str, tuple[int, int]]:
    """Contiguous document ranges from a ratio like "969,30,1" (missing parts are 0). A part with a
    positive ratio gets at least one document when there are enough."""
    ratios = parse_split(split)
    ratios = np.array(ratios) / sum(ratios)
    counts = np.diff(np.round(np.concatenate([[0], np.cumsum(ratios)]) * num_docs)).astype(int)
    for i in np.flatnonzero((ratios > 0) & (counts == 0)):
        if counts.max() > 1:
            counts[np.argmax(counts)] -= 1
            counts[i] += 1
    ends = np.cumsum(counts)
    return {s: (int(e - c), int(e)) for s, c, e in zip(SPLITS, counts, ends)}


def build_datasets(
    *,
    train_paths: list[str],
    train_weights: list[float] | None,
    valid_paths: list[str],
    test_paths: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: dict[str, int],
    cache_dir: str | None = None,
    tokenizer: str | None = None,
) -> dict[str, torch.utils.data.Dataset | None]:
    """Datasets for 'train', 'valid', 'test' (None where a split has no data or no samples are asked for).

    Paths are prefixes (without .bin/.idx). With no valid/test paths, each train file's documents are
    split by `split`; otherwise train uses all documents of train_paths and valid/test their own paths.
    Several paths are blended: train by `train_weights` (default: by token count), valid/test by token count.
    `tokenizer` (a Tokenizer.name), when given, must be the one the data was preprocessed with.
    """
    if not train_paths:
        raise DataError("no train data paths given")
    readers = {p: IndexedTokens(p) for p in [*train_paths, *valid_paths, *test_paths]}
    _check_tokenizers(readers, tokenizer)
    if valid_paths or test_paths:
        listed = {"train": train_paths, "valid": valid_paths, "test": test_paths}
        parts = {s: [(p, 0, len(readers[p])) for p in listed[s]] for s in SPLITS}
    else:
        ranges = {p: split_ranges(split, len(readers[p])) for p in train_paths}
        parts = {s: [(p, *ranges[p][s]) for p in train_paths] for s in SPLITS}
    out: dict[str, torch.utils.data.Dataset | None] = {}
    for s in SPLITS:
        if s == "train" and train_weights is not None:
            weights = list(train_weights)
        else:
            weights = [int(readers[p].offsets[hi] - readers[p].offsets[lo]) for p, lo, hi in parts[s]]
        live = [(part, w) for part, w in zip(parts[s], weights) if w > 0 and part[2] > part[1]]
        n = int(num_samples.get(s, 0))
        out[s] = _split_dataset(readers, live, s, n, seq_length, seed, cache_dir) if n > 0 and live else None
    return out


def _check_tokenizers(readers: dict[str, IndexedTokens], tokenizer: str | None) -> None:
    """All files from one tokenizer, and that one the run's (when given)."""
    names = {r.tokenizer for r in readers.values()}
    if len(names) > 1:
        raise DataError(
            f"data files were made with different tokenizers ({', '.join(sorted(names))}); "
            "preprocess them all with the same --tokenizer"
        )
    if tokenizer is not None and not all(same_tokenizer(n, tokenizer) for n in names):
        raise DataError(
            f"the data was tokenized with {names.pop()!r} but the run uses {tokenizer!r}; "
            "preprocess again with --tokenizer matching data.tokenizer (or change data.tokenizer)"
        )


def _split_dataset(readers, live, split: str, n: int, seq_length: int, seed: int, cache_dir: str | None):
    """One split's dataset of ``n`` samples: a GPTDataset over its one document range, or a blend over
    several (``live``: ((path, first doc, end doc), weight) pairs); the blend index is cached like the rest."""

    def part_dataset(p: str, lo: int, hi: int, part_seed: int, samples: int) -> GPTDataset:
        return GPTDataset(readers[p], lo, hi, seq_length=seq_length, seed=part_seed, num_samples=samples,
                          cache_dir=cache_dir, split=split)  # fmt: skip

    if len(live) == 1:
        (p, lo, hi), _ = live[0]
        return part_dataset(p, lo, hi, seed, n)
    root = Path(cache_dir) if cache_dir else Path(f"{live[0][0][0]}.cache")
    key = _key(
        parts=[(readers[p].meta["run_id"], lo, hi) for (p, lo, hi), _ in live],
        w=[w for _, w in live],
        n=n,
        seq=seq_length,
        seed=seed,
    )
    blend = cached_arrays(
        root / f"blend-{split}-{key}",
        lambda: dict(zip(("which", "nth"), blend_index([w for _, w in live], n))),
    )
    which, nth = blend["which"], blend["nth"]
    counts = np.bincount(which, minlength=len(live))
    datasets = [
        part_dataset(p, lo, hi, seed + i, int(c)) if c else None
        for i, (((p, lo, hi), _), c) in enumerate(zip(live, counts))
    ]
    return BlendedDataset(datasets, which, nth)


def micro_batch_samples(dataset, *, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[list]:  # fmt: skip
    """Endless micro-batches of samples (lists of ``micro_batch_size`` dataset items) for this data-parallel rank.

    Global batch k covers samples [c, c + G) with c = consumed_samples + k * G; rank r takes the
    contiguous slice [c + r * G / dp, c + (r + 1) * G / dp), in micro-batches, in order. Sample ids
    past len(dataset) wrap around (a run longer than planned sees the data again).
    """
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(f"global_batch_size {global_batch_size} is not a multiple of "
                        f"micro_batch_size {micro_batch_size} x dp_size {dp_size}")  # fmt: skip
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    per_rank, n = global_batch_size // dp_size, len(dataset)
    start = consumed_samples + dp_rank * per_rank
    while True:
        for m in range(0, per_rank, micro_batch_size):
            yield [dataset[i % n] for i in range(start + m, start + m + micro_batch_size)]
        start += global_batch_size


def micro_batches(dataset, **kwargs) -> Iterator[torch.Tensor]:
    """``micro_batch_samples`` of token samples stacked into [micro_batch_size, seq_length + 1] LongTensors."""
    for samples in micro_batch_samples(dataset, **kwargs):
        yield torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
