"""The on-disk token format: `<prefix>.bin` (token ids) + `<prefix>.idx` (document boundaries).

.bin  = 32-byte header (magic b"NEOBIN\\0\\0", version u32, pad, 16-byte run id, pad) + the tokens of
        all documents back to back, little-endian uint16 (vocab <= 65536) or uint32.
.idx  = 4096-byte header (magic b"NEOIDX\\0\\0", version u32, JSON length u32, JSON: dtype, num_docs,
        num_tokens, run id, tokenizer, eod_id, vocab_size) + uint64 offsets[num_docs + 1].

Why this shape: the run id ties a .idx to the .bin written with it, so a pair from different runs is
refused; the reader checks every size against the header, so a truncated file is refused instead of
being read as garbage tokens. The writer streams both files under temporary names (constant memory,
the header is filled in last) and renames .bin first and .idx last: a run killed at any point never
leaves a pair that opens.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import numpy as np

from neo.errors import DataError  # noqa: F401 - re-exported: part of this module's API

VERSION = 1
IDX_MAGIC, BIN_MAGIC = b"NEOIDX\x00\x00", b"NEOBIN\x00\x00"
IDX_HEADER, BIN_HEADER = 4096, 32
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _bin_header(run_id: bytes) -> bytes:
    return struct.pack("<8sI4x16s", BIN_MAGIC, VERSION, run_id).ljust(BIN_HEADER, b"\0")


class IndexedTokensWriter:
    """Streams documents into `<prefix>.bin.tmp` / `<prefix>.idx.tmp`; `close()` publishes the pair.

    Use as a context manager: on an exception the temporary files are removed and nothing is published.
    """

    def __init__(self, prefix: str | os.PathLike, *, vocab_size: int, tokenizer: str = "", eod_id: int = -1):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype_for(vocab_size)
        self.meta = {"tokenizer": tokenizer, "eod_id": eod_id, "vocab_size": vocab_size}
        self.run_id = uuid.uuid4().bytes
        self.num_docs = self.num_tokens = 0
        self.bin_path, self.idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        self._bin_tmp, self._idx_tmp = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.idx.tmp")
        # An older pair under this prefix is removed now, not at the end: if this run dies, nothing
        # complete-looking (and no stale data) remains under the name.
        for p in (self.idx_path, self.bin_path):
            p.unlink(missing_ok=True)
        self._bin = open(self._bin_tmp, "wb")
        self._idx = open(self._idx_tmp, "wb")
        self._bin.write(_bin_header(self.run_id))
        self._idx.write(b"\0" * IDX_HEADER)
        self._idx.write(np.zeros(1, np.uint64).tobytes())

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation, `lengths` their sizes (EOD included)."""
        tokens = np.asarray(tokens)
        if len(tokens) and int(tokens.max()) >= self.meta["vocab_size"]:
            raise DataError(f"token id {int(tokens.max())} >= vocab_size {self.meta['vocab_size']}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        ends = self.num_tokens + np.cumsum(lengths, dtype=np.uint64)
        self._idx.write(ends.astype(np.uint64).tobytes())
        self.num_docs += len(lengths)
        self.num_tokens += int(np.sum(lengths, dtype=np.int64))
        if self.num_tokens != (self._bin.tell() - BIN_HEADER) // self.dtype.itemsize:
            raise ValueError("lengths do not add up to the tokens given")

    def add_doc(self, ids) -> None:
        self.add(np.asarray(ids, dtype=np.int64), np.array([len(ids)]))

    def close(self) -> None:
        header = {
            "dtype": self.dtype.name,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "run_id": self.run_id.hex(),
            **self.meta,
        }
        blob = json.dumps(header).encode()
        if len(blob) > IDX_HEADER - 16:
            raise DataError(f"tokenizer name too long for the .idx header: {self.meta['tokenizer'][:80]}...")
        self._idx.seek(0)
        self._idx.write(struct.pack("<8sII", IDX_MAGIC, VERSION, len(blob)) + blob)
        for f in (self._bin, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        for f, p in ((self._bin, self._bin_tmp), (self._idx, self._idx_tmp)):
            f.close()
            p.unlink(missing_ok=True)

    def __enter__(self) -> IndexedTokensWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.close()


class IndexedTokens:
    """Read-only, memory-mapped view of a `<prefix>.bin`/`.idx` pair; validates it before any read.

    len() = number of documents; doc(i) = that document's tokens (a numpy view, EOD included).
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise DataError(
                    f"{p}: no such file; run `python launch/preprocess.py ... --output {prefix}` first"
                )
        meta = self._read_idx_header(idx_path)
        self.meta = meta
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self.num_docs, self.num_tokens = int(meta["num_docs"]), int(meta["num_tokens"])
        self.tokenizer, self.eod_id, self.vocab_size = meta["tokenizer"], meta["eod_id"], meta["vocab_size"]
        want = IDX_HEADER + 8 * (self.num_docs + 1)
        if idx_path.stat().st_size != want:
            raise DataError(
                f"{idx_path}: truncated or corrupt ({idx_path.stat().st_size} bytes, header says {want}); "
                "re-run preprocessing"
            )
        self.offsets = np.memmap(idx_path, np.uint64, "r", IDX_HEADER, (self.num_docs + 1,))
        if (
            self.offsets[0] != 0
            or self.offsets[-1] != self.num_tokens
            or np.any(np.diff(self.offsets) > 1 << 62)
        ):
            raise DataError(f"{idx_path}: document offsets are corrupt; re-run preprocessing")
        self._check_bin(bin_path, meta["run_id"])
        self.tokens = (
            np.memmap(bin_path, self.dtype, "r", BIN_HEADER, (self.num_tokens,))
            if self.num_tokens
            else np.zeros(0, self.dtype)
        )

    @staticmethod
    def _read_idx_header(path: Path) -> dict:
        with open(path, "rb") as f:
            head = f.read(IDX_HEADER)
        if len(head) < 16:
            raise DataError(f"{path}: truncated ({len(head)} bytes); re-run preprocessing")
        magic, version, n = struct.unpack_from("<8sII", head)
        if magic != IDX_MAGIC:
            hint = (
                " (a Megatron/GPT-NeoX index: re-run neo's preprocessing)"
                if magic.startswith(b"MMIDIDX")
                else ""
            )
            raise DataError(f"{path}: not a neo .idx file{hint}")
        if version != VERSION:
            raise DataError(
                f"{path}: format version {version}, this neo reads version {VERSION}; "
                "re-run preprocessing with this version of neo"
            )
        try:
            meta = json.loads(head[16 : 16 + n])
            sane = meta["dtype"] in DTYPES and int(meta["num_docs"]) >= 0 and int(meta["num_tokens"]) >= 0
        except (ValueError, KeyError, TypeError) as e:  # any parse failure is the same problem for the user
            raise DataError(f"{path}: corrupt header ({e!r}); re-run preprocessing") from None
        if not sane:
            raise DataError(f"{path}: corrupt header (dtype {meta['dtype']!r}, {meta['num_docs']} documents, "
                            f"{meta['num_tokens']} tokens); re-run preprocessing")  # fmt: skip
        return meta

    def _check_bin(self, path: Path, run_id: str) -> None:
        with open(path, "rb") as f:
            head = f.read(BIN_HEADER)
        if len(head) < BIN_HEADER or head[:8] != BIN_MAGIC:
            raise DataError(f"{path}: not a neo .bin file (or truncated); re-run preprocessing")
        version, rid = struct.unpack_from("<I4x16s", head, 8)
        if version != VERSION:
            raise DataError(
                f"{path}: format version {version}, this neo reads version {VERSION}; re-run preprocessing"
            )
        if rid.hex() != run_id:
            raise DataError(
                f"{path} and {self.prefix}.idx come from different preprocessing runs (mismatched pair); "
                "re-run preprocessing to write both"
            )
        want = BIN_HEADER + self.num_tokens * self.dtype.itemsize
        if (size := path.stat().st_size) != want:
            raise DataError(
                f"{path}: {size} bytes but its .idx describes {want} (truncated or corrupt); "
                "re-run preprocessing"
            )

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"IndexedTokens({self.prefix!r}: {self.num_docs} docs, {self.num_tokens} tokens, {self.dtype.name}, "
            f"tokenizer={self.tokenizer!r})"
        )
