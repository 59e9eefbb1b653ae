"""Reading text files that may be compressed (.gz, .bz2, .xz), the same way in preprocessing and evaluation."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def open_text(path: str):
    """A text stream: UTF-8 with universal newlines, decompressed by the file's extension."""
    opener = OPENERS.get(os.path.splitext(path)[1], open)
    return opener(path, "rt", encoding="utf-8", newline=None)


def strip_compression(path: str) -> str:
    """``path`` without a compression extension (corpus.jsonl.gz -> corpus.jsonl)."""
    for ext in OPENERS:
        path = path.removesuffix(ext)
    return path
