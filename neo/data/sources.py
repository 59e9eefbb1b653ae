"""Where preprocessing reads from: files (JSONL, text, Parquet; compressed or not), directories, globs,
HF datasets; each streamed as chunks of raw lines/rows for the worker processes (see preprocess.py).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .indexed import DataError
from .textio import OPENERS

CHUNK_BYTES = 1 << 19
KINDS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".parquet": "parquet",
    ".csv": "hf",
    ".tsv": "hf",
    ".arrow": "hf",
}


@dataclass
class Source:
    """One input: a file of a known kind, a saved/loadable HF dataset, or a hub name (`hf:NAME`)."""

    path: str
    kind: str  # jsonl | text | parquet | hf
    size: int | None = None  # bytes on disk, for the progress ETA


@dataclass
class Chunk:
    source: str
    kind: str  # how the worker reads each payload: json-block | text | value
    unit: str  # "line" or "row", for messages
    items: list  # [(line or row number, payload)]
    nbytes: int  # text bytes in this chunk, for MB/s
    pos: int  # input bytes consumed once this chunk is done, for the ETA
    problems: list = field(default_factory=list)  # found by the reader: [(number, kind, detail)]


# ---------------------------------------------------------------------------------------- inputs


def _kind_of(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix in OPENERS else path.suffixes[-1:]
    return KINDS.get(suffixes[0].lower()) if suffixes else None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def resolve_inputs(inputs: list[str], fmt: str = "auto", unknown_as: str | None = None) -> list[Source]:
    """Expand directories and globs into sources; fail at once, naming the path, on anything unusable.
    ``fmt`` forces every file's type; with "auto", a file of unknown type is read as ``unknown_as``."""
    sources: list[Source] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            sources.append(Source(spec[3:], "hf"))
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            if fmt == "hf" or _is_saved_dataset(path):
                sources.append(Source(str(path), "hf"))
                continue
            files = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and (fmt != "auto" or _kind_of(p))
            )
            if not files:
                raise DataError(
                    f"{path}: no .jsonl/.txt/.parquet files in this directory "
                    "(pass --input-type to read other names, or --input-type hf to use datasets.load_dataset)"
                )
        elif path.exists():  # a file, or a pipe such as /dev/stdin
            files = [path]
        elif any(c in spec for c in "*?["):
            files = sorted(
                Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()
            )
            if not files:
                raise DataError(f"{spec}: no files match this pattern")
        else:
            raise DataError(
                f"{spec}: no such file or directory (for a Hugging Face hub dataset write hf:NAME)"
            )
        for f in files:
            kind = fmt if fmt != "auto" else _kind_of(f) or unknown_as
            if kind is None:
                raise DataError(
                    f"{f}: unknown input type {''.join(f.suffixes)!r}; pass --input-type jsonl|text|parquet|hf"
                )
            sources.append(Source(str(f), kind, f.stat().st_size if f.is_file() else None))
    return sources


def _open(path: str, buffered: bool = False):
    """(raw file, reader, tell): the reader decompresses; tell() is the on-disk position, for the ETA.
    Unbuffered unless asked: a BufferedReader blocked on a pipe can swallow SIGTERM (CPython 3.11)."""
    raw = open(path, "rb", buffering=-1 if buffered else 0)
    opener = OPENERS.get(Path(path).suffix)
    return raw, (opener(raw, "rb") if opener else raw), (raw.tell if raw.seekable() else lambda: 0)


def _read_blocks(path: str) -> Iterator[tuple[int, bytes, int]]:
    """JSON lines, as blocks of whole lines: (number of the first line, block, position). Splitting
    the lines is left to the workers, which keeps the main process nearly idle."""
    raw, f, tell = _open(path)
    with raw, f:
        line, pending = 1, []
        while block := f.read(CHUNK_BYTES):
            cut = block.rfind(b"\n") + 1
            if not cut:  # a line longer than a block: keep reading
                pending.append(block)
                continue
            head, pending = b"".join([*pending, block[:cut]]), [block[cut:]]
            yield line, head, tell()
            line += head.count(b"\n")
        if tail := b"".join(pending):
            yield line, tail, tell()


