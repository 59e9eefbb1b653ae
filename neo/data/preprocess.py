"""Tokenize a corpus into one `<prefix>.bin` + `<prefix>.idx` pair (see indexed.py).

The main process streams the inputs in ~512 KiB chunks of raw lines/documents; worker processes
decode, parse, validate and tokenize each chunk; results come back in input order (so the output
does not depend on the number of workers) and are appended to the output. At most a few chunks
per worker are in flight, so memory stays flat however large the input is.

Text handling is exact, so the output can be checked against tiktoken directly: a JSONL/Parquet/
dataset document is the value of the text field as is; a plain-text document is the file's text
(or a paragraph: its lines up to a blank line, without the final line break), decoded as UTF-8
with `\\r\\n` and `\\r` read as `\\n`, as Python's text mode does. Each document is encoded with
`encode_ordinary` (special-token strings in the text stay plain text) and followed by the EOD token.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .indexed import DataError, IndexedTokensWriter
from .tokenizer import load_tokenizer

CHUNK_BYTES = 1 << 19
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
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
FIXES = {
    "invalid UTF-8": "re-encode the file as UTF-8",
    "not JSON": "each line must hold one JSON object",
    "missing key": "choose the text field with --text-key",
    "not a string": "choose a text field with --text-key",
    "empty document": "remove the empty document",
    "empty file": "remove the empty file from the inputs",
}
MAX_SHOWN = 20
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


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


@dataclass
class Stats:
    docs: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    workers: int = 1
    skipped: Counter = field(default_factory=Counter)


# ---------------------------------------------------------------------------------------- inputs


def _kind_of(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix in OPENERS else path.suffixes[-1:]
    return KINDS.get(suffixes[0].lower()) if suffixes else None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def resolve_inputs(inputs: list[str], fmt: str = "auto") -> list[Source]:
    """Expand directories and globs into sources; fail at once, naming the path, on anything unusable."""
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
                    "(pass --format to read other names, or --format hf to use datasets.load_dataset)"
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
            kind = fmt if fmt != "auto" else _kind_of(f)
            if kind is None:
                raise DataError(
                    f"{f}: unknown input type {''.join(f.suffixes)!r}; pass --format jsonl|text|parquet|hf"
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


def _chunks(
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


# --------------------------------------------------------------------------------------- workers

_STATE: dict = {}


def _init_worker(tokenizer: str, key: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: Pool.terminate() must kill
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform == "linux":  # die with the parent, even when it is SIGKILLed
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    _STATE.update(tok=load_tokenizer(tokenizer), key=key)


def _text_of(kind: str, payload, key: str) -> tuple[str | None, tuple | None]:
    """The document text, or (None, (line offset, problem kind, detail))."""
    if kind == "value":
        if payload is None:
            return None, (0, "missing key", f"{key!r} is null")
        text = payload
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            line = payload.count(b"\n", 0, e.start)
            col = e.start - (payload.rfind(b"\n", 0, e.start) + 1) + 1
            return None, (line, "invalid UTF-8", f"byte 0x{payload[e.start]:02x} at column {col}")
        if kind == "json":
            try:
                obj = json.loads(text)
            except ValueError as e:
                return None, (0, "not JSON", str(e))
            if not isinstance(obj, dict):
                return None, (0, "not JSON", f"a JSON {type(obj).__name__}, not an object")
            if key not in obj:
                return None, (0, "missing key", f"no {key!r} key (keys: {', '.join(list(obj)[:8])})")
            text = obj[key]
        elif "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not isinstance(text, str):
        return None, (0, "not a string", f"{key!r} is {type(text).__name__}, not a string")
    if not text.strip():
        return None, (0, "empty document", "no text")
    return text, None


def _encode_chunk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, list, Chunk]:
    """Tokens of the chunk's good documents (each + EOD), their lengths, and the problems found."""
    tok, key = _STATE["tok"], _STATE["key"]
    eod = tok.eod_id
    parts, lengths, problems = [], [], list(chunk.problems)
    items, kind = chunk.items, chunk.kind
    if kind == "json-block":  # [(first line number, block of lines)] -> the non-blank lines
        items, kind = (
            [(n + i, x) for n, block in items for i, x in enumerate(block.split(b"\n")) if x.strip()],
            "json",
        )
    for n, payload in items:
        text, problem = _text_of(kind, payload, key)
        if problem:
            problems.append((n + problem[0], *problem[1:]))
            continue
        ids = tok.encode_array(text)
        parts += (ids, np.array([eod], np.uint32))
        lengths.append(len(ids) + 1)
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
    if tok.vocab_size <= 1 << 16:
        tokens = tokens.astype(np.uint16)
    light = Chunk(chunk.source, chunk.kind, chunk.unit, [], chunk.nbytes, chunk.pos)
    return tokens, np.array(lengths, np.int64), problems, light


