"""Shared helpers for the data tests: the sample corpus and synthetic token files."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from neo.data.indexed import IndexedTokensWriter

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "austen.jsonl.gz"

# Synthetic token files: token = 1 + doc * STRIDE + position, EOD = 0, so every token names its document.
STRIDE = 10_000
SYN_VOCAB = 1 << 26
EOD = 0


@lru_cache(maxsize=1)
def sample_records() -> tuple[dict, ...]:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def sample_texts() -> list[str]:
    return [r["text"] for r in sample_records()]


def synthetic_docs(
    n_docs: int, seed: int = 0, lo: int = 1, hi: int = 300, first: int = 0
) -> list[np.ndarray]:
    """Documents of random length; doc d = [1 + d*STRIDE, 2 + d*STRIDE, ...] + [EOD]."""
    rng = np.random.default_rng(seed)
    return [
        np.append(1 + d * STRIDE + np.arange(rng.integers(lo, hi)), EOD).astype(np.int64)
        for d in range(first, first + n_docs)
    ]


def write_synthetic(prefix: Path, docs: list[np.ndarray]) -> str:
    with IndexedTokensWriter(prefix, vocab_size=SYN_VOCAB, tokenizer="synthetic", eod_id=EOD) as w:
        for d in docs:
            w.add_doc(d)
    return str(prefix)


def doc_of(token: int) -> int:
    """The document a synthetic token belongs to (-1 for EOD)."""
    return -1 if token == EOD else (int(token) - 1) // STRIDE
