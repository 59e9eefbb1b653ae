"""``neo.json``: what a checkpoint holds, written last so that a checkpoint without it was never published.

It records the run (config, model shape, layout, tokenizer), the iteration and data position, and every
file with its size and sha256, so that a truncated, missing or damaged file is refused before anything is
loaded (``neo/checkpoint/files.py``).
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
