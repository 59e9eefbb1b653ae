"""Tokenize a corpus into one `<prefix>.bin` + `<prefix>.idx` pair (see indexed.py); instruction data
(``--format chat``) and preference data (``--format preference``) also get a `.mask`, and preferences a
`.pairs` file.

The main process streams the inputs in ~512 KiB chunks of raw lines/documents (sources.py); worker processes
decode, parse, validate and tokenize each chunk; results come back in input order (so the output does not
depend on the number of workers) and are appended to the output. At most a few chunks per worker are in
flight, so memory stays flat however large the input is.

Text handling is exact, so the output can be checked against tiktoken directly: a JSONL/Parquet/
dataset document is the value of the text field as is; a plain-text document is the file's text
(or a paragraph: its lines up to a blank line, without the final line break), decoded as UTF-8
with `\\r\\n` and `\\r` read as `\\n`, as Python's text mode does. Each document is encoded with
`encode_ordinary` (special-token strings in the text stay plain text) and followed by the EOD token.

Chat and preference records (records.py) are rendered with a chat template (chat.py): one document per
conversation, or per answer of a preference record (its prompt + that answer), with no EOD appended (the
template decides how a turn ends). A document longer than seq_length + 1 tokens (one training sample) is
cut to its first seq_length + 1 tokens (``long_records="truncate"``: the answer tokens kept keep their loss;
the cut-off end of turn is lost, so that example does not teach stopping) or dropped (``"drop"``); either
way, a record left with no answer token is dropped. Preference records are truncated or dropped whole.
"""

from __future__ import annotations

import json
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

from .chat import load_template
from .indexed import DataError, IndexedTokensWriter
from .records import Encoded, ExampleJob, encode_records
from .sources import Chunk, read_chunks, resolve_inputs
from .tokenizer import load_tokenizer

FIXES = {
    "invalid UTF-8": "re-encode the file as UTF-8",
    "not JSON": "each line must hold one JSON object",
    "missing key": "choose the text field with --text-key",
    "not a string": "choose a text field with --text-key",
    "empty document": "remove the empty document",
    "empty file": "remove the empty file from the inputs",
}
EXAMPLE_FIXES = {
    "missing key": "give each record its keys, or name them with --messages-key, --prompt-key, --response-key, "
    "--chosen-key, --rejected-key, --responses-key, --ranking-key",
    "bad messages": 'make it a list of {"role": ..., "content": ...} objects',
    "missing role": "give every message a role and each conversation an assistant message",
    "unknown role": "use the roles system, user and assistant",
    "non-string content": "make each content a string (join multi-part content into text)",
    "empty answer": "write the answer or remove the record",
    "template error": "fix the record, or choose another --chat-template",
    "tie": "remove the comparison: equal answers teach nothing",
    "too few answers": "give a ranking at least two responses",
    "bad ranking": "list each response index once, best first (or see --ranking-style)",
}
MAX_SHOWN = 20
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass
class Stats:
    docs: int = 0  # documents written (chat: conversations; preference: answers)
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    workers: int = 1
    skipped: Counter = field(default_factory=Counter)  # bad inputs by kind
    groups: int = 0  # preference: prompts kept
    pairs: int = 0  # preference: comparisons
    truncated: int = 0  # records cut to seq_length + 1 tokens
    dropped: int = 0  # records dropped as too long (or with no answer token left after the cut)


@dataclass
class Result:
    """One chunk, tokenized (int arrays, so that they cross processes cheaply)."""

    tokens: np.ndarray
    lengths: np.ndarray
    problems: list
    chunk: Chunk
    mask: np.ndarray | None = None
    pairs: np.ndarray | None = None  # [n, 3] rows (chosen, rejected, group), numbered within the chunk
    groups: int = 0
    truncated: int = 0
    dropped: int = 0


# --------------------------------------------------------------------------------------- workers

_STATE: dict = {}


def _worker_state(tokenizer: str, key: str, job: ExampleJob | None) -> dict:
    state = {"tok": load_tokenizer(tokenizer), "key": key, "job": job}
    if job is not None:
        state["template"] = load_template(job.template)
    return state


def _init_worker(tokenizer: str, key: str, job: ExampleJob | None, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: Pool.terminate() must kill
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform == "linux":  # die with the parent, even when it is SIGKILLed
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)
    _STATE.update(_worker_state(tokenizer, key, job))