def _results(chunks: Iterator[Chunk], workers: int, init: tuple) -> Iterator[tuple]:
    """Encoded chunks in input order; with workers > 1, a process pool with a bounded queue."""
    if workers <= 1:
        _STATE.update(tok=load_tokenizer(init[0]), key=init[1])
        yield from map(_encode_chunk, chunks)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    # The pool's helper threads inherit this mask, so SIGINT/SIGTERM interrupt the main thread (even in
    # a blocking read) instead of landing in a helper thread; the workers unblock them again.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool = ctx.Pool(workers, _init_worker, (*init, os.getpid()))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    with pool:  # leaving the block terminates the workers
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) > 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -------------------------------------------------------------------------------------- progress


def si_units(x: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (+ unit glued on: 'MB'); the unit is separated when it is a word."""
    sep = " " if unit[:1].islower() else ""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{sep}{unit}"
    return f"{x:.0f} {unit}"


class Progress:
    """One status line per interval: a carriage-return bar on a TTY, plain periodic lines otherwise."""

    def __init__(self, total: int | None, stream=sys.stderr, interval: float | None = None):
        self.total, self.stream, self.start = total, stream, time.perf_counter()
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.last = self.start

    def line(self, s: Stats, pos: int) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        head, eta = "", ""
        if self.total:
            frac = min(pos / self.total, 1.0)
            head = f"[{'#' * int(20 * frac):.<20}] {frac:4.0%} | "
            if frac > 0:
                eta = f" | ETA {time.strftime('%H:%M:%S', time.gmtime(dt * (1 - frac) / frac))}"
        return (
            f"{head}{s.docs:,} docs, {si_units(s.bytes, 'B')}, {si_units(s.tokens, 'tokens')} | "
            f"{si_units(s.docs / dt, 'docs/s')}, {si_units(s.bytes / dt, 'B/s')}, {si_units(s.tokens / dt, 'tokens/s')}{eta}"
        )

    def update(self, s: Stats, pos: int, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - self.last >= self.interval:
            self.last = now
            if self.tty:
                self.stream.write("\r" + self.line(s, pos).ljust(100) + ("\n" if final else ""))
            elif not final:
                self.stream.write(self.line(s, pos) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        self.stream.write(("\r" + " " * 100 + "\r" if self.tty else "") + text + "\n")


# ------------------------------------------------------------------------------------------ main


def preprocess(
    inputs: list[str],
    output: str,
    *,
    tokenizer: str = "gpt2",
    text_key: str = "text",
    fmt: str = "auto",
    text_mode: str = "file",
    split: str = "train",
    hf_config: str | None = None,
    workers: int | None = None,
    strict: bool = False,
    log=sys.stderr,
    interval: float | None = None,
) -> Stats:
    """Tokenize `inputs` into `<output>.bin` + `<output>.idx`; returns the counts. Raises DataError on
    unusable input (and, with strict=True, on the first bad line); nothing is published then."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise DataError(
            f"--output {output} is a directory; give a prefix such as {Path(output) / 'corpus'} "
            "(writes corpus.bin and corpus.idx)"
        )
    sources = resolve_inputs(inputs, fmt)
    tok = load_tokenizer(tokenizer)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sizes = [s.size for s in sources]
    progress = Progress(sum(sizes) if None not in sizes else None, log, interval)
    stats, shown = Stats(workers=workers), 0
    chunks = _chunks(sources, text_key, text_mode, split, hf_config)
    writer = IndexedTokensWriter(output, vocab_size=tok.vocab_size, tokenizer=tok.name, eod_id=tok.eod_id)
    with writer as out, closing(_results(chunks, workers, (tokenizer, text_key))) as results:
        for tokens, lengths, problems, chunk in results:
            for n, kind, detail in problems:
                where = (
                    chunk.source
                    if n == 0
                    else f"{chunk.source}:{n}"
                    if chunk.unit == "line"
                    else f"{chunk.source} row {n}"
                )
                if strict:
                    raise DataError(
                        f"{where}: {kind}: {detail}. Fix: {FIXES[kind]}, or drop --strict to skip it"
                    )
                stats.skipped[kind] += 1
                if shown < MAX_SHOWN:
                    progress.message(f"warning: {where}: {kind}: {detail}; skipped")
                shown += 1
            out.add(tokens, lengths)
            stats.docs += len(lengths)
            stats.tokens += len(tokens)
            stats.bytes += chunk.nbytes
            progress.update(stats, chunk.pos)
        if stats.docs == 0:
            raise DataError(f"no documents found in {', '.join(inputs)}; nothing written")
    stats.seconds = time.perf_counter() - progress.start
    progress.update(stats, progress.total or 0, final=True)
    if shown > MAX_SHOWN:
        progress.message(f"({shown - MAX_SHOWN} more warnings not shown)")
    return stats
