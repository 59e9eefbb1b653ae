"""Loss, perplexity and bits per byte of a neo model on token files or raw text.

Every input becomes one token stream laid out as preprocessing writes it: documents back to back, each
followed by the end-of-document (EOD) token. One EOD is put in front as the context of the first token,
so **every token of the input is scored exactly once**: the stream is cut into contiguous,
non-overlapping windows of ``seq_length`` inputs, and window i predicts tokens i*L+1 .. i*L+L of the
stream (the last window may be shorter). Context does not carry across windows, as in training.

* loss = total NLL / scored tokens (nats per token), perplexity = exp(loss);
* bits per byte = total NLL / ln 2 / UTF-8 bytes of the text. The bytes are those of the documents'
  text (for token files, the byte length of each decoded token; EOD tokens add none, their NLL counts),
  so the figure compares across tokenizers.

The same input gives the same numbers as a token file or as raw text: ``austen.jsonl.gz`` evaluated
directly equals its preprocessed ``.bin/.idx`` with ``split="all"`` (a test holds us to that).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from neo.data.textio import open_text, strip_compression
from neo.data.tokenizer import same_tokenizer
from neo.errors import EvalError  # noqa: F401 - re-exported: part of this module's API

JSONL = (".jsonl", ".json", ".ndjson")


@dataclass
class EvalResult:
    """Totals for one input (or several, summed). ``bytes`` is None when unknown."""

    name: str
    tokens: int
    nll: float
    bytes: int | None = None
    documents: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }

    @staticmethod
    def total(results: list[EvalResult], name: str = "total") -> EvalResult:
        known = all(r.bytes is not None for r in results)
        return EvalResult(
            name,
            sum(r.tokens for r in results),
            sum(r.nll for r in results),
            sum(r.bytes for r in results) if known else None,
            sum(r.documents for r in results),
        )


# ------------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def token_nll(
    model: torch.nn.Module, stream: np.ndarray | torch.Tensor, seq_length: int, *, batch_size: int = 8
) -> tuple[float, int]:
    """(sum of -log p(token | window prefix), tokens scored) over ``stream[1:]``, windows of ``seq_length``.

    The log-softmax is taken in fp32 over the model's whole (padded) vocabulary, as the training loss
    does, so a validation split gives the figure training reported.
    """
    stream = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    n = len(stream) - 1
    if n < 1:
        return 0.0, 0
    device = next(model.parameters()).device
    starts = list(range(0, n, seq_length))
    total = 0.0
    full = [s for s in starts if s + seq_length <= n]
    for i in range(0, len(full), batch_size):
        idx = torch.tensor(full[i : i + batch_size])[:, None] + torch.arange(seq_length + 1)
        window = stream[idx].to(device)
        total += _nll(model, window[:, :-1], window[:, 1:])
    for s in starts[len(full) :]:  # the last, shorter window
        window = stream[s : n + 1][None].to(device)
        total += _nll(model, window[:, :-1], window[:, 1:])
    return total, n


def _nll(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed loss through the model's training loss path: the head and the loss fused over chunks of
    tokens (``model.loss_chunk_size``), so a batch never holds its [tokens, vocab] logits."""
    return model(inputs, labels).item() * labels.numel()


# ------------------------------------------------------------------------------------------------- inputs


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id's text (special tokens: 0), for bits per byte of token files."""
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    specials = tokenizer.special_ids
    for i in range(tokenizer.vocab_size):
        if i not in specials:
            try:
                lengths[i] = len(tokenizer.token_bytes(i))
            except KeyError:  # ids with no token (gaps in some vocabularies)
                pass
    return lengths


def is_token_file(path: str) -> str | None:
    """The .bin/.idx prefix ``path`` names (PREFIX, PREFIX.bin or PREFIX.idx), or None for a text file."""
    for suffix in ("", ".bin", ".idx"):
        if path.endswith(suffix):
            prefix = path[: len(path) - len(suffix)] if suffix else path
            if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
                return prefix
    return None


def split_documents(num_docs: int, split: str, split_ratio: str) -> tuple[int, int]:
    """Document range [lo, hi) of ``split`` ("all", "train", "valid", "test") under ``split_ratio``."""
    if split == "all":
        return 0, num_docs
    from neo.data.dataset import SPLITS, split_ranges

    if split not in SPLITS:
        raise EvalError(f"split {split!r}: use all, train, valid or test")
    return split_ranges(split_ratio, num_docs)[split]