def _json_object(payload: bytes) -> tuple[dict | None, tuple | None]:
    """One JSON line as an object, or (None, (line offset, problem kind, detail))."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        line = payload.count(b"\n", 0, e.start)
        col = e.start - (payload.rfind(b"\n", 0, e.start) + 1) + 1
        return None, (line, "invalid UTF-8", f"byte 0x{payload[e.start]:02x} at column {col}")
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, (0, "not JSON", str(e))
    if not isinstance(obj, dict):
        return None, (0, "not JSON", f"a JSON {type(obj).__name__}, not an object")
    return obj, None


def _text_of(kind: str, payload, key: str) -> tuple[str | None, tuple | None]:
    """The document text, or (None, (line offset, problem kind, detail))."""
    if kind == "value":
        if payload is None:
            return None, (0, "missing key", f"{key!r} is null")
        text = payload
    elif kind == "json":
        obj, problem = _json_object(payload)
        if problem:
            return None, problem
        if key not in obj:
            return None, (0, "missing key", f"no {key!r} key (keys: {', '.join(list(obj)[:8])})")
        text = obj[key]
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            line = payload.count(b"\n", 0, e.start)
            col = e.start - (payload.rfind(b"\n", 0, e.start) + 1) + 1
            return None, (line, "invalid UTF-8", f"byte 0x{payload[e.start]:02x} at column {col}")
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not isinstance(text, str):
        return None, (0, "not a string", f"{key!r} is {type(text).__name__}, not a string")
    if not text.strip():
        return None, (0, "empty document", "no text")
    return text, None


def _lines(chunk: Chunk) -> tuple[list, str]:
    """The chunk's items; JSON blocks split into their non-blank lines [(line number, bytes)]."""
    if chunk.kind != "json-block":
        return chunk.items, chunk.kind
    return [
        (n + i, x) for n, block in chunk.items for i, x in enumerate(block.split(b"\n")) if x.strip()
    ], "json"


def _light(chunk: Chunk) -> Chunk:
    return Chunk(chunk.source, chunk.kind, chunk.unit, [], chunk.nbytes, chunk.pos)


def _encode_text(chunk: Chunk) -> Result:
    """Tokens of the chunk's good documents (each + EOD), their lengths, and the problems found."""
    tok, key = _STATE["tok"], _STATE["key"]
    eod = tok.eod_id
    parts, lengths, problems = [], [], list(chunk.problems)
    items, kind = _lines(chunk)
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
    return Result(tokens, np.array(lengths, np.int64), problems, _light(chunk))


def _encode_examples(chunk: Chunk) -> Result:
    """Chat or preference records: rendered documents with their loss masks (and comparisons)."""
    tok, job, template = _STATE["tok"], _STATE["job"], _STATE["template"]
    out = Encoded(problems=list(chunk.problems))
    items, _ = _lines(chunk)
    for n, payload in items:
        obj, problem = _json_object(payload)
        if problem:
            out.problems.append((n + problem[0], *problem[1:]))
            continue
        try:
            encode_records([(n, obj)], job, tok, template, out)
        except DataError as e:  # the template itself cannot serve (not prefix-consistent): stop here
            raise DataError(f"{chunk.source}:{n}: {e}") from None
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    pairs = np.array(out.pairs, np.int64).reshape(-1, 3)
    return Result(np.array(out.tokens, dtype), np.array(out.lengths, np.int64), out.problems, _light(chunk),
                  np.array(out.mask, np.uint8), pairs, out.groups, out.truncated, out.dropped)  # fmt: skip


def _encode_chunk(chunk: Chunk) -> Result:
    return _encode_text(chunk) if _STATE["job"] is None else _encode_examples(chunk)


def _results(chunks: Iterator[Chunk], workers: int, init: tuple) -> Iterator[tuple]:
    """Encoded chunks in input order; with workers > 1, a process pool with a bounded queue."""
    if workers <= 1:
        _STATE.update(_worker_state(*init))
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


def _writer(output: str, tok, job: ExampleJob | None) -> IndexedTokensWriter:
    if job is None:
        return IndexedTokensWriter(output, vocab_size=tok.vocab_size, tokenizer=tok.name, eod_id=tok.eod_id)
    meta = {"chat_template": load_template(job.template).to_dict(), "seq_length": job.seq_length,
            "long_records": job.long_records}  # fmt: skip
    return IndexedTokensWriter(output, vocab_size=tok.vocab_size, tokenizer=tok.name, eod_id=tok.eod_id,
                               data_format=job.data_format, mask=True, pairs=job.data_format == "preference",
                               meta=meta)  # fmt: skip