def _read_text(path: str, mode: str) -> Iterator[tuple[int, bytes, int]]:
    """Plain text: the whole file as one document, or one document per blank-line-separated paragraph."""
    raw, f, tell = _open(path, buffered=mode != "file")
    with raw, f:
        if mode == "file":
            data = f.read()
            if data.strip():
                yield 1, data, tell()
            return
        para: list[bytes] = []
        start = 0
        for n, line in enumerate(f, 1):
            if line.strip():
                if not para:
                    start = n
                para.append(line)
            elif para:
                yield start, b"".join(para).rstrip(b"\r\n"), tell()
                para = []
        if para:
            yield start, b"".join(para).rstrip(b"\r\n"), tell()


def _read_parquet(path: str, key: str) -> Iterator[tuple[int, object, int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if key not in names:
        raise DataError(
            f"{path}: no column {key!r} (columns: {', '.join(names)}); choose one with --text-key"
        )
    row, total, size = 0, max(pf.metadata.num_rows, 1), os.path.getsize(path)
    for batch in pf.iter_batches(batch_size=1024, columns=[key]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, value, size * row // total


def _read_hf(src: Source, key: str, split: str, config: str | None) -> Iterator[tuple[int, object, int]]:
    """Anything `datasets` loads: a save_to_disk directory, a data directory/file, or a hub name."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{src.path}: reading it needs the `datasets` package: pip install datasets"
        ) from None
    path = Path(src.path)
    try:
        if path.is_dir() and _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = {
                ".csv": "csv",
                ".tsv": "csv",
                ".arrow": "arrow",
                ".parquet": "parquet",
                ".txt": "text",
            }.get(path.suffix, "json")
            kw = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True, **kw)
        else:
            ds = datasets.load_dataset(src.path, config, split=split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the message
        hint = "" if path.exists() else "; a hub dataset needs the network (HF_DATASETS_OFFLINE=1 fails fast)"
        raise DataError(f"{src.path}: datasets could not load it: {type(e).__name__}: {e}{hint}") from None
    if isinstance(ds, dict):  # a saved DatasetDict
        if split not in ds:
            raise DataError(
                f"{src.path}: no split {split!r} (splits: {', '.join(ds)}); choose one with --split"
            )
        ds = ds[split]
    cols = ds.column_names
    if cols is not None and key not in cols:
        raise DataError(
            f"{src.path}: no column {key!r} (columns: {', '.join(cols)}); choose one with --text-key"
        )
    if isinstance(ds, datasets.Dataset):
        rows = (v for batch in ds.select_columns([key]).iter(batch_size=1000) for v in batch[key])
    else:
        rows = (r.get(key) for r in ds)
    for n, value in enumerate(rows, 1):
        yield n, value, 0


def read_chunks(
    sources: list[Source], key: str, text_mode: str, split: str, config: str | None
) -> Iterator[Chunk]:
    base = 0
    for src in sources:
        if src.kind == "jsonl":
            items, kind, unit = _read_blocks(src.path), "json-block", "line"
        elif src.kind == "text":
            items, kind, unit = _read_text(src.path, text_mode), "text", "line"
        elif src.kind == "parquet":
            items, kind, unit = _read_parquet(src.path, key), "value", "row"
        else:
            items, kind, unit = _read_hf(src, key, split, config), "value", "row"
        buf, nbytes, count, pos = [], 0, 0, 0
        for n, payload, pos in items:
            buf.append((n, payload))
            nbytes += len(payload) if isinstance(payload, bytes | str) else 0
            count += kind != "json-block" or not payload.isspace()
            if nbytes >= CHUNK_BYTES or len(buf) >= 4096:
                yield Chunk(src.path, kind, unit, buf, nbytes, base + pos)
                buf, nbytes = [], 0
        problems = [] if count else [(0, "empty file", "no documents in it")]
        yield Chunk(src.path, kind, unit, buf, nbytes, base + (src.size or pos), problems)
        base += src.size or 0
