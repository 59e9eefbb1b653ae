"""Tokenize a corpus into <prefix>.bin + <prefix>.idx for training (``neo-preprocess --help``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from neo.cli.common import report
from neo.data.preprocess import preprocess, si_units
from neo.data.tokenizer import NAMES
from neo.errors import NeoError

PROG = "neo-preprocess"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text into <output>.bin (token ids) + <output>.idx (document index) for training. "
        "Each document is followed by the end-of-document token.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""inputs (types chosen by extension; .gz/.bz2/.xz compressed files are streamed):
  *.jsonl, *.json, *.ndjson   JSON lines; the document is the --text-key field
  *.txt, *.text, *.md         plain text; one document per file, or per paragraph (--text-mode)
  *.parquet                   the --text-key column
  *.csv, *.tsv, *.arrow       read with HF datasets
  DIR                         its files of the types above (recursively), or a save_to_disk dataset
  hf:NAME                     a Hugging Face hub dataset (needs network), with --split/--hf-config

bad lines (invalid UTF-8, not JSON, missing key, empty) are reported with file:line, counted and
skipped; --strict stops at the first one. Outputs are written under temporary names and renamed
at the end, so an interrupted run never leaves a pair that looks complete.

example:
  python launch/preprocess.py data/sample/austen.jsonl.gz --output data/tokens/sample --tokenizer gpt2""",
    )
    p.add_argument("inputs", nargs="+", help="files, directories, glob patterns or hf:NAME")
    p.add_argument("--output", "-o", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help=f"{' | '.join(NAMES)} | path to a .tiktoken file | dir with encoder.json + vocab.bpe "
        "| hf:DIR with a Hugging Face tokenizer.json (default: gpt2)",
    )
    p.add_argument("--text-key", default="text", help="JSON key / column holding the text (default: text)")
    p.add_argument(
        "--format",
        dest="fmt",
        default="auto",
        choices=["auto", "jsonl", "text", "parquet", "hf"],
        help="input type, when the file extension does not say (default: auto)",
    )
    p.add_argument(
        "--text-mode",
        default="file",
        choices=["file", "paragraph"],
        help="plain text: one document per file, or per blank-line-separated paragraph (default: file)",
    )
    p.add_argument("--split", default="train", help="split of a dataset dict or hub dataset (default: train)")
    p.add_argument("--hf-config", default=None, help="configuration name of a hub dataset")
    p.add_argument("--workers", "-j", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    p.add_argument(
        "--log-interval",
        type=float,
        default=None,
        help="seconds between progress lines (default: 0.5 on a terminal, 10 otherwise)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the temporary files are removed
    try:
        s = preprocess(
            args.inputs,
            args.output,
            tokenizer=args.tokenizer,
            text_key=args.text_key,
            fmt=args.fmt,
            text_mode=args.text_mode,
            split=args.split,
            hf_config=args.hf_config,
            workers=args.workers,
            strict=args.strict,
            interval=args.log_interval,
        )
    except NeoError as e:
        return report(PROG, e)
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    skipped = sum(s.skipped.values())
    dt = max(s.seconds, 1e-9)
    print(
        f"done in {s.seconds:.2f} s: {s.docs:,} documents, {si_units(s.bytes, 'B')} of text -> {s.tokens:,} tokens "
        f"({si_units(s.docs / dt, 'docs/s')}, {si_units(s.bytes / dt, 'B/s')}, {si_units(s.tokens / dt, 'tokens/s')}, "
        f"{s.workers} workers)"
    )
    if skipped:
        kinds = ", ".join(f"{n} {k}" for k, n in s.skipped.most_common())
        print(f"skipped {skipped:,} bad inputs ({kinds}); --strict makes them fatal")
    for ext in ("bin", "idx"):
        print(f"wrote {args.output}.{ext} ({si_units(os.path.getsize(f'{args.output}.{ext}'), 'B')})")
    return 0


def console() -> None:
    sys.exit(main())
