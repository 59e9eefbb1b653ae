"""What the command-line front ends share: one-line errors, the dtype names, the default device, --set."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from neo.dtypes import DTYPE_NAMES, SHORT_NAMES, default_device, torch_dtype
from neo.errors import NeoError

__all__ = [
    "DTYPE_NAMES",
    "SHORT_NAMES",
    "add_config_arguments",
    "default_device",
    "guarded",
    "report",
    "torch_dtype",
]


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
