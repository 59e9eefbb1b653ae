"""Check a checkpoint on its own: every file against the size and sha256 its manifest recorded.

    neo verify runs/quickstart/checkpoints               # the newest checkpoint of a run
    neo verify runs/quickstart/checkpoints/iter_00000160 --all

Exit codes: 0 every file matches; 2 a file is missing, truncated or changed (the first one is named).
"""

from __future__ import annotations

import argparse
import os
import sys

from neo.cli.common import guarded
from neo.errors import CheckpointError

PROG = "neo verify"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "checkpoint", help="a checkpoint folder (iter_N), or a checkpoint dir (its newest; see --all)"
    )
    p.add_argument("--all", action="store_true", help="every complete checkpoint of a checkpoint dir")
    return p


def verify_one(path: str) -> str:
    """Verify one checkpoint folder; a line saying what was checked (raises CheckpointError if it fails)."""
    from neo.checkpoint.files import has_checksums, verify
    from neo.checkpoint.manifest import read_meta

    meta = read_meta(path)
    verify(path, meta)
    files = meta.get("files", {})
    how = "sha256 and size" if has_checksums(meta) else "size only (saved by an older neo, without checksums)"
    return f"ok: {path}: {len(files)} files match their {how}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from neo.checkpoint.layout import complete_tags, resolve, resolve_run_or_checkpoint

        root = resolve_run_or_checkpoint(args.checkpoint)
        if not os.path.exists(root):
            raise CheckpointError(f"{args.checkpoint} does not exist")
        paths = [os.path.join(root, t) for t in complete_tags(root)] if args.all else [resolve(root)]
        if not paths:
            raise CheckpointError(f"no complete checkpoint in {root}")
        for path in paths:
            print(verify_one(path), flush=True)
        return 0

    return guarded(PROG, body)


def console() -> None:
    sys.exit(main())
