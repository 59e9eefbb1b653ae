"""Tokenize a corpus into <prefix>.bin + <prefix>.idx for training (``neo-preprocess --help``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from neo.cli.common import report
from neo.data.preprocess import preprocess, si_units
from neo.data.records import ChatKeys, ExampleJob, PreferenceKeys
from neo.data.tokenizer import NAMES
from neo.errors import NeoError

PROG = "neo-preprocess"


INPUT_TYPES = ("auto", "jsonl", "text", "parquet", "hf")
KEY_HELP = {
    "messages": "chat: the key of the messages list",
    "prompt": "the key of the prompt (text or messages)",
    "response": "chat: the key of the answer to the prompt",
    "system": "the key of an optional system text put before the prompt",
    "chosen": "preference: the key of the preferred answer",
    "rejected": "preference: the key of the other answer",
    "responses": "preference: the key of the ranked answers",
    "ranking": "preference: the key of their ranking",
}
LEGACY_FORMATS = ("auto", "jsonl", "parquet", "hf")  # --format once named the input type; still accepted


EPILOG = """inputs (types chosen by extension; .gz/.bz2/.xz compressed files are streamed):
  *.jsonl, *.json, *.ndjson   JSON lines; the document is the --text-key field
  *.txt, *.text, *.md         plain text; one document per file, or per paragraph (--text-mode)
  *.parquet                   the --text-key column
  *.csv, *.tsv, *.arrow       read with HF datasets
  DIR                         its files of the types above (recursively), or a save_to_disk dataset
  hf:NAME                     a Hugging Face hub dataset (needs network), with --split/--hf-config

--format chat reads JSON lines of {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}
or {"prompt": ..., "response": ...}; --format preference reads {"prompt", "chosen", "rejected"} or
{"prompt", "responses": [...], "ranking": [best index, ..., worst index]} (values: text or messages).
Only assistant tokens (each answer and its end of turn) carry loss. Built-in templates: chatml, plain.

bad lines (invalid UTF-8, not JSON, missing key, empty; for chat/preference also missing or unknown
roles, non-string content, empty answers, ties, bad rankings) are reported with file:line, counted and
skipped; --strict stops at the first one. Outputs are written under temporary names and renamed at the
end, so an interrupted run never leaves files that look complete.

