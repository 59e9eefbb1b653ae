"""Export a neo checkpoint to a transformers folder (GPTNeoX, Llama, Mistral, Qwen2), or import one back.

    python launch/export.py runs/quickstart/checkpoints hf/quickstart        # neo -> transformers
    python launch/export.py runs/tune/checkpoints hf/tune --arch mistral     # this architecture
    python launch/export.py --from-hf hf/Llama-3.2-1B neo-ckpt/llama         # transformers -> neo

The export merges tensor- and pipeline-parallel shards (any layout the run used) into one
model.safetensors with config.json and the tokenizer files (a Hugging Face tokenizer's own, or GPT-2's
BPE); it loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` offline. The architecture follows from
the model's options (LayerNorm + GeLU: GPTNeoX; RMSNorm + SwiGLU: Llama, Qwen2 with a q/k/v-only bias,
Mistral with a sliding window) unless ``--arch`` names one; what it cannot express exactly is refused by
name. The import writes a weights-only neo checkpoint (at ``--tp``/``--pp``; it loads into any layout)
with the folder's tokenizer: train from it with ``--set checkpoint.load=OUT --set
checkpoint.load_weights_only=true``, generate from it with no further flags.
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
        "with --from-hf, a transformers folder (GPTNeoX, Llama, Mistral, Qwen2)",
    )
    parser.add_argument("output", help="folder to create")
    parser.add_argument("--from-hf", action="store_true", help="import a transformers folder into neo")
    parser.add_argument(
        "--arch",
        choices=["gpt_neox", "llama", "mistral", "qwen2"],
        default=None,
        help="export as this architecture (default: the one the model's options name)",
    )
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="export weights in this dtype (default: as saved)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="with --from-hf: the tokenizer spec to record (default: the folder's tokenizer.json)",
    )
    parser.add_argument("--tp", type=int, default=1, help="with --from-hf: tensor-parallel shards to write")
    parser.add_argument("--pp", type=int, default=1, help="with --from-hf: pipeline stages to write")
    lora = parser.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="a LoRA checkpoint: one model with the adapters folded into the base weights")  # fmt: skip
    lora.add_argument("--peft", action="store_true",
                      help="a LoRA checkpoint: OUT/base (the base model) and OUT/adapter (a PEFT adapter folder)")  # fmt: skip
    parser.add_argument("--no-verify", action="store_true",
                        help="check checkpoint file sizes only, not their sha256 (faster; logged)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda: _run(args))


def _check_lora_flags(args: argparse.Namespace) -> None:
    """A LoRA checkpoint needs --merge-lora or --peft (both are exact; the user chooses the form)."""
    from neo.checkpoint import read_meta, resolve

    is_lora = bool((read_meta(resolve(args.source)).get("lora") or {}).get("base"))
    if is_lora and not (args.merge_lora or args.peft):
        raise UsageError(f"{args.source} holds LoRA adapters. Fix: add --merge-lora (one model, the adapters folded "
                         "in) or --peft (the base model and a PEFT adapter folder).")  # fmt: skip
    if not is_lora and (args.merge_lora or args.peft):
        raise UsageError(f"{args.source} is not a LoRA checkpoint. Fix: drop --merge-lora / --peft.")


def _run(args: argparse.Namespace) -> int:
    try:
        from neo.export.hf import export_checkpoint
        from neo.export.hf_import import import_hf
    except ImportError as e:
        raise UsageError(f"{e}. Fix: pip install -e '.[hf]' (transformers)") from None
    if args.from_hf:
        result = import_hf(args.source, args.output, tokenizer=args.tokenizer, tp=args.tp, pp=args.pp)
        print(
            f"neo: imported {args.source} ({result['architecture']}, tokenizer {result['tokenizer_spec']}) into "
            f"{result['path']}; continue training with --set checkpoint.load={result['path']} --set "
            "checkpoint.load_weights_only=true"
        )
        return 0
    if args.no_verify:
        print("neo: --no-verify: checkpoint file contents were not checked (sizes only)", file=sys.stderr)
    _check_lora_flags(args)
    if args.peft:
        from neo.export.peft import export_peft

        result = export_peft(args.source, args.output, torch_dtype(args.dtype), args.arch, not args.no_verify)
        print(f"neo: exported the base to {result['base']} and {result['modules']} adapted modules to "
              f"{result['adapter']}. Load with peft.PeftModel.from_pretrained({result['architecture']}."
              f"from_pretrained({result['base']!r}), {result['adapter']!r})")  # fmt: skip
        return 0
    result = export_checkpoint(args.source, args.output, torch_dtype(args.dtype), arch=args.arch,
                               checksums=not args.no_verify)  # fmt: skip
    tok = "with tokenizer files" if result["tokenizer"] else (
        f"without tokenizer files ({result['tokenizer_spec']} has no transformers form)")  # fmt: skip
    print(
        f"neo: exported {result['parameters']:,} parameters to {result['path']} {tok}. Load it with "
        f"{result['architecture']}.from_pretrained({result['path']!r})"
    )
    return 0


def console() -> None:
    sys.exit(main())
