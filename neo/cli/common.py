"""What the command-line front ends share: one-line errors, the dtype names, the default device, --set."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from neo.errors import NeoError

# Command-line dtype names -> torch dtype attribute names (torch is imported only when one is used).
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def torch_dtype(name: str | None):
    """The torch dtype of a command-line name (fp32, bf16, fp16, fp64); None stays None."""
    if name is None:
        return None
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def default_device() -> str:
    """Where inference runs unless --device says otherwise: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """CONFIG.yml files merged left to right, and repeatable ``--set key.sub=value`` overrides."""
    parser.add_argument(
        "configs",
        nargs="+" if required else "*",
        metavar="CONFIG.yml",
        help="YAML config files, merged left to right (later files win)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )


def report(prog: str, error: NeoError) -> int:
    """Print ``error`` as one line on stderr; return its exit code."""
    print(f"{prog}: error: {error.one_line()}", file=sys.stderr, flush=True)
    return error.exit_code


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a NeoError becomes one line on stderr and its exit code (no traceback)."""
    try:
        return body()
    except NeoError as e:
        return report(prog, e)
