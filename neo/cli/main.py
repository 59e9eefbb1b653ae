"""``neo COMMAND ...``: one entry point for every front end (``neo train``, ``neo verify CKPT``, ...)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("neo.cli.train", "train from YAML configs"),
    "preprocess": ("neo.cli.preprocess", "tokenize a corpus into .bin/.idx token files"),
    "generate": ("neo.cli.generate", "sample text from a checkpoint"),
    "evaluate": ("neo.cli.evaluate", "loss, perplexity, bits per byte and lm-eval tasks"),
    "export": ("neo.cli.export", "to and from Hugging Face transformers folders"),
    "verify": ("neo.cli.verify", "check a checkpoint's files against their recorded sha256"),
}


def usage() -> str:
    lines = ["usage: neo COMMAND [ARGS...]   (neo COMMAND --help for each)", ""]
    lines += [f"  {name:<11} {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"neo: error: unknown command {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


def console() -> None:
    if sys.argv[1:2] == ["train"]:  # training ends through neo.distributed.shutdown
        from neo.cli.train import console as train

        sys.argv = [sys.argv[0], *sys.argv[2:]]
        train()
    sys.exit(main())
