"""``neo.json``: what a checkpoint holds, written last so that a checkpoint without it was never published.

It records the run (config, model shape, layout, tokenizer), the iteration and data position, and every
file with its size, so that a truncated or missing file is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os

from neo.checkpoint.layout import META
from neo.errors import CheckpointError


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sizes(folder: str) -> dict[str, int]:
    """Every file below ``folder`` (relative path -> bytes)."""
    sizes = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            full = os.path.join(dirpath, f)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    return sizes


def verify(path: str, meta: dict) -> None:
    """Every file the manifest lists is present with its recorded size."""
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {rel} is missing. Fix: load an earlier "
                "checkpoint (delete this folder and `latest` falls back to the previous one)."
            )
        if os.path.getsize(full) != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {rel} has {os.path.getsize(full):,} bytes, "
                f"{size:,} were written. Fix: load an earlier checkpoint (delete this folder)."
            )


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(
            f"{path} is not a complete neo checkpoint (no {META}; an interrupted save?). "
            "Fix: point checkpoint.load at a folder like <dir>/iter_00001000 that has one, "
            "or at the checkpoint dir to take its newest complete checkpoint."
        )
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({e}); the checkpoint is corrupt.") from None