examples:
  python launch/preprocess.py data/sample/austen.jsonl.gz --output data/tokens/sample --tokenizer gpt2
  python launch/preprocess.py data/sample/chat.jsonl --format chat --output data/tokens/chat --seq-length 512
  python launch/preprocess.py data/sample/preference.jsonl --format preference --output data/tokens/pref"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text into <output>.bin (token ids) + <output>.idx (document index) for training. "
        "Each document is followed by the end-of-document token. --format chat / preference renders instruction "
        "or preference records with a chat template and also writes <output>.mask (which tokens carry loss) and, "
        "for preferences, <output>.pairs (the comparisons).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("inputs", nargs="+", help="files, directories, glob patterns or hf:NAME")
    p.add_argument("--output", "-o", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help=f"{' | '.join(NAMES)} | path to a .tiktoken file | dir with encoder.json + vocab.bpe "
        "| hf:DIR with a Hugging Face tokenizer.json (default: gpt2)",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        default=None,
        choices=["text", "chat", "preference", *LEGACY_FORMATS],
        help="what the records are: text (pretraining documents), chat (instructions) or preference "
        "(comparisons) (default: text). The input types auto/jsonl/parquet/hf are still accepted here, "
        "meaning --input-type; --format text also reads files of unknown type as plain text",
    )
    p.add_argument(
        "--input-type",
        default="auto",
        choices=INPUT_TYPES,
        help="input file type, when the file extension does not say (default: auto)",
    )
    p.add_argument("--text-key", default="text", help="JSON key / column holding the text (default: text)")
    p.add_argument(
        "--text-mode",
        default="file",
        choices=["file", "paragraph"],
        help="plain text: one document per file, or per blank-line-separated paragraph (default: file)",
    )
    p.add_argument("--split", default="train", help="split of a dataset dict or hub dataset (default: train)")
    p.add_argument("--hf-config", default=None, help="configuration name of a hub dataset")
    _example_arguments(p)
    p.add_argument("--workers", "-j", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad line instead of skipping it")
    p.add_argument(
        "--log-interval",
        type=float,
        default=None,
        help="seconds between progress lines (default: 0.5 on a terminal, 10 otherwise)",
    )
    return p


def _example_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chat and preference data (--format chat | preference)")
    g.add_argument("--chat-template", default="chatml", metavar="SPEC",
                   help="chatml | plain | a .jinja file | a tokenizer_config.json with a chat_template, or its "
                   "folder (default: chatml)")  # fmt: skip
    g.add_argument("--seq-length", type=int, default=2048,
                   help="tokens per training sample; a record may have seq_length + 1 tokens (default: 2048)")  # fmt: skip
    g.add_argument("--long-records", default="truncate", choices=["truncate", "drop"],
                   help="a longer record: keep its first seq_length + 1 tokens, or drop it (default: truncate)")  # fmt: skip
    g.add_argument("--ranking-style", default="order", choices=["order", "ranks"],
                   help="order: the ranking lists response indices, best first; ranks: ranking[i] is response "
                   "i's rank, 0 = best (default: order)")  # fmt: skip
    seen = set()
    for name, default in [*vars(ChatKeys()).items(), *vars(PreferenceKeys()).items()]:
        if name != "ranking_style" and name not in seen:
            seen.add(name)
            g.add_argument(
                f"--{name}-key", default=default, help=f"JSON key of the {name} (default: {default})"
            )


def _job(args) -> ExampleJob | None:
    if args.fmt not in ("chat", "preference"):
        return None
    keys = {f: getattr(args, f"{f}_key") for f in vars(ChatKeys())}
    pkeys = {f: getattr(args, f"{f}_key") for f in vars(PreferenceKeys()) if f != "ranking_style"}
    return ExampleJob(args.fmt, args.chat_template, args.seq_length, args.long_records, ChatKeys(**keys),
                      PreferenceKeys(**pkeys, ranking_style=args.ranking_style))  # fmt: skip


def _summary(args, s) -> None:
    skipped = sum(s.skipped.values())
    dt = max(s.seconds, 1e-9)
    what = {"chat": "conversations", "preference": "answers"}.get(args.fmt, "documents")
    print(
        f"done in {s.seconds:.2f} s: {s.docs:,} {what}, {si_units(s.bytes, 'B')} of text -> {s.tokens:,} tokens "
        f"({si_units(s.docs / dt, 'docs/s')}, {si_units(s.bytes / dt, 'B/s')}, {si_units(s.tokens / dt, 'tokens/s')}, "
        f"{s.workers} workers)"
    )
    if args.fmt == "preference":
        print(f"{s.groups:,} prompts, {s.pairs:,} comparisons")
    if s.truncated or s.dropped:
        print(f"long records (over --seq-length {args.seq_length} + 1 tokens, --long-records {args.long_records}): "
              f"{s.truncated:,} truncated, {s.dropped:,} dropped")  # fmt: skip
    if skipped:
        kinds = ", ".join(f"{n} {k}" for k, n in s.skipped.most_common())
        print(f"skipped {skipped:,} bad inputs ({kinds}); --strict makes them fatal")
    exts = ("bin", "idx") + {"chat": ("mask",), "preference": ("mask", "pairs")}.get(args.fmt, ())
    for ext in exts:
        print(f"wrote {args.output}.{ext} ({si_units(os.path.getsize(f'{args.output}.{ext}'), 'B')})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    input_type, unknown_as = args.input_type, None
    if args.fmt in LEGACY_FORMATS:  # the old meaning of --format: the input type
        input_type, args.fmt = args.fmt, "text"
    elif args.fmt == "text":  # old command lines read files of any name as plain text with it
        unknown_as = "text"
    args.fmt = args.fmt or "text"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the temporary files are removed
    try:
        s = preprocess(
            args.inputs,
            args.output,
            tokenizer=args.tokenizer,
            text_key=args.text_key,
            input_type=input_type,
            unknown_as=unknown_as,
            text_mode=args.text_mode,
            split=args.split,
            hf_config=args.hf_config,
            workers=args.workers,
            strict=args.strict,
            interval=args.log_interval,
            examples=_job(args),
        )
    except NeoError as e:
        return report(PROG, e)
    except OSError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    _summary(args, s)
    return 0


def console() -> None:
    sys.exit(main())
