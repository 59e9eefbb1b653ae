"""The on-disk token format: `<prefix>.bin` (token ids) + `<prefix>.idx` (document boundaries), and for
instruction and preference data `<prefix>.mask` (which tokens carry loss) and `<prefix>.pairs` (comparisons).

.bin   = 32-byte header (magic b"NEOBIN\\0\\0", version u32, pad, 16-byte run id, pad) + the tokens of
         all documents back to back, little-endian uint16 (vocab <= 65536) or uint32.
.idx   = header (magic b"NEOIDX\\0\\0", version u32, JSON length u32, JSON: dtype, num_docs, num_tokens,
         run id, tokenizer, eod_id, vocab_size, format, and for chat/preference data the chat template,
         seq_length, mask, num_pairs, num_groups) padded to 4096 bytes (to the next multiple of 4096 when
         the JSON is longer, e.g. a long chat template) + uint64 offsets[num_docs + 1].
.mask  = 32-byte header (magic b"NEOMASK\\0", version, run id) + one uint8 per token: 1 where the token is
         a label the model learns to predict (an assistant's answer), 0 elsewhere.
.pairs = 32-byte header (magic b"NEOPAIR\\0", version, run id) + int64 rows (chosen document, rejected
         document, group). A group is one prompt: its documents (prompt + one answer each) are consecutive,
         groups are numbered 0, 1, 2... in file order, and every document of a group is in one of its pairs.

Why this shape: the run id ties every file of a set to the .idx written with it, so files from different
runs are refused; the reader checks every size against the header, so a truncated file is refused instead
of being read as garbage. The writer streams all files under temporary names (constant memory, the header
is filled in last) and renames the .idx last: a run killed at any point never leaves a set that opens.
Files without a mask (pretraining text) are exactly what earlier versions wrote and read.
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
MASK_MAGIC, PAIRS_MAGIC = b"NEOMASK\x00", b"NEOPAIR\x00"
IDX_HEADER, BIN_HEADER = 4096, 32
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
FORMATS = ("text", "chat", "preference")
SIDE_FILES = ("bin", "mask", "pairs")  # published before the .idx, in this order


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever every id fits in it."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _file_header(magic: bytes, run_id: bytes) -> bytes:
    return struct.pack("<8sI4x16s", magic, VERSION, run_id).ljust(BIN_HEADER, b"\0")


def idx_header_size(json_length: int) -> int:
    """4096 bytes, or the next multiple of 4096 that holds a longer JSON (a chat template's source)."""
    return max(IDX_HEADER, -(-(16 + json_length) // IDX_HEADER) * IDX_HEADER)


class IndexedTokensWriter:
    """Streams documents into `<prefix>.bin.tmp` / `.idx.tmp` (and `.mask.tmp`, `.pairs.tmp`); `close()`
    publishes the set.

    Use as a context manager: on an exception the temporary files are removed and nothing is published.
    `mask=True` keeps a loss mask beside the tokens (`add(..., mask=...)`), `pairs=True` a comparison list
    (`add_pairs`); `meta` adds keys to the .idx header (the chat template, seq_length, ...).
    """

    def __init__(self, prefix: str | os.PathLike, *, vocab_size: int, tokenizer: str = "", eod_id: int = -1,
                 data_format: str = "text", mask: bool = False, pairs: bool = False,
                 meta: dict | None = None):  # fmt: skip
        if data_format not in FORMATS:
            raise ValueError(f"data_format {data_format!r} not in {FORMATS}")
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype_for(vocab_size)
        self.meta = {
            "tokenizer": tokenizer,
            "eod_id": eod_id,
            "vocab_size": vocab_size,
            "format": data_format,
        }
        self.meta.update(meta or {})
        self.run_id = uuid.uuid4().bytes
        self.num_docs = self.num_tokens = self.num_pairs = self.num_groups = 0
        self.paths = {ext: Path(f"{prefix}.{ext}") for ext in ("idx", *SIDE_FILES)}
        self.kept = ["bin"] + ["mask"] * mask + ["pairs"] * pairs
        # An older set under this prefix is removed now, not at the end: if this run dies, nothing
        # complete-looking (and no stale data) remains under the name.
        for p in self.paths.values():
            p.unlink(missing_ok=True)
        self.files = {ext: open(f"{self.paths[ext]}.tmp", "wb") for ext in ["idx", *self.kept]}
        magics = {"bin": BIN_MAGIC, "mask": MASK_MAGIC, "pairs": PAIRS_MAGIC}
        for ext in self.kept:
            self.files[ext].write(_file_header(magics[ext], self.run_id))
        # The header is written last, in room reserved now: room for this JSON with the largest counts.
        self._room = len(self._header_json(10**19).encode())
        self.files["idx"].write(b"\0" * idx_header_size(self._room) + np.zeros(1, np.uint64).tobytes())

    @property
    def has_mask(self) -> bool:
        return "mask" in self.files

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append documents: `tokens` is their concatenation, `lengths` their sizes (EOD included), `mask`
        (with mask=True) one 0/1 per token."""
        tokens = np.asarray(tokens)
        if len(tokens) and int(tokens.max()) >= self.meta["vocab_size"]:
            raise DataError(f"token id {int(tokens.max())} >= vocab_size {self.meta['vocab_size']}")
        if self.has_mask != (mask is not None) or (mask is not None and len(mask) != len(tokens)):
            raise ValueError("a mask of one value per token is needed exactly when the writer keeps masks")
        self.files["bin"].write(tokens.astype(self.dtype, copy=False).tobytes())
        if mask is not None:
            self.files["mask"].write(np.asarray(mask).astype(np.uint8, copy=False).tobytes())
        ends = self.num_tokens + np.cumsum(lengths, dtype=np.uint64)
        self.files["idx"].write(ends.astype(np.uint64).tobytes())
        self.num_docs += len(lengths)
        self.num_tokens += int(np.sum(lengths, dtype=np.int64))
        if self.num_tokens != (self.files["bin"].tell() - BIN_HEADER) // self.dtype.itemsize:
            raise ValueError("lengths do not add up to the tokens given")

    def add_doc(self, ids, mask=None) -> None:
        self.add(
            np.asarray(ids, dtype=np.int64), np.array([len(ids)]), None if mask is None else np.asarray(mask)
        )

    def add_pairs(self, rows: np.ndarray) -> None:
        """Append comparisons: int64 rows (chosen document, rejected document, group), in group order."""
        rows = np.asarray(rows, np.int64).reshape(-1, 3)
        if len(rows):
            self.files["pairs"].write(rows.tobytes())
            self.num_pairs += len(rows)
            self.num_groups = max(self.num_groups, int(rows[:, 2].max()) + 1)

    def _header_json(self, count: int | None = None) -> str:
        header = {"dtype": self.dtype.name, "num_docs": count or self.num_docs,
                  "num_tokens": count or self.num_tokens, "run_id": self.run_id.hex(), **self.meta}  # fmt: skip
        if self.has_mask:
            header["mask"] = True
        if "pairs" in self.files:
            header.update(num_pairs=count or self.num_pairs, num_groups=count or self.num_groups)
        return json.dumps(header)

    def close(self) -> None:
        blob = self._header_json().encode()
        if idx_header_size(self._room) > IDX_HEADER:  # JSON allows trailing spaces: fill the reserved room
            blob = blob.ljust(self._room, b" ")
        idx = self.files["idx"]
        idx.seek(0)
        idx.write(struct.pack("<8sII", IDX_MAGIC, VERSION, len(blob)) + blob)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for ext in [*self.kept, "idx"]:  # the .idx last: until it exists, nothing opens
            os.replace(f"{self.paths[ext]}.tmp", self.paths[ext])

    def abort(self) -> None:
        for ext, f in self.files.items():
            f.close()
            Path(f"{self.paths[ext]}.tmp").unlink(missing_ok=True)

    def __enter__(self) -> IndexedTokensWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type else self.close()


class IndexedTokens:
    """Read-only, memory-mapped view of a `<prefix>.bin`/`.idx` pair (+ `.mask`, `.pairs`); validates the
    set before any read.

    len() = number of documents; doc(i) = that document's tokens (a numpy view, EOD included);
    doc_mask(i) = its loss mask (files with `has_mask`); `pairs` = the comparisons of a preference file.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise DataError(
                    f"{p}: no such file; run `python launch/preprocess.py ... --output {prefix}` first"
                )
        meta, header_size = self._read_idx_header(idx_path)
        self.meta = meta
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        self.num_docs, self.num_tokens = int(meta["num_docs"]), int(meta["num_tokens"])
        self.tokenizer, self.eod_id, self.vocab_size = meta["tokenizer"], meta["eod_id"], meta["vocab_size"]
        self.format = meta.get("format", "text")
        self.chat_template: dict | None = meta.get("chat_template")
        self.has_mask = bool(meta.get("mask"))
        want = header_size + 8 * (self.num_docs + 1)
        if idx_path.stat().st_size != want:
            raise DataError(
                f"{idx_path}: truncated or corrupt ({idx_path.stat().st_size} bytes, header says {want}); "
                "re-run preprocessing"
            )
        self.offsets = np.memmap(idx_path, np.uint64, "r", header_size, (self.num_docs + 1,))
        if (
            self.offsets[0] != 0
            or self.offsets[-1] != self.num_tokens
            or np.any(np.diff(self.offsets) > 1 << 62)
        ):
            raise DataError(f"{idx_path}: document offsets are corrupt; re-run preprocessing")
        self.tokens = self._open_side("bin", BIN_MAGIC, self.dtype, self.num_tokens)
        self.mask = (
            self._open_side("mask", MASK_MAGIC, np.dtype(np.uint8), self.num_tokens)
            if self.has_mask
            else None
        )
        self.pairs: np.ndarray | None = None
        if "num_pairs" in meta:
            rows = self._open_side("pairs", PAIRS_MAGIC, np.dtype(np.int64), 3 * int(meta["num_pairs"]))
            self.pairs = rows.reshape(-1, 3)
            self._index_groups(int(meta["num_groups"]))

    @staticmethod
    def _read_idx_header(path: Path) -> tuple[dict, int]:
        with open(path, "rb") as f:
            head = f.read(IDX_HEADER)
            if len(head) >= 16 and 16 + struct.unpack_from("<I", head, 12)[0] > IDX_HEADER:
                head += f.read(idx_header_size(struct.unpack_from("<I", head, 12)[0]) - IDX_HEADER)
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
        return meta, idx_header_size(n)

    def _open_side(self, ext: str, magic: bytes, dtype: np.dtype, count: int) -> np.ndarray:
        """A memory map of `<prefix>.<ext>` after checking its magic, version, run id and size."""
        path = Path(f"{self.prefix}.{ext}")
        if not path.is_file():
            raise DataError(f"{path}: no such file, but {self.prefix}.idx says there is one (an incomplete copy?); "
                            "copy every file of the set, or re-run preprocessing")  # fmt: skip
        with open(path, "rb") as f:
            head = f.read(BIN_HEADER)
        if len(head) < BIN_HEADER or head[:8] != magic:
            raise DataError(f"{path}: not a neo .{ext} file (or truncated); re-run preprocessing")
        version, rid = struct.unpack_from("<I4x16s", head, 8)
        if version != VERSION:
            raise DataError(
                f"{path}: format version {version}, this neo reads version {VERSION}; re-run preprocessing"
            )
        if rid.hex() != self.meta["run_id"]:
            raise DataError(
                f"{path} and {self.prefix}.idx come from different preprocessing runs (mismatched pair); "
                "re-run preprocessing to write both"
            )
        want = BIN_HEADER + count * dtype.itemsize
        if (size := path.stat().st_size) != want:
            raise DataError(
                f"{path}: {size} bytes but its .idx describes {want} (truncated or corrupt); "
                "re-run preprocessing"
            )
        return np.memmap(path, dtype, "r", BIN_HEADER, (count,)) if count else np.zeros(0, dtype)

    def _index_groups(self, num_groups: int) -> None:
        """group_docs[g]..group_docs[g+1]: group g's documents; group_pairs likewise for its rows of `pairs`.
        Refuses a pairs file whose groups are not consecutive, tiling the documents in order."""
        p = np.asarray(self.pairs)
        g = p[:, 2]
        ok = (
            len(p) > 0
            and num_groups > 0
            and bool(np.all(np.diff(g) >= 0))
            and g[0] == 0
            and g[-1] == num_groups - 1
        )
        ok = (
            ok
            and bool(np.all((p[:, :2] >= 0) & (p[:, :2] < self.num_docs)))
            and bool(np.all(p[:, 0] != p[:, 1]))
        )
        if ok:
            self.group_pairs = np.searchsorted(g, np.arange(num_groups + 1), side="left").astype(np.int64)
            starts = self.group_pairs[:-1]
            ok = bool(np.all(np.diff(self.group_pairs) > 0))
        if ok:
            lo = np.minimum.reduceat(p[:, :2].min(axis=1), starts)
            hi = np.maximum.reduceat(p[:, :2].max(axis=1), starts) + 1
            self.group_docs = np.append(lo, hi[-1]).astype(np.int64)
            ok = lo[0] == 0 and hi[-1] == self.num_docs and bool(np.all(lo[1:] == hi[:-1]))
        if not ok:
            raise DataError(f"{self.prefix}.pairs: comparisons are corrupt (groups out of order, or documents "
                            "outside their group); re-run preprocessing")  # fmt: skip

    @property
    def num_groups(self) -> int:
        """Prompts of a preference file (0 for other files)."""
        return 0 if self.pairs is None else len(self.group_docs) - 1

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def doc_mask(self, i: int) -> np.ndarray:
        """Document i's loss mask: uint8, 1 where the token is a label the model learns to predict."""
        if self.mask is None:
            raise DataError(f"{self.prefix}: a {self.format} file without loss masks; preprocess instruction "
                            "data with --format chat (or preference)")  # fmt: skip
        return self.mask[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def __repr__(self) -> str:
        return (
            f"IndexedTokens({self.prefix!r}: {self.format}, {self.num_docs} docs, {self.num_tokens} tokens, "
            f"{self.dtype.name}, tokenizer={self.tokenizer!r})"
        )
