"""Evaluate a neo checkpoint: loss, perplexity and bits per byte on data, and lm-eval tasks.

    python launch/evaluate.py CKPT data/tokens/sample --split valid --split-ratio 969,30,1
    python launch/evaluate.py CKPT book.txt notes.md corpus.jsonl.gz     # raw text, tokenized on the fly
    python launch/evaluate.py CKPT --tasks neo_tiny --include-path tests/fixtures/lm_eval

FILES are .bin/.idx token prefixes (PREFIX, PREFIX.bin or PREFIX.idx) or raw text: .jsonl/.json records
(one document per record, field --text-key) or any other UTF-8 text file (one document), optionally
.gz/.bz2/.xz. Every token is scored once, in contiguous windows of --seq-length (default: the model's).
--split picks a document range of token files (default all; the ratio defaults to the checkpoint's
data.split). Results go to stdout (a table, or JSON with --json); logs go to stderr.
Exit codes: 0 done; 2 bad input (options, checkpoint, files, tasks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neo.cli.common import SHORT_NAMES, default_device, guarded, torch_dtype
from neo.errors import EvalError, UsageError

PROG = "neo-evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint folder (iter_N) or checkpoint dir (its newest is used)")
    p.add_argument("files", nargs="*", help="token prefixes or raw text files")
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "valid", "test"],
        help="document range of token files (default: all)",
    )
    p.add_argument("--split-ratio", default=None, help="e.g. 969,30,1 (default: the checkpoint's data.split)")
    p.add_argument(
        "--seq-length", type=int, default=None, help="window length (default: the model's seq_length)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-key", default="text", help="field of JSONL records holding the text")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs the eval extra)")
    p.add_argument("--include-path", action="append", default=[], help="folder of local lm-eval YAML tasks")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--output", default=None, help="write the full results (and lm-eval's) as JSON here")
    p.add_argument("--no-verify", action="store_true",
                   help="check file sizes only, not their sha256 (faster on a large checkpoint; logged)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=SHORT_NAMES, default="fp32")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not args.files and not args.tasks:
        raise UsageError("nothing to evaluate: give FILES (token prefixes or text files) and/or --tasks")
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    for f in args.files:
        if not (os.path.isfile(f) or os.path.isfile(f + ".bin") or os.path.isfile(f + ".idx")):
            raise UsageError(f"{f}: no such file (nor {f}.bin/.idx)")
        if os.path.isfile(f) and os.path.getsize(f) == 0:
            raise UsageError(f"{f}: empty file, no text to evaluate")
    if args.seq_length is not None and args.seq_length < 1:
        raise UsageError(f"--seq-length must be >= 1, got {args.seq_length}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    for d in args.include_path:
        if not os.path.isdir(d):
            raise UsageError(f"--include-path {d} is not a folder")
    if args.split != "all" and not any(_is_prefix(f) for f in args.files):
        raise UsageError("--split applies to token files (.bin/.idx); none were given")


def _is_prefix(path: str) -> bool:
    from neo.evaluate import is_token_file

    return is_token_file(path) is not None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    from neo.generate import Generator

    device = args.device or default_device()
    gen = Generator.from_checkpoint(args.checkpoint, device=device, dtype=torch_dtype(args.dtype),
                                    batch_size=args.batch_size, checksums=not args.no_verify)  # fmt: skip
    if args.no_verify:
        print("neo: --no-verify: checkpoint file contents were not checked (sizes only)", file=sys.stderr)
    seq_length = args.seq_length or gen.model.args.seq_length
    if gen.model.args.position_embedding != "rotary" and seq_length > gen.model.args.max_positions:
        raise EvalError(
            f"--seq-length {seq_length} exceeds the model's {gen.model.args.max_positions} positions"
        )
    print(
        f"neo: evaluating {args.checkpoint} on {device}, windows of {seq_length} tokens",
        file=sys.stderr,
        flush=True,
    )
    results = _evaluate_files(gen, args, seq_length)
    report: dict = {"checkpoint": args.checkpoint, "seq_length": seq_length}
    if results:
        from neo.evaluate import EvalResult

        report["results"] = [r.to_dict() for r in results]
        if len(results) > 1:
            report["total"] = EvalResult.total(results).to_dict()
    if args.tasks:
        report["lm_eval"] = _run_lm_eval(gen, args)
    _print_report(args, report, results)
    return 0


def _evaluate_files(gen, args: argparse.Namespace, seq_length: int) -> list:
    from neo.evaluate import evaluate_path, token_byte_lengths

    ratio = args.split_ratio or _checkpoint_split(args.checkpoint) or "969,30,1"
    byte_lengths = token_byte_lengths(gen.tokenizer) if any(_is_prefix(f) for f in args.files) else None
    results = []
    for f in args.files:
        r = evaluate_path(gen.model, gen.tokenizer, f, seq_length=seq_length, batch_size=args.batch_size,
                          split=args.split, split_ratio=ratio, text_key=args.text_key, byte_lengths=byte_lengths)  # fmt: skip
        print(f"neo: {r.name}: {r.tokens:,} tokens, loss {r.loss:.4f}", file=sys.stderr, flush=True)
        results.append(r)
    return results


def _print_report(args: argparse.Namespace, report: dict, results: list) -> None:
    from neo.evaluate import format_table

    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
    if args.json:
        brief = {k: v for k, v in report.items() if k != "lm_eval"}
        if "lm_eval" in report:
            brief["lm_eval"] = report["lm_eval"]["results"]
        print(json.dumps(brief, default=str))
        return
    if results:
        print(format_table(results))
    if args.tasks:
        from lm_eval.utils import make_table

        print(make_table(report["lm_eval"]))


def _checkpoint_split(path: str) -> str | None:
    """The data.split the checkpoint was trained with, so 'valid' means the documents it held out."""
    from neo.checkpoint import read_meta, resolve
    from neo.errors import NeoError

    try:
        return read_meta(resolve(path)).get("config", {}).get("data", {}).get("split")
    except NeoError:  # only a default; loading reports real problems
        return None


def _run_lm_eval(gen, args: argparse.Namespace) -> dict:
    try:
        from neo.lm_eval_adapter import NeoLM, run_tasks
    except ImportError as e:
        raise EvalError(str(e)) from None
    lm = NeoLM(generator=gen, batch_size=args.batch_size)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    try:
        out = run_tasks(
            lm,
            tasks,
            include_path=args.include_path or None,
            limit=limit,
            num_fewshot=args.num_fewshot,
            log_samples=False,
        )
    except ValueError as e:
        raise EvalError(str(e)) from None
    return {
        k: out[k]
        for k in ("results", "versions", "n-shot", "configs", "higher_is_better", "group_subtasks")
        if k in out
    }


def console() -> None:
    sys.exit(main())