def token_file_stream(prefix: str, split: str, split_ratio: str, eod_id: int) -> tuple[np.ndarray, int]:
    """[EOD] + the tokens of the split's documents (each already ends with EOD), and the document count."""
    from neo.data.indexed import IndexedTokens

    data = IndexedTokens(prefix)
    lo, hi = split_documents(len(data), split, split_ratio)
    if hi <= lo:
        raise EvalError(
            f"{prefix}: the {split} split of ratio {split_ratio} has no documents "
            f"({len(data)} in the file); choose another --split or --split-ratio"
        )
    tokens = np.asarray(data.tokens[int(data.offsets[lo]) : int(data.offsets[hi])], dtype=np.int64)
    return np.concatenate([[eod_id], tokens]), hi - lo


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Documents of a raw input: each JSONL record's ``text_key`` field, or a whole text file as one.

    Text is read as UTF-8 with universal newlines, exactly as preprocessing reads it.
    """
    if not os.path.isfile(path):
        raise EvalError(f"{path}: no such file (and no {path}.bin/.idx token files)")
    base = strip_compression(path)
    try:
        with open_text(path) as f:
            if base.endswith(JSONL):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise EvalError(
                            f"{path}:{n}: expected a JSON object with a {text_key!r} string "
                            "(choose the field with --text-key)"
                        ) from None
                    if not isinstance(text, str):
                        raise EvalError(f"{path}:{n}: {text_key!r} is not a string")
                    if text:
                        yield text
            else:
                text = f.read()
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise EvalError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8"
        ) from None


def text_stream(docs: list[str], tokenizer) -> tuple[np.ndarray, int]:
    """[EOD] + each document's tokens followed by EOD, and the UTF-8 bytes of the documents."""
    eod = tokenizer.eod_id
    parts = [np.array([eod], dtype=np.int64)]
    nbytes = 0
    for d in docs:
        parts.append(np.asarray(tokenizer.encode(d) + [eod], dtype=np.int64))
        nbytes += len(d.encode("utf-8"))
    return np.concatenate(parts), nbytes


def evaluate_stream(
    model: torch.nn.Module,
    name: str,
    stream: np.ndarray,
    nbytes: int | None,
    documents: int,
    *,
    seq_length: int,
    batch_size: int = 8,
) -> EvalResult:
    nll, n = token_nll(model, stream, seq_length, batch_size=batch_size)
    return EvalResult(name, n, nll, nbytes, documents)


def evaluate_path(
    model: torch.nn.Module,
    tokenizer,
    path: str,
    *,
    seq_length: int,
    batch_size: int = 8,
    split: str = "all",
    split_ratio: str = "969,30,1",
    text_key: str = "text",
    byte_lengths: np.ndarray | None = None,
) -> EvalResult:
    """Evaluate a token file prefix (one split of it) or a raw text / JSONL file."""
    prefix = is_token_file(path)
    if prefix is not None:
        from neo.data.indexed import IndexedTokens

        data = IndexedTokens(prefix)
        if data.tokenizer and not same_tokenizer(data.tokenizer, getattr(tokenizer, "name", data.tokenizer)):
            raise EvalError(
                f"{prefix} was tokenized with {data.tokenizer!r}, the model uses {tokenizer.name!r}; "
                "re-run preprocessing with the model's tokenizer"
            )
        stream, docs = token_file_stream(prefix, split, split_ratio, tokenizer.eod_id)
        if byte_lengths is None:
            byte_lengths = token_byte_lengths(tokenizer)
        if stream.max() >= len(byte_lengths):
            raise EvalError(f"{prefix}: token id {int(stream.max())} is outside the tokenizer's vocabulary")
        nbytes = int(byte_lengths[stream].sum())
        name = prefix if split == "all" else f"{prefix} [{split} of {split_ratio}]"
        return evaluate_stream(
            model, name, stream, nbytes, docs, seq_length=seq_length, batch_size=batch_size
        )
    docs = list(read_documents(path, text_key))
    if not docs:
        raise EvalError(f"{path}: no text to evaluate (empty file)")
    stream, nbytes = text_stream(docs, tokenizer)
    return evaluate_stream(
        model, path, stream, nbytes, len(docs), seq_length=seq_length, batch_size=batch_size
    )


def format_table(results: list[EvalResult]) -> str:
    """A fixed-width table: one row per input (and a total when there are several)."""
    rows = results + ([EvalResult.total(results)] if len(results) > 1 else [])
    width = max(len("input"), *(len(r.name) for r in rows))
    lines = [
        f"{'input':<{width}}  {'docs':>6}  {'tokens':>12}  {'loss':>8}  {'perplexity':>12}  {'bits/byte':>9}"
    ]
    for r in rows:
        bpb = f"{r.bits_per_byte:.4f}" if r.bits_per_byte is not None else "-"
        lines.append(
            f"{r.name:<{width}}  {r.documents:>6}  {r.tokens:>12,}  {r.loss:>8.4f}  {r.perplexity:>12.3f}  "
            f"{bpb:>9}"
        )
    return "\n".join(lines)
