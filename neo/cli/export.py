"""Export a neo checkpoint to a transformers GPTNeoX directory, or import one back.

    python launch/export.py runs/quickstart/checkpoints hf/quickstart        # neo -> transformers
    python launch/export.py --from-hf hf/pythia-70m neo-ckpt/pythia-70m      # transformers -> neo

The export merges tensor- and pipeline-parallel shards (any layout the run used) into one
model.safetensors with config.json and, for GPT-2-style BPE, the tokenizer files; it loads with
``GPTNeoXForCausalLM.from_pretrained(OUT)`` offline. The import writes a weights-only neo checkpoint:
train from it with ``--set checkpoint.load=OUT --set checkpoint.load_weights_only=true``.
"""

from __future__ import annotations

import argparse
import sys

from neo.cli.common import guarded, torch_dtype
from neo.errors import UsageError

PROG = "neo-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "source",
        help="neo checkpoint (a run's checkpoints/ dir or one iter_* folder); "
        "with --from-hf, a transformers GPTNeoX directory",
    )
    parser.add_argument("output", help="folder to create")
    parser.add_argument(
        "--from-hf", action="store_true", help="import a transformers GPTNeoX directory into neo"
    )
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="export weights in this dtype (default: as saved)",
    )
    parser.add_argument("--tokenizer", default="gpt2", help="with --from-hf: the tokenizer spec to record")
    parser.add_argument("--no-verify", action="store_true",
                        help="check checkpoint file sizes only, not their sha256 (faster; logged)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        from neo.export.hf import export_checkpoint, import_hf
    except ImportError as e:
        raise UsageError(f"{e}. Fix: pip install -e '.[hf]' (transformers)") from None
    if args.from_hf:
        result = import_hf(args.source, args.output, tokenizer=args.tokenizer)
        print(
            f"neo: imported {args.source} into {result['path']}; continue training with --set "
            f"checkpoint.load={result['path']} --set checkpoint.load_weights_only=true"
        )
        return 0
    if args.no_verify:
        print("neo: --no-verify: checkpoint file contents were not checked (sizes only)", file=sys.stderr)
    result = export_checkpoint(
        args.source, args.output, torch_dtype(args.dtype), checksums=not args.no_verify
    )
    tok = "with tokenizer files" if result["tokenizer"] else (
        f"without tokenizer files ({result['tokenizer_spec']} has no transformers GPT-2 BPE form)")  # fmt: skip
    print(
        f"neo: exported {result['parameters']:,} parameters to {result['path']} {tok}. Load it with "
        f"GPTNeoXForCausalLM.from_pretrained({result['path']!r})"
    )
    return 0


def console() -> None:
    sys.exit(main())
