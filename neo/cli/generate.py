"""Generate text from a neo checkpoint (any tp/pp layout it was saved with; runs in one process).

    python launch/generate.py runs/quickstart/checkpoints --prompt "It is a truth" --max-new-tokens 50
    python launch/generate.py CKPT --prompt-file prompts.txt --output out.jsonl   # a prompt per line, or JSONL
    python launch/generate.py CKPT --interactive                                  # a prompt per line on stdin

Only generated text goes to stdout (JSONL for --prompt-file); logs go to stderr.
Sampling: --temperature 0 (or --greedy) is greedy; --top-k 0 and --top-p 1 switch those filters off.
Exit codes: 0 done; 2 bad input (options, checkpoint, prompt file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from neo.cli.common import SHORT_NAMES, default_device, guarded, torch_dtype
from neo.errors import GenerationError, UsageError

PROG = "neo-generate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint folder (iter_N) or checkpoint dir (its newest is used)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one prompt ('' starts a fresh document)")
    src.add_argument(
        "--prompt-file", help="prompts: one per line, or .jsonl lines with a 'prompt' field (or strings)"
    )
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--output", help="with --prompt-file: write the JSONL here instead of stdout")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus: keep the top tokens with mass >= p (1 = off)"
    )
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random, logged on stderr)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop when the text contains this (repeatable; \\n and \\t mean newline and tab)",
    )
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token")
    p.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, rendered with the chat template the checkpoint was "
                   "fine-tuned with (objective sft); the answer stops at the template's end of turn")  # fmt: skip
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--chat-template", default=None,
                   help="with --chat: this template (chatml, plain, a .jinja or tokenizer_config.json) instead")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (--prompt-file)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="cap on prompt + new tokens (rotary models may exceed their training length)",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole prefix every step (slow; testing)"
    )
    p.add_argument("--no-verify", action="store_true",
                   help="check file sizes only, not their sha256 (faster on a large checkpoint; logged)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=SHORT_NAMES, default=None, help="default fp32 on CPU, bf16 on GPU")
    return p


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSONL ({"prompt": ...} objects or strings)."""
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    prompts = []
    if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f'{path}:{n}: not JSON; expected {{"prompt": "..."}} per line') from None
            text = (
                obj
                if isinstance(obj, str)
                else obj.get("prompt", obj.get("text"))
                if isinstance(obj, dict)
                else None
            )
            if not isinstance(text, str):
                raise UsageError(f"{path}:{n}: expected a string or an object with a 'prompt' string")
            prompts.append(text)
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} holds no prompts")
    return prompts


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ as typed in a shell become newline, tab and backslash; anything else stays."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def sampling_params(args: argparse.Namespace):
    from neo.generate import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        greedy=args.greedy,
        seed=args.seed,
        stop=tuple(unescape(x) for x in args.stop),
        stop_at_eod=not args.ignore_eod,
    )
    try:
        params.validate()
    except GenerationError as e:
        raise UsageError(
            str(e)
            .replace("max_new_tokens", "--max-new-tokens")
            .replace("top_p", "--top-p")
            .replace("top_k", "--top-k")
            .replace("repetition_penalty", "--repetition-penalty")
        ) from None
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return params


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    if args.prompt is None and args.prompt_file is None and not args.interactive:
        raise UsageError("give --prompt TEXT, --prompt-file FILE or --interactive")
    if args.output and not args.prompt_file:
        raise UsageError("--output goes with --prompt-file")
    params = sampling_params(args)
    prompts = read_prompts(args.prompt_file) if args.prompt_file else None
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")

    import torch

    from neo.generate import Generator, generate_text

    device = args.device or default_device()
    dtype = torch_dtype(args.dtype) or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    gen = Generator.from_checkpoint(args.checkpoint, device=device, dtype=dtype, max_length=args.max_length,
                                    batch_size=args.batch_size, checksums=not args.no_verify)  # fmt: skip
    if args.no_verify:
        print("neo: --no-verify: checkpoint file contents were not checked (sizes only)", file=sys.stderr)
    print(
        f"neo: loaded {args.checkpoint} on {device} ({str(dtype).replace('torch.', '')})",
        file=sys.stderr,
        flush=True,
    )
    chat = _chat_options(gen, args)
    if args.prompt is not None:
        (result,), _ = generate_text(gen, [args.prompt], params, use_cache=not args.no_cache, **chat)
        print((args.prompt if args.echo else "") + result.text, flush=True)
    elif prompts is not None:
        results, _ = generate_text(gen, prompts, params, use_cache=not args.no_cache, **chat)
        _write_jsonl(args.output, prompts, results)
    else:
        interactive(gen, params, echo=args.echo, use_cache=not args.no_cache, **chat)
    return 0


def _chat_options(gen, args: argparse.Namespace) -> dict:
    """generate_text's chat options from --chat, --system and --chat-template (checked before generating)."""
    if not args.chat:
        if args.system or args.chat_template:
            raise UsageError("--system and --chat-template go with --chat")
        return {}
    if args.chat_template:
        from neo.data.chat import load_template

        gen.chat_template = load_template(args.chat_template)
    gen.chat_prompt("", args.system)  # refuses a checkpoint without a template, before any work
    return {"chat": True, "system": args.system}


def _write_jsonl(path: str | None, prompts: list[str], results) -> None:
    out = open(path, "w", encoding="utf-8") if path else sys.stdout
    try:
        for prompt, r in zip(prompts, results):
            record = {
                "prompt": prompt,
                "text": r.text,
                "tokens": len(r.tokens),
                "finish_reason": r.finish_reason,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


def interactive(gen, params, *, echo: bool, use_cache: bool, **chat) -> None:
    """A prompt per stdin line until EOF; each answer is printed to stdout as soon as it is done.

    Without a fixed --seed, each prompt draws a new seed (logged), so asking again gives a new sample.
    """
    from dataclasses import replace

    from neo.generate import generate_text

    tty = sys.stdin.isatty()
    n = 0
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        prompt = line.rstrip("\n")
        p = replace(params, seed=None if params.seed is None else params.seed + n)
        n += 1
        try:
            (result,), _ = generate_text(gen, [prompt], p, use_cache=use_cache, **chat)
        except GenerationError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
            continue
        print((prompt if echo else "") + result.text, flush=True)


def console() -> None:
    sys.exit(main())