def _check_job(job: ExampleJob, sources: list) -> None:
    if job.data_format not in ("chat", "preference"):
        raise DataError(f"data format {job.data_format!r}: expected chat or preference")
    if job.seq_length < 1:
        raise DataError(f"--seq-length {job.seq_length}: give the tokens per training sample (e.g. 2048)")
    if job.long_records not in ("truncate", "drop"):
        raise DataError(f"--long-records {job.long_records!r}: expected truncate or drop")
    if job.preference_keys.ranking_style not in ("order", "ranks"):
        raise DataError(f"--ranking-style {job.preference_keys.ranking_style!r}: expected order or ranks")
    for src in sources:
        if src.kind != "jsonl":
            raise DataError(f"{src.path}: --format {job.data_format} reads JSON lines files (.jsonl, .json, "
                            "optionally .gz/.bz2/.xz), one record per line; convert it, or name its type with "
                            "--input-type jsonl")  # fmt: skip


def _report(problems: list, chunk: Chunk, strict: bool, fixes: dict, stats: Stats, progress: Progress, shown: int
            ) -> int:  # fmt: skip
    """Count (or, strict, raise on) a chunk's problems in line order; returns the warnings shown so far."""
    for n, kind, detail in sorted(problems, key=lambda p: p[0]):
        where = (
            chunk.source
            if n == 0
            else f"{chunk.source}:{n}"
            if chunk.unit == "line"
            else f"{chunk.source} row {n}"
        )
        if strict:
            raise DataError(f"{where}: {kind}: {detail}. Fix: {fixes[kind]}, or drop --strict to skip it")
        stats.skipped[kind] += 1
        if shown < MAX_SHOWN:
            progress.message(f"warning: {where}: {kind}: {detail}; skipped")
        shown += 1
    return shown


def preprocess(
    inputs: list[str],
    output: str,
    *,
    tokenizer: str = "gpt2",
    text_key: str = "text",
    input_type: str = "auto",
    unknown_as: str | None = None,
    text_mode: str = "file",
    split: str = "train",
    hf_config: str | None = None,
    workers: int | None = None,
    strict: bool = False,
    log=sys.stderr,
    interval: float | None = None,
    examples: ExampleJob | None = None,
) -> Stats:
    """Tokenize `inputs` into `<output>.bin` + `<output>.idx` (+ `.mask`, `.pairs` for ``examples``: chat or
    preference records); returns the counts. Raises DataError on unusable input (and, with strict=True, on
    the first bad line); nothing is published then. ``unknown_as`` reads files of unknown type as that type."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise DataError(
            f"--output {output} is a directory; give a prefix such as {Path(output) / 'corpus'} "
            "(writes corpus.bin and corpus.idx)"
        )
    sources = resolve_inputs(inputs, input_type, unknown_as)
    if examples is not None:
        _check_job(examples, sources)
    tok = load_tokenizer(tokenizer)
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sizes = [s.size for s in sources]
    progress = Progress(sum(sizes) if None not in sizes else None, log, interval)
    stats, shown = Stats(workers=workers), 0
    fixes = FIXES if examples is None else {**FIXES, **EXAMPLE_FIXES}
    chunks = read_chunks(sources, text_key, text_mode, split, hf_config)
    with _writer(output, tok, examples) as out, closing(_results(chunks, workers, (tokenizer, text_key, examples))) as results:  # fmt: skip
        for r in results:
            shown = _report(r.problems, r.chunk, strict, fixes, stats, progress, shown)
            if r.pairs is not None and len(r.pairs):
                out.add_pairs(r.pairs + np.array([out.num_docs, out.num_docs, stats.groups], np.int64))
            out.add(r.tokens, r.lengths, r.mask)
            stats.docs += len(r.lengths)
            stats.tokens += len(r.tokens)
            stats.bytes += r.chunk.nbytes
            stats.groups += r.groups
            stats.pairs += 0 if r.pairs is None else len(r.pairs)
            stats.truncated += r.truncated
            stats.dropped += r.dropped
            progress.update(stats, r.chunk.pos)
        if stats.docs == 0:
            what = "documents" if examples is None else "usable records"
            raise DataError(f"no {what} found in {', '.join(inputs)}; nothing written")
    stats.seconds = time.perf_counter() - progress.start
    progress.update(stats, progress.total or 0, final=True)
    if shown > MAX_SHOWN:
        progress.message(f"({shown - MAX_SHOWN} more warnings not shown)")
    return stats
